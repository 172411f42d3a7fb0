"""The README's main job end to end: `tunectl submit ruozhiba-tiny` on the local backend, on CPU, offline.

Real training steps, a real merge, llama.cpp's own converter and quantizer; then the q4_k_m GGUF is loaded
here in llama.cpp, independently of the pipeline's own smoke test, and must answer the Chinese test prompt
and stop at EOS before the token limit.
"""

from __future__ import annotations

import json
import re

import pytest

from tunectl.recipe import load_recipe

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import os
    import subprocess
    import sys

    store = tmp_path_factory.mktemp("e2e") / "store"
    env = {**os.environ, "TUNECTL_STORE": str(store)}
    proc = subprocess.run(
        [sys.executable, "-m", "tunectl.cli", "submit", "ruozhiba-tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = re.search(r"^run (\S+): stages train -> merge -> gguf", proc.stderr, re.M).group(1)
    return store, run, proc


def test_status_shows_every_stage_succeeded_with_timings(finished_run, tunectl):
    store, run, submit = finished_run
    assert f"run {run} (ruozhiba-tiny, local): succeeded" in submit.stdout
    status = json.loads(tunectl("--store", str(store), "status", run, "-o", "json", check=True).stdout)
    assert status["state"] == "succeeded"
    assert [s["stage"] for s in status["stages"]] == ["train", "merge", "gguf"]
    for s in status["stages"]:
        assert s["state"] == "succeeded" and s["seconds"] > 0 and s["exit_code"] == 0
    train = status["stages"][0]["metrics"]
    assert train["steps"] == load_recipe("ruozhiba-tiny").training.max_steps
    assert train["final_loss"] < train["first_loss"]
    table = tunectl("--store", str(store), "status", run, check=True).stdout
    assert re.search(r"^gguf\s+succeeded\s+\d+\.\d", table, re.M)
    listed = json.loads(tunectl("--store", str(store), "list", "-o", "json", check=True).stdout)
    assert [r["run"] for r in listed] == [run] and listed[0]["state"] == "succeeded"
    assert "[train] train done" in tunectl("--store", str(store), "logs", run, "--stage", "train", check=True).stdout


def test_every_stage_wrote_a_verified_manifest(finished_run):
    from tunectl.store import LocalStore

    store, run, _ = finished_run
    s = LocalStore(store)
    for stage in ("train", "merge", "gguf"):
        art = s.fetch(run, stage)  # verifies every checksum
        m = art.manifest
        assert m["run"] == run and m["stage"] == stage and m["files"]
        assert m["versions"]["torch"] and m["timings"]["seconds"] > 0
    train = s.fetch(run, "train")
    assert {"adapter/adapter_model.safetensors", "loss.json", "loss.png", "generations.json"} <= set(
        train.manifest["files"]
    )
    # SmolLM2's tokenizer says <|im_start|> is EOS while its config says <|im_end|>: training used the config's.
    assert train.manifest["contract"]["eos_token"] == "<|im_end|>" and train.manifest["contract"]["eos_token_id"] == 2
    assert train.manifest["contract"]["pad_token_id"] != 2
    merge = s.fetch(run, "merge")
    gen = json.loads(merge.file("merged-16bit/generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2])
    assert merge.file("lora/adapter_config.json").is_file()
    gguf = s.fetch(run, "gguf")
    for t in ("q4_k_m", "q8_0", "f16"):
        assert f"ruozhiba-tiny-{t}.gguf" in gguf.manifest["files"]
    modelfile = gguf.file("Modelfile").read_text()
    assert modelfile.startswith("FROM ./ruozhiba-tiny-q4_k_m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_q4_k_m_answers_the_chinese_prompt_and_stops(finished_run):
    from llama_cpp import Llama

    store, run, _ = finished_run
    recipe = load_recipe("ruozhiba-tiny")
    prompt = recipe.prompt_for("请用中文回答", "海绵宝宝的书法是不是叫做海绵体？")
    llm = Llama(
        model_path=str(store / "runs" / run / "gguf" / "ruozhiba-tiny-q4_k_m.gguf"), n_ctx=1024, verbose=False, seed=0
    )
    out = llm.create_completion(prompt, max_tokens=128, temperature=0.0, top_k=1)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # EOS, not the 128-token limit
    assert out["usage"]["completion_tokens"] < 128
    assert re.search(r"[\u4e00-\u9fff]", choice["text"]), choice["text"]  # answers in Chinese
