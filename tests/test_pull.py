"""`tunectl pull` planning and copying, on a directory store (the S3 path is covered in test_s3_store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunectl.errors import TunectlError
from tunectl.pull import plan, pull
from tunectl.stores import LocalStore
from tunectl.stores.manifest import sha256_file


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(tmp_path / "store")
    s.write_json("runs/r1/run.json", {"run": "r1"})
    for stage, files in {
        "train": {"adapter/a.safetensors": b"A" * 100, "loss.json": b"[1]"},
        "gguf": {"m-q4_k_m.gguf": b"q4" * 50, "m-f16.gguf": b"f16" * 50, "Modelfile": b"FROM ./m-q4_k_m.gguf\n"},
    }.items():
        src = tmp_path / "src" / stage
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        s.publish("r1", stage, src, {})
    return s


def test_pull_everything_completed_with_manifests(store, tmp_path):
    sel = plan(store, "r1", None, None)
    assert [s.stage for s in sel] == ["train", "gguf"]  # merge never completed: skipped, not an error
    seen = []
    pull(store, "r1", tmp_path / "out", sel, seen.append)
    assert sum(seen) == sum(s.size for s in sel)
    for stage in ("train", "gguf"):
        manifest = json.loads((tmp_path / "out" / stage / "manifest.json").read_text())
        for rel, meta in manifest["files"].items():
            assert sha256_file(tmp_path / "out" / stage / rel) == meta["sha256"]


def test_pull_one_quant_takes_only_that_gguf(store, tmp_path):
    sel = plan(store, "r1", None, "q4_k_m")
    pull(store, "r1", tmp_path / "out", sel, lambda n: None)
    assert sorted(p.name for p in (tmp_path / "out" / "gguf").iterdir()) == [
        "Modelfile",
        "m-q4_k_m.gguf",
        "manifest.json",
    ]
    manifest = json.loads((tmp_path / "out" / "gguf" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["Modelfile", "m-q4_k_m.gguf"]


def test_pull_again_skips_what_is_already_there(store, tmp_path):
    sel = plan(store, "r1", "train", None)
    pull(store, "r1", tmp_path / "out", sel, lambda n: None)
    target = tmp_path / "out" / "train" / "loss.json"
    before = target.stat().st_mtime_ns
    pull(store, "r1", tmp_path / "out", sel, lambda n: None)
    assert target.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("run", "stage", "quant", "message"),
    [
        ("nope", None, None, "no run 'nope' in file://"),
        ("r1", "merge", None, "run r1 has no completed merge stage (completed: train, gguf)"),
        ("r1", None, "q9_9", "run r1 has no q9_9 GGUF; it has: f16, q4_k_m"),
        ("r1", "train", "q4_k_m", "--quant selects GGUF files"),
    ],
)
def test_pull_errors_list_what_exists(store, run, stage, quant, message):
    with pytest.raises(TunectlError) as e:
        plan(store, run, stage, quant)
    assert message in str(e.value)


def _no_bar(total, label):
    import contextlib

    return contextlib.nullcontext(lambda n: None)


@pytest.mark.parametrize(
    ("run", "quant", "message"),
    [
        ("nope", None, "no run 'nope' in file://"),
        ("r2", None, "run r2's gguf stage failed (completed: train)"),
        ("r1", "q2_k", "run r1 has no q2_k GGUF; it has: f16, q4_k_m"),
        ("r1", None, "run r1's gguf manifest has no contract: re-run its gguf stage"),
    ],
)
def test_pull_to_ollama_bad_input_is_one_line_naming_what_exists(store, tmp_path, run, quant, message):
    from tunectl.pull import to_ollama

    store.write_json("runs/r2/run.json", {"run": "r2"})
    store.write_json("runs/r2/state.json", {"train": {"state": "succeeded"}, "gguf": {"state": "failed"}})
    src = tmp_path / "src-r2"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "a.bin").write_bytes(b"a")
    store.publish("r2", "train", src, {})
    with pytest.raises(TunectlError) as e:
        to_ollama(store, run, tmp_path / "out", quant, None, None, _no_bar)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing fetched before the checks


def test_pull_to_ollama_refuses_a_gguf_that_stops_at_another_token(store, tmp_path):
    from tunectl.pull import to_ollama

    manifest = store.manifest("r1", "gguf")
    contract = {"eos_token": "<|im_end|>", "eos_token_id": 2, "stop_token_ids": [2], "stop_tokens": ["<|im_end|>"]}
    manifest.update(contract=contract, smoke=[{"type": "q4_k_m", "eos_token_id": 1}])
    store.write_json("runs/r1/gguf/manifest.json", manifest)
    with pytest.raises(TunectlError, match="the q4_k_m GGUF ends generation at token id 1, but the model was trained"):
        to_ollama(store, "r1", tmp_path / "out", None, None, None, _no_bar)
