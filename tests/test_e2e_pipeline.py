"""The README's main job end to end: `tunectl submit ruozhiba-tiny` on the local backend, on CPU, offline, with a
real MinIO as the store; every reading test runs on it and on a directory store holding a copy of the run.

Real training steps, a real merge, llama.cpp's own converter and quantizer; then the q4_k_m GGUF is pulled
with `tunectl pull`, loaded here in llama.cpp independently of the pipeline's own smoke test, and must answer
the Chinese test prompt and stop at EOS before the token limit. The same run is pulled into a real Ollama server
and into a directory laid out for vLLM (loaded with transformers, which reads the same files vLLM does).
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
from conftest import cli_on_store

from tunectl.recipe import load_recipe
from tunectl.stores.manifest import sha256_file

pytestmark = [pytest.mark.e2e, pytest.mark.train]


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


@pytest.fixture(scope="module")
def run_on_minio(minio, tmp_path_factory) -> Run:
    """The tiny recipe's pipeline, once for the module, with a real MinIO as the store: every stage fetches its
    inputs from S3 and publishes its outputs there, the local backend keeps the run's state and logs there."""
    from conftest import new_bucket

    base = tmp_path_factory.mktemp("e2e-minio")
    env = {**os.environ, **minio.env(), "TUNECTL_S3_CACHE": str(base / "s3-cache")}
    store = f"s3://{new_bucket(minio, 'e2e')}/pipeline"
    tunectl = cli_on_store(store, env)
    submit = tunectl("submit", "ruozhiba-tiny")
    run = re.search(r"^run (\S+): stages train -> merge -> gguf", submit.stderr, re.M).group(1)
    return Run(store, run, submit, tunectl, base)


def _copy_to_a_directory_store(run: Run, minio, dest: Path) -> None:
    """Every object of the run (its record, state, logs and stage outputs) under the same key in a directory store,
    as the local backend would have written it there (the run-id claim marker aside: a directory store claims with
    mkdir)."""
    from tunectl.stores.s3 import CLAIM

    bucket, prefix = run.store.removeprefix("s3://").split("/", 1)
    client = minio.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/runs/{run.run}/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"].removeprefix(f"{prefix}/")
            if rel.endswith(f"/{CLAIM}"):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest / rel))


@pytest.fixture(scope="module", params=["dir", "minio"])
def finished_run(request, run_on_minio, minio, tmp_path_factory) -> Run:
    """The finished run, read through each store. One training run serves both: the directory store gets a copy of
    the MinIO run's objects (the README's default, a directory store, runs the whole pipeline in the stop-and-resume
    tests below and in test_stage_exit)."""
    if request.param == "minio":
        return run_on_minio
    base = tmp_path_factory.mktemp("e2e-dir")
    store = base / "store"
    _copy_to_a_directory_store(run_on_minio, minio, store)
    tunectl = cli_on_store(str(store), {**os.environ, "TUNECTL_S3_CACHE": str(base / "s3-cache")})
    return Run(str(store), run_on_minio.run, run_on_minio.submit, tunectl, base)


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
    # Where each stage's time went, start-up (imports) first: what a user weighs before skipping sample answers.
    phases = status["stages"][0]["phases"]
    assert list(phases)[:2] == ["start-up", "load data"] and phases["train"] > 0 and "generate before" in phases
    assert re.search(r"^phases \(train, s\): start-up [\d.]+, load data [\d.]+, .*train [\d.]+", table, re.M), table
    # Which of the portable build's CPU variants ggml chose on this machine, named in status.
    from tunectl_jobs import llamarun

    variant = status["stages"][2]["metrics"]["cpu_variant"]
    assert variant in llamarun.cpu_variants() and f"llama.cpp CPU variant {variant}" in table
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


