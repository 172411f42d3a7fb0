"""Bad input gets one clear line, exit code 78, and no run is created (nothing that could look complete)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import no_runs, one_line_error, run_stage

from tunectl.errors import EXIT_CONFIG_ERROR


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nope"], "unknown recipe 'nope': built-in recipes are ruozhiba, ruozhiba-chat-tiny, ruozhiba-tiny"),
        (
            ["ruozhiba-tiny", "--set", "training.max_stepz=3"],
            "unknown key 'training.max_stepz'; did you mean 'max_steps'?",
        ),
        (
            ["ruozhiba-tiny", "--set", "training.max_steps=many"],
            "'training.max_steps': input should be a valid integer",
        ),
        (["ruozhiba-tiny", "--set", "model.name=./no/such/model"], "model ./no/such/model: path does not exist"),
        (["ruozhiba-tiny", "--set", "data.source=./no/such.jsonl"], "data set ./no/such.jsonl: path does not exist"),
    ],
)
def test_submit_rejects_bad_input(tunectl, store, args, expected):
    proc = tunectl("submit", *args)
    assert expected in one_line_error(proc)
    no_runs(store)


@pytest.mark.ml
def test_merged_4bit_without_a_gpu_is_refused_before_training(tunectl, store):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = one_line_error(tunectl("submit", "ruozhiba-tiny", "--set", "export.merged_4bit=true"))
    assert "export.merged_4bit needs a CUDA GPU (bitsandbytes) and this machine has none" in line
    no_runs(store)


def test_data_without_output_column(tunectl, store, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "问", "input": "", "answer": "答"}])
    line = one_line_error(tunectl("submit", "ruozhiba-tiny", "--set", f"data.source={data}"))
    assert f"data set {data} has no 'output' column (found: answer, input, instruction)" in line
    assert "--set data.columns.output=<column>" in line
    no_runs(store)


def test_data_without_instruction_column(tunectl, store, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "问", "output": "答"}])
    assert "has no 'instruction' column" in one_line_error(
        tunectl("submit", "ruozhiba-tiny", "--set", f"data.source={data}")
    )
    no_runs(store)


def test_empty_data_set(tunectl, store, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert f"data set {data} has no rows" in one_line_error(
        tunectl("submit", "ruozhiba-tiny", "--set", f"data.source={data}")
    )
    no_runs(store)


def test_model_directory_without_config(tunectl, store, tmp_path):
    (tmp_path / "m").mkdir()
    line = one_line_error(tunectl("submit", "ruozhiba-tiny", "--set", f"model.name={tmp_path / 'm'}"))
    assert "has no config.json" in line
    no_runs(store)


def test_status_of_unknown_run(tunectl, store):
    proc = tunectl("status", "nope-20260101-000000-abcd")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: no run 'nope-20260101-000000-abcd' in file://{store.resolve()}; no runs yet"


@pytest.mark.ml
def test_train_stage_checks_its_own_input(tmp_path):
    """The stage program, run as a container runs it, exits with the config-error code and publishes nothing."""
    from tunectl.recipe import load_recipe
    from tunectl.stores import LocalStore

    data = _jsonl(tmp_path / "d.parquet.jsonl", [{"instruction": "问", "input": ""}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(load_recipe("ruozhiba-tiny", [f"data.source={data}"]).to_yaml())
    store = tmp_path / "store"
    proc = run_stage("train", recipe, store)
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data set {data} has no 'output' column")
    assert LocalStore(store).manifest("r1", "train") is None


def test_stage_program_without_arguments_is_a_config_error():
    proc = subprocess.run(
        [sys.executable, "-m", "tunectl_jobs.merge"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == EXIT_CONFIG_ERROR
    assert (
        proc.stderr.strip()
        == "error: missing --recipe, --store, --run (or TUNECTL_RECIPE / TUNECTL_STORE / TUNECTL_RUN)"
    )


@pytest.mark.ml
def test_failed_stage_fails_the_run_and_skips_the_rest(tunectl, store, tmp_path):
    """Input only the stage can check (rows longer than max_seq_length, in tokens): the run is marked failed,
    nothing downstream runs."""
    proc = tunectl("submit", "ruozhiba-tiny", "-q", "--set", "model.max_seq_length=64")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage train of run ruozhiba-tiny-") and " failed: data set " in last
    assert "rows are longer than model.max_seq_length (64 tokens" in last and "(full log: tunectl logs " in last
    run = last.split(" of run ")[1].split()[0]
    status = json.loads(tunectl("status", run, "-o", "json", check=True).stdout)
    assert status["state"] == "failed"
    states = {s["stage"]: s for s in status["stages"]}
    assert states["train"]["state"] == "failed" and states["train"]["exit_code"] == EXIT_CONFIG_ERROR
    assert states["merge"]["state"] == "skipped" and states["gguf"]["state"] == "skipped"
    assert not any((store / "runs" / run / s / "manifest.json").exists() for s in ("train", "merge", "gguf"))
