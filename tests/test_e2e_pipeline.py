"""The README's main job end to end: `tunectl submit ruozhiba-tiny` on the local backend, on CPU, offline,
once with a directory as the store and once with a real MinIO.

Real training steps, a real merge, llama.cpp's own converter and quantizer; then the q4_k_m GGUF is pulled
with `tunectl pull`, loaded here in llama.cpp independently of the pipeline's own smoke test, and must answer
the Chinese test prompt and stop at EOS before the token limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from tunectl.recipe import load_recipe
from tunectl.store import sha256_file

pytestmark = pytest.mark.e2e


def _verified(stage_dir: Path) -> dict:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    for rel, meta in manifest["files"].items():
        assert sha256_file(stage_dir / rel) == meta["sha256"], rel
    return manifest


class Run(NamedTuple):
    store: str
    run: str
    submit: subprocess.CompletedProcess[str]
    tunectl: Callable[..., subprocess.CompletedProcess[str]]
    tmp: Path


@pytest.fixture(scope="module", params=["dir", "minio"])
def finished_run(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"e2e-{request.param}")
    env = {**os.environ, "TUNECTL_S3_CACHE": str(base / "s3-cache")}
    if request.param == "minio":
        from conftest import new_bucket

        minio = request.getfixturevalue("minio")
        env.update(minio.env())
        store = f"s3://{new_bucket(minio, 'e2e')}/pipeline"
    else:
        store = str(base / "store")

    def tunectl(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "tunectl.cli", "--store", store, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=3600,
        )
        assert proc.returncode == 0, f"tunectl {' '.join(args)}:\n{proc.stderr[-4000:]}"
        return proc

    submit = tunectl("submit", "ruozhiba-tiny")
    run = re.search(r"^run (\S+): stages train -> merge -> gguf", submit.stderr, re.M).group(1)
    return Run(store, run, submit, tunectl, base)


def test_status_shows_every_stage_succeeded_with_timings(finished_run):
    run, tunectl = finished_run.run, finished_run.tunectl
    assert f"run {run} (ruozhiba-tiny, local): succeeded" in finished_run.submit.stdout
    status = json.loads(tunectl("status", run, "-o", "json").stdout)
    assert status["state"] == "succeeded"
    assert [s["stage"] for s in status["stages"]] == ["train", "merge", "gguf"]
    for s in status["stages"]:
        assert s["state"] == "succeeded" and s["seconds"] > 0 and s["exit_code"] == 0
    train = status["stages"][0]["metrics"]
    assert train["steps"] == load_recipe("ruozhiba-tiny").training.max_steps
    assert train["final_loss"] < train["first_loss"]
    table = tunectl("status", run).stdout
    assert re.search(r"^gguf\s+succeeded\s+\d+\.\d", table, re.M)
    listed = json.loads(tunectl("list", "-o", "json").stdout)
    assert [r["run"] for r in listed] == [run] and listed[0]["state"] == "succeeded"
    assert "[train] train done" in tunectl("logs", run, "--stage", "train").stdout


def test_every_stage_wrote_a_verified_manifest(finished_run):
    run = finished_run.run
    pulled = finished_run.tmp / "pulled"
    out = finished_run.tunectl("pull", run, "--to", str(pulled)).stdout
    assert out.strip() == f"pulled train, merge, gguf of {run} into {pulled}"
    manifests = {stage: _verified(pulled / stage) for stage in ("train", "merge", "gguf")}
    for stage, m in manifests.items():
        assert m["run"] == run and m["stage"] == stage and m["files"]
        assert m["versions"]["torch"] and m["timings"]["seconds"] > 0
    train = manifests["train"]
    assert {"adapter/adapter_model.safetensors", "loss.json", "loss.png", "generations.json"} <= set(train["files"])
    # SmolLM2's tokenizer says <|im_start|> is EOS while its config says <|im_end|>: training used the config's.
    assert (train["contract"]["eos_token"], train["contract"]["eos_token_id"]) == ("<|im_end|>", 2)
    assert train["contract"]["pad_token_id"] != 2
    gen = json.loads((pulled / "merge" / "merged-16bit" / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2])
    assert (pulled / "merge" / "lora" / "adapter_config.json").is_file()
    for t in ("q4_k_m", "q8_0", "f16"):
        assert f"ruozhiba-tiny-{t}.gguf" in manifests["gguf"]["files"]
    modelfile = (pulled / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./ruozhiba-tiny-q4_k_m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_pulled_q4_k_m_answers_the_chinese_prompt_and_stops(finished_run):
    from llama_cpp import Llama

    dest = finished_run.tmp / "q4"
    finished_run.tunectl("pull", finished_run.run, "--quant", "q4_k_m", "--to", str(dest))
    assert sorted(p.name for p in (dest / "gguf").iterdir()) == [
        "Modelfile",
        "manifest.json",
        "ruozhiba-tiny-q4_k_m.gguf",
        "smoke.json",
    ]
    _verified(dest / "gguf")
    recipe = load_recipe("ruozhiba-tiny")
    prompt = recipe.prompt_for("请用中文回答", "海绵宝宝的书法是不是叫做海绵体？")
    llm = Llama(model_path=str(dest / "gguf" / "ruozhiba-tiny-q4_k_m.gguf"), n_ctx=1024, verbose=False, seed=0)
    out = llm.create_completion(prompt, max_tokens=128, temperature=0.0, top_k=1)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # EOS, not the 128-token limit
    assert out["usage"]["completion_tokens"] < 128
    assert re.search(r"[\u4e00-\u9fff]", choice["text"]), choice["text"]  # answers in Chinese