def test_held_out_rows_are_measured_in_training_and_each_gguf_against_f16(finished_run):
    """The tiny recipe holds 8 rows out: training lowers their perplexity; llama.cpp measures each GGUF on the same
    tokens, the f16 file against a second pass of itself (KL divergence 0: the method adds nothing of its own), and
    quantizing to fewer bits moves the model further from it."""
    pulled = finished_run.tmp / "measured"
    finished_run.tunectl("pull", finished_run.run, "--stage", "train", "--to", str(pulled))
    finished_run.tunectl("pull", finished_run.run, "--stage", "gguf", "--quant", "f16", "--to", str(pulled))
    train = _verified(pulled / "train")
    m = train["metrics"]
    recipe = load_recipe("ruozhiba-tiny")
    assert m["eval_rows"] == recipe.data.eval_rows and m["rows_trained"] == 72 - recipe.data.eval_rows
    assert m["eval_perplexity_after"] < m["eval_perplexity_before"]
    history = json.loads((pulled / "train" / "eval.json").read_text())["history"]
    assert [e["step"] for e in history] == [0, 10, 20, 30, 40]  # before, every training.eval_steps, after
    assert history[0]["perplexity"] == m["eval_perplexity_before"] and history[-1]["loss"] == m["eval_loss_after"]
    rows = json.loads((pulled / "train" / "heldout.json").read_text())
    assert rows["source"] == "held-out" and len(rows["rows"]) == recipe.data.eval_rows
    assert sum(sum(r["loss_on"][1:]) for r in rows["rows"]) == m["eval_tokens"]

    fidelity = json.loads((pulled / "gguf" / "manifest.json").read_text())["metrics"]["fidelity"]
    assert (fidelity["reference"], fidelity["source"]) == ("f16", "held-out")
    f = fidelity["types"]
    assert all(f[t]["tokens"] == m["eval_tokens"] for t in ("f16", "q8_0", "q4_k_m")), f
    assert (f["f16"]["kld"], f["f16"]["top1"]) == (0.0, 1.0)
    assert f["q4_k_m"]["kld"] > f["q8_0"]["kld"] > 0
    assert f["q4_k_m"]["top1"] < f["q8_0"]["top1"] < 1
    assert f["q4_k_m"]["perplexity"] > f["f16"]["perplexity"]
    table = finished_run.tunectl("status", finished_run.run).stdout
    before, after = m["eval_perplexity_before"], m["eval_perplexity_after"]
    assert f"held-out perplexity {before:.3f} -> {after:.3f}" in table
    assert f"vs f16: q4_k_m KLD {f['q4_k_m']['kld']:.4f} top-1 {100 * f['q4_k_m']['top1']:.1f}%" in table
    # the f16 GGUF scores the held-out rows as the trained model did in PyTorch (bf16 weights, another engine)
    assert f["f16"]["perplexity"] == pytest.approx(m["eval_perplexity_after"], rel=0.02)


@pytest.mark.browser
def test_the_report_page_renders_in_chromium_with_the_manifests_figures(finished_run):
    """`tunectl report` writes one page; Chromium (headless, no network) opens it without a console message, and
    the loss chart, the answers and the GGUF table in its DOM carry the manifests' numbers. The screenshot is kept
    (TUNECTL_TEST_ARTIFACTS, default test-artifacts/ in the repository)."""
    from conftest import REPO, chromium
    from playwright.sync_api import sync_playwright

    run = finished_run.run
    page_file = finished_run.tmp / "report.html"
    out = finished_run.tunectl("report", run, "--output", str(page_file), "--gpu-hour-price", "2.5").stdout
    assert out.strip() == f"report: {page_file}"
    doc = json.loads(finished_run.tunectl("report", run, "-o", "json", "--gpu-hour-price", "2.5").stdout)
    status = json.loads(finished_run.tunectl("status", run, "-o", "json").stdout)
    assert [s["seconds"] for s in doc["stages"]] == [s["seconds"] for s in status["stages"]]
    train = status["stages"][0]["metrics"]
    assert doc["training"]["final_loss"] == train["final_loss"] and len(doc["training"]["losses"]) == train["steps"]
    assert doc["gpu"] == {"device": "cpu", "gpu_hours": 0.0, "price_per_gpu_hour": 2.5, "estimated_cost": 0.0,
                          "peak_memory_gib": None}  # fmt: skip
    html = page_file.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html

    artifacts = Path(os.environ.get("TUNECTL_TEST_ARTIFACTS") or REPO / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / f"report-{'minio' if finished_run.store.startswith('s3://') else 'dir'}.png"
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=flags)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            messages: list[str] = []
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"page error: {e}"))
            page.on("request", lambda r: None if r.url.startswith("file:") else messages.append(f"fetch: {r.url}"))
            page.goto(page_file.as_uri())
            assert page.text_content("#state") == "succeeded"
            training = page.locator('#loss-chart polyline[data-series="training"]').get_attribute("points")
            assert len(training.split()) == train["steps"]
            held_out = page.locator('#loss-chart polyline[data-series="held-out"]').get_attribute("points")
            assert len(held_out.split()) == 5
            table = page.locator("#gguf-table tbody tr")
            assert table.count() == 3
            cells = {table.nth(i).locator("td").nth(0).inner_text(): table.nth(i).locator("td").all_inner_texts()
                     for i in range(3)}  # fmt: skip
            for q in doc["gguf"]:
                row = cells[q["type"]]
                assert row[1] == f"{q['size_mib']:.5g}" and q["smoke_answer"].strip()[:10] in row[2]
                assert row[4] == f"{q['kld']:.3g}" and row[6] == f"{100 * q['top1']:.1f}%"
            answers = page.locator("#answers tbody tr")
            assert answers.count() == len(load_recipe("ruozhiba-tiny").test_prompts)
            assert "海绵宝宝" in answers.nth(0).inner_text()
            assert page.locator("#stages tbody tr").count() == 3
            page.screenshot(path=str(shot), full_page=True)
            assert messages == []
        finally:
            browser.close()
    assert shot.stat().st_size > 50_000  # a full page with three charts and four tables, not a blank one


def test_pulled_q4_k_m_answers_the_chinese_prompt_and_stops(finished_run):
    from tunectl_jobs import llamarun

    dest = finished_run.tmp / "q4"
    finished_run.tunectl("pull", finished_run.run, "--quant", "q4_k_m", "--to", str(dest))
    assert sorted(p.name for p in (dest / "gguf").iterdir()) == [
        "Modelfile",
        "fidelity.json",
        "manifest.json",
        "ruozhiba-tiny-q4_k_m.gguf",
        "smoke.json",
    ]
    _verified(dest / "gguf")
    recipe = load_recipe("ruozhiba-tiny")
    prompt = recipe.prompt_for("请用中文回答", "海绵宝宝的书法是不是叫做海绵体？")
    # In a child process of its own (a crash there is a failed assertion here, not a dead test run).
    out = llamarun.answer_in_child(dest / "gguf" / "ruozhiba-tiny-q4_k_m.gguf", prompt, 128)
    assert "error" not in out, out
    assert out["finish_reason"] == "stop", out  # EOS, not the 128-token limit
    assert out["completion_tokens"] < 128
    assert re.search(r"[\u4e00-\u9fff]", out["answer"]), out["answer"]  # answers in Chinese
    assert out["cpu_variant"] in llamarun.cpu_variants()


TEST_PROMPT = ("请用中文回答", "海绵宝宝的书法是不是叫做海绵体？")


@pytest.mark.parametrize("quant", ["q4_k_m", "f16"])
def test_pull_into_ollama_answers_chinese_and_stops(finished_run, ollama_server, quant):
    """`pull --to ollama` creates the model on a real server and checks one generation; here the server is asked
    again through its HTTP API with the Chinese test prompt. The Modelfile's TEMPLATE must give the model the
    training prompt: Ollama's answer through it is, token for token, its answer to the training prompt sent raw
    (the same engine, so the same rounding), and that prompt is as many tokens as llama.cpp makes of it. Against
    llama.cpp's own answer (another ggml build) the pull only reports: greedy answers of two builds can part
    where two tokens are nearly tied."""
    from tunectl_jobs import llamarun

    run, dest, name = finished_run.run, finished_run.tmp / f"ollama-{quant}", f"tiny-{quant}:latest"
    out = finished_run.tunectl(
        "pull",
        run,
        "--to",
        "ollama",
        str(dest),
        "--quant",
        quant,
        "--name",
        name,
        "--ollama-host",
        ollama_server.url,
        extra_env={"TUNECTL_OLLAMA": ollama_server.binary},
    ).stdout
    assert f"created {name} on {ollama_server.url}" in out
    assert re.search(r"answered in \d+ tokens and stopped", out), out
    modelfile = (dest / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./ruozhiba-tiny-{quant}.gguf\n")

    show = ollama_server.run("show", name)
    assert show.returncode == 0 and "llama" in show.stdout, show.stderr
    shown = ollama_server.run("show", name, "--modelfile")
    assert shown.returncode == 0, shown.stderr
    assert "### Instruction:\n{{ .System }}\n\n### Input:\n{{ .Prompt }}" in shown.stdout
    assert re.search(r"^PARAMETER stop \"?<\|im_end\|>\"?$", shown.stdout, re.M), shown.stdout

    answer = ollama_server.ask("generate", name, system=TEST_PROMPT[0], prompt=TEST_PROMPT[1])
    assert answer["done_reason"] == "stop" and answer["eval_count"] < 128, answer
    assert re.search(r"[\u4e00-\u9fff]", answer["response"]), answer["response"]
    assert re.search(r"answer is (the same as|DIFFERENT from) llama\.cpp's on this GGUF", out), out
    prompt = load_recipe("ruozhiba-tiny").prompt_for(*TEST_PROMPT)
    raw = ollama_server.ask("generate", name, prompt=prompt, raw=True)
    assert (raw["response"], raw["prompt_eval_count"]) == (answer["response"], answer["prompt_eval_count"])
    direct = llamarun.answer_in_child(dest / "gguf" / f"ruozhiba-tiny-{quant}.gguf", prompt, 128)
    assert answer["prompt_eval_count"] == direct["prompt_tokens"], (answer, direct)


def test_pull_into_ollama_without_a_client_leaves_files_and_the_command(finished_run, tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH with python only: no ollama client to find
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    no_client = {"TUNECTL_OLLAMA": "", "PATH": str(tmp_path / "bin"), "OLLAMA_HOST": ""}
    dest = finished_run.tmp / "ollama-files"
    out = finished_run.tunectl("pull", finished_run.run, "--to", "ollama", str(dest), extra_env=no_client).stdout
    assert "no Ollama client here" in out
    hint = (
        f"cd {dest / 'gguf'} && OLLAMA_HOST=http://127.0.0.1:11434 ollama create {finished_run.run}:q4_k_m -f Modelfile"
    )
    assert hint in out
    assert (dest / "gguf" / "Modelfile").is_file() and (dest / "gguf" / "ruozhiba-tiny-q4_k_m.gguf").is_file()


def _generate_stops(model, tok, messages: list[dict], max_new_tokens: int = 128) -> tuple[str, list[int]]:
    import torch

    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)  # EOS from generation_config
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def test_pull_into_vllm_layout_loads_prompts_like_training_and_stops(finished_run):
    """The directory vLLM would serve, read by transformers: the chat template gives the training prompt (not
    SmolLM2's ChatML), generation_config's EOS ends the answer before the limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dest = finished_run.tmp / "vllm"
    out = finished_run.tunectl("pull", finished_run.run, "--to", "vllm", str(dest)).stdout
    assert f"vllm serve {dest} --served-model-name {finished_run.run}" in out
    assert "/v1/chat/completions" in out
    # the merge stage fixed the export already (SmolLM2's ChatML template replaced), so the pull has nothing to fix
    notes = _verified(dest / ".tunectl" / "merge")["notes"]
    assert any(n.startswith("merged-16bit/chat_template.jinja: replaced") for n in notes), notes
    assert "fixed" not in out
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in dest.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(dest)
    assert tok.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(dest).eos_token_id == tok.eos_token_id == 2
    messages = [{"role": "system", "content": TEST_PROMPT[0]}, {"role": "user", "content": TEST_PROMPT[1]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == load_recipe("ruozhiba-tiny").prompt_for(*TEST_PROMPT)
    model = AutoModelForCausalLM.from_pretrained(dest)
    text, new = _generate_stops(model, tok, messages)
    assert new[-1] == 2 and len(new) < 128, text
    assert re.search(r"[\u4e00-\u9fff]", text), text


def test_pull_adapter_for_vllm_serves_on_its_base(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = finished_run.tmp / "vllm-lora"
    out = finished_run.tunectl(
        "pull", finished_run.run, "--to", "vllm", str(dest), "--adapter", "--name", "tiny"
    ).stdout
    merge = json.loads((dest / ".tunectl" / "merge" / "manifest.json").read_text())
    base = merge["inputs"]["merge_base"]
    assert f"vllm serve {base} --enable-lora --lora-modules tiny={dest} --max-lora-rank 16" in out
    tok = AutoTokenizer.from_pretrained(dest)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dest)
    text, new = _generate_stops(model, tok, [{"role": "user", "content": "为什么天是蓝的？"}])
    assert new[-1] == 2 and len(new) < 128, text


def _gguf_stage_again(
    finished_run: Run, tmp_path: Path, export: dict | None = None, max_new_tokens: int | None = None
) -> tuple[int, Path]:
    """The real gguf stage run again on a copy of the finished run (its train and merge outputs, no gguf), with
    `export` merged into the recipe's and the first test prompt's max_new_tokens set when given: its exit code and
    the copy's run directory."""
    import shutil

    import yaml

    from tunectl_jobs import gguf

    run = finished_run.run
    src = Path(finished_run.store) / "runs" / run
    store = tmp_path / "store"
    shutil.copytree(src, store / "runs" / run, ignore=lambda d, names: ["gguf", ".scratch"] if d == str(src) else [])
    recipe_file = store / "runs" / run / "recipe.yaml"
    if export or max_new_tokens:
        recipe = yaml.safe_load(recipe_file.read_text())
        recipe["export"] |= export or {}
        if max_new_tokens:
            recipe["test_prompts"][0]["max_new_tokens"] = max_new_tokens
        recipe_file.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return gguf.main(["--recipe", str(recipe_file), "--store", str(store), "--run", run]), store / "runs" / run


@pytest.mark.parametrize("finished_run", ["dir"], indirect=True)  # the directory store's run is copied
def test_a_gguf_whose_llama_cpp_crashes_fails_the_export_and_names_the_file(
    finished_run, tmp_path, monkeypatch, capsys
):
    """The real gguf stage on a copy of the finished run, with a smoke-test child that segfaults on the q4_k_m
    file (as llama.cpp did on an AMX CPU): that file is named with the signal, the other files are still tested
    and answer, the stage exits 1, and no manifest is published (the export is not complete)."""
    from tunectl_jobs import gguf, llamarun

    crash = tmp_path / "crash_on_q4.py"
    crash.write_text(
        "import io, json, os, runpy, signal, sys\n"
        "req = sys.stdin.read()\n"
        "if json.loads(req)['gguf'].endswith('-q4_k_m.gguf'):\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "sys.stdin, sys.argv = io.StringIO(req), ['llamarun', 'answer']\n"
        f"runpy.run_path({llamarun.__file__!r}, run_name='__main__')\n"
    )
    monkeypatch.setattr(gguf, "SMOKE_COMMAND", [sys.executable, str(crash)])
    rc, run_dir = _gguf_stage_again(finished_run, tmp_path)
    err = capsys.readouterr().err
    assert rc == 1
    assert (
        "error: killed by SIGSEGV during 'smoke test' of ruozhiba-tiny-q4_k_m.gguf (llama.cpp crashed) "
        "(q8_0, f16 answered): a GGUF that cannot be run is a failed export"
    ) in err
    assert not (run_dir / "gguf" / "manifest.json").exists()
    smoke = json.loads((run_dir / ".scratch" / "gguf" / "smoke.json").read_text())
    by_type = {s["type"]: s for s in smoke}
    assert "error" in by_type["q4_k_m"]
    for t in ("q8_0", "f16"):
        assert by_type[t]["finish_reason"] == "stop" and by_type[t]["cpu_variant"] in llamarun.cpu_variants()


@pytest.mark.parametrize("finished_run", ["dir"], indirect=True)
@pytest.mark.parametrize("check", ["stop", "answer", "off"])
def test_the_smoke_test_checks_what_export_smoke_test_asks(finished_run, tmp_path, capsys, check):
    """The gguf stage again on a copy of the run, with a 2-token answer budget the model cannot stop within: `stop`
    fails the export, `answer` accepts the cut answer and says so in the manifest, `off` runs no GGUF at all."""
    rc, run_dir = _gguf_stage_again(finished_run, tmp_path, {"gguf": ["q8_0"], "smoke_test": check}, max_new_tokens=2)
    err = capsys.readouterr().err
    manifest = run_dir / "gguf" / "manifest.json"
    if check == "stop":
        assert rc == 1 and "GGUF q8_0 did not answer and stop at EOS within 2 tokens" in err
        assert not manifest.exists()
        return
    assert rc == 0, err
    doc = json.loads(manifest.read_text())
    if check == "answer":
        assert doc["smoke"][0]["finish_reason"] == "length" and doc["smoke"][0]["check"] == "answer"
        assert "q8_0 answered up to the token limit: accepted (export.smoke_test: answer)" in doc["notes"]
    else:
        assert doc["smoke"] == [] and "no smoke test (export.smoke_test: off): no GGUF was run" in doc["notes"]


@pytest.mark.parametrize("finished_run", ["dir"], indirect=True)  # the directory store's run is copied
def test_an_export_further_from_f16_than_export_max_kld_fails_and_names_the_type(finished_run, tmp_path, capsys):
    """The gguf stage again on a copy of the run, asked for q4_k_m only with export.max_kld below what q4_k_m
    measures: the export fails in one line naming the type and its KL divergence, and publishes nothing."""
    rc, run_dir = _gguf_stage_again(finished_run, tmp_path, {"gguf": ["q4_k_m"], "max_kld": 0.01})
    assert rc == 1
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: "))
    assert re.fullmatch(
        r"error: GGUF q4_k_m's mean KL divergence from f16 is 0\.0\d+, above export\.max_kld 0\.01 \(see \S+"
        r"fidelity\.json\): keep a higher-precision type",
        line,
    ), line
    assert not (run_dir / "gguf" / "manifest.json").exists()


def _submit_and_stop_in_training(env: dict[str, str], sets: list[str]) -> tuple[str, int, str]:
    """`tunectl submit ruozhiba-tiny --set ...` stopped by SIGTERM once (rank 0's) progress bar passes step 12 of 40:
    the run id, the step whose checkpoint was saved, and what submit printed."""
    import select
    import signal
    import time

    submit = subprocess.Popen(
        [sys.executable, "-m", "tunectl.cli", "submit", "ruozhiba-tiny", *(a for s in sets for a in ("--set", s))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert submit.stderr is not None
    seen, deadline = b"", time.monotonic() + 900
    while time.monotonic() < deadline:
        if select.select([submit.stderr], [], [], 1)[0]:
            seen += os.read(submit.stderr.fileno(), 65536)
        if re.search(rb"\b1[2-9]/40 \[", seen) or submit.poll() is not None:
            break
    submit.send_signal(signal.SIGTERM)
    out, err = submit.communicate(timeout=300)
    text = (seen + err).decode(errors="replace")
    run = re.search(r"^run (\S+): stages train -> merge", text, re.M).group(1)
    assert submit.returncode == 130, text[-3000:]
    step = int(re.search(r"checkpoint at step (\d+) saved to the store \(sigterm", text).group(1))
    assert 12 <= step < 40
    return run, step, text


def _resume_with_the_reference_losses(
    finished_run: Run, env: dict[str, str], run: str, step: int, tolerance: float
) -> subprocess.CompletedProcess[str]:
    """`status` shows the stopped run's checkpoint; `tunectl resume` goes on from it and succeeds; every one of the
    40 steps' losses equals the uninterrupted single-process run's within `tolerance`. The resume's output."""
    cli = [sys.executable, "-m", "tunectl.cli"]
    status = subprocess.run([*cli, "status", run], capture_output=True, text=True, env=env).stdout
    assert re.search(rf"^train\s+cancelled .*checkpoint at step {step} \(\d+s old, sigterm\)", status, re.M), status
    resumed = subprocess.run([*cli, "resume", run], capture_output=True, text=True, env=env, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step} (checkpoint in the store)" in resumed.stderr
    assert f"run {run} (ruozhiba-tiny, local): succeeded" in resumed.stdout
    reference = json.loads((Path(finished_run.store) / "runs" / finished_run.run / "train" / "loss.json").read_text())
    losses = json.loads((Path(env["TUNECTL_STORE"]) / "runs" / run / "train" / "loss.json").read_text())
    assert [h["step"] for h in losses] == [h["step"] for h in reference] == list(range(1, 41))
    for ours, theirs in zip(losses, reference, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=tolerance, abs=tolerance), (ours, theirs)
    # The two attempts trained as many tokens as the uninterrupted run; the rate is this attempt's tokens over its
    # time; the stage's time counts both attempts.
    metrics = json.loads((Path(env["TUNECTL_STORE"]) / "runs" / run / "train" / "manifest.json").read_text())["metrics"]
    assert metrics["tokens_trained"] == reference[-1]["num_tokens"] and metrics["tokens_basis"] == "counted"
    after_resume = reference[-1]["num_tokens"] - reference[step - 1]["num_tokens"]
    assert metrics["tokens_per_s"] * metrics["train_seconds"] == pytest.approx(after_resume, rel=0.01)
    assert re.search(r"^train\s+succeeded .*; 2 attempts, \d+s before this one", resumed.stdout, re.M), resumed.stdout
    report = json.loads(subprocess.run([*cli, "report", run, "-o", "json"], capture_output=True, text=True, env=env,
                                       check=True).stdout)  # fmt: skip
    train = report["stages"][0]
    assert train["stage"] == "train" and train["attempts"] == 2 and train["earlier_seconds"] > 0
    return resumed


@pytest.mark.parametrize("finished_run", ["dir"], indirect=True)  # its uninterrupted losses are the reference
def test_a_local_run_stopped_mid_training_resumes_with_the_same_losses(finished_run, tmp_path):
    """SIGTERM to `tunectl submit` in the middle of training: the train stage finishes its step, saves a checkpoint
    to the store and exits 75; the run is cancelled and `status` shows the checkpoint. `tunectl resume` goes on from
    it, and every step's loss equals the uninterrupted run's (same data order, same RNG); once train has published,
    its checkpoints are gone."""
    store = tmp_path / "store"
    env = {**os.environ, "TUNECTL_STORE": str(store), "TUNECTL_BACKEND": "local"}
    cli = [sys.executable, "-m", "tunectl.cli"]
    # No gguf stage: the losses are the point, and the recipe's training part is the reference run's.
    run, step, text = _submit_and_stop_in_training(env, ["export.gguf=[]"])
    assert f"run {run} cancelled (`tunectl resume {run}` goes on)" in text

    resumed = _resume_with_the_reference_losses(finished_run, env, run, step, tolerance=1e-4)
    assert f"note (train): resumed from step {step}" in resumed.stdout
    assert not (store / "runs" / run / "checkpoints" / "train").exists()
    again = subprocess.run([*cli, "resume", run], capture_output=True, text=True, env=env)
    assert (
        again.returncode == 78 and again.stderr.strip() == f"error: run {run} has already succeeded: nothing to resume"
    )


@pytest.mark.parametrize("finished_run", ["dir"], indirect=True)  # its single-process losses are the reference
def test_two_process_training_stopped_and_resumed_matches_one_process_and_exports_a_gguf_that_stops(
    finished_run, tmp_path
):
    """`training.nproc_per_node: 2` on the CPU: torchrun's agent starts two gloo workers (DDP), each taking half of
    every batch, with gradient accumulation halved so a step sees the same 4 rows (`global_batch_size: 4` checks it).
    SIGTERM mid-training reaches both workers through the agent: they stop after the same step, rank 0 saves the
    checkpoint, and all exit 75; `tunectl resume` goes on from it. Every step's loss equals the single-process run's,
    only rank 0 published, both ranks' logs are in the stage log, and the q4_k_m GGUF answers and stops at EOS (the
    gguf stage's smoke test)."""
    store = tmp_path / "store"
    env = {**os.environ, "TUNECTL_STORE": str(store), "TUNECTL_BACKEND": "local"}
    sets = ["training.nproc_per_node=2", "training.gradient_accumulation_steps=2", "training.global_batch_size=4",
            "training.sample_answers=false", "export.gguf=[q4_k_m]"]  # fmt: skip
    run, step, text = _submit_and_stop_in_training(env, sets)
    assert "torchrun: 2 processes x 1 nodes (this is node 0)" in text
    assert re.search(r"^\[rank1\] .*SIGTERM: saving a checkpoint after the current step", text, re.M), text[-3000:]
    _resume_with_the_reference_losses(finished_run, env, run, step, tolerance=2e-3)
    run_dir = store / "runs" / run
    train = _verified(run_dir / "train")
    assert train["metrics"]["processes"] == 2 and train["metrics"]["rows_per_step"] == 4
    assert not list((run_dir / ".scratch").glob("train.rank*"))  # rank 1's scratch is gone; it published nothing
    log = (run_dir / "logs" / "train.log").read_text(errors="replace")
    assert re.search(r"^\[rank1\] .*\[train\] load model done", log, re.M) and "[rank0] " in log
    smoke = json.loads((run_dir / "gguf" / "smoke.json").read_text())
    assert [s["type"] for s in smoke] == ["q4_k_m"] and smoke[0]["finish_reason"] == "stop", smoke
