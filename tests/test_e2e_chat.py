"""The chat recipe end to end: `tunectl submit ruozhiba-chat-tiny` (SmolLM2-135M-Instruct in its own ChatML
template, the bundled conversations, loss on the assistant's turns) on the local backend with a real MinIO as the
store, then the results served the two ways users serve them.

Ollama: the Modelfile's Go TEMPLATE must give the model the same text the Jinja template gave it in training. A
real Ollama server is asked through /api/chat, first one question (the template adds SmolLM2's default system
message), then a two-turn conversation with a system message; each greedy answer must stop at <|im_end|> and be,
token for token, Ollama's answer to the Jinja-rendered prompt sent raw (the same engine, so any difference is the
template's), which is as many tokens as llama.cpp makes of it. vLLM: the pulled directory's chat template, read by
transformers (which vLLM uses for it), must give the token ids training used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import cli_on_store

from tunectl.recipe import load_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.train]

RECIPE = "ruozhiba-chat-tiny"
HAN = re.compile(r"[\u4e00-\u9fff]")
FIRST = [{"role": "user", "content": "为什么冬天的太阳晒着不热？"}]
FOLLOW_UP = {"role": "user", "content": "那夏天呢？"}
SYSTEM = {"role": "system", "content": "回答要简短、有礼貌。"}


class ChatRun(NamedTuple):
    run: str
    tunectl: Any
    tmp: Path
    store: str


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, minio) -> ChatRun:
    from conftest import new_bucket

    base = tmp_path_factory.mktemp("e2e-chat")
    env = {**os.environ, **minio.env(), "TUNECTL_S3_CACHE": str(base / "s3-cache")}
    store = f"s3://{new_bucket(minio, 'chat')}/runs"

    tunectl = cli_on_store(store, env)

    submit = tunectl("submit", RECIPE)
    run = re.search(r"^run (\S+): stages train -> merge -> gguf", submit.stderr, re.M).group(1)
    return ChatRun(run, tunectl, base, store)


@pytest.fixture(scope="module")
def vllm_dir(chat_run) -> Path:
    dest = chat_run.tmp / "vllm"
    out = chat_run.tunectl("pull", chat_run.run, "--to", "vllm", str(dest)).stdout
    assert f"vllm serve {dest} --served-model-name {chat_run.run}" in out
    assert "fixed" not in out  # the merge stage wrote the contract's template and stops already
    return dest


@pytest.fixture(scope="module")
def train_dir(chat_run) -> Path:
    dest = chat_run.tmp / "pulled"
    chat_run.tunectl("pull", chat_run.run, str(dest), "--stage", "train")
    return dest / "train"


def test_the_chat_run_trains_on_answers_and_its_gguf_carries_the_trained_template(chat_run, train_dir, vllm_dir):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    status = json.loads(chat_run.tunectl("status", chat_run.run, "-o", "json").stdout)
    assert [(s["stage"], s["state"]) for s in status["stages"]] == [
        ("train", "succeeded"), ("merge", "succeeded"), ("gguf", "succeeded")
    ]  # fmt: skip
    contract = json.loads((train_dir / "manifest.json").read_text())["contract"]
    assert (contract["format"], contract["train_on"], contract["stop_tokens"]) == (
        "messages",
        "assistant",
        ["<|im_end|>"],
    )
    assert "<|im_start|>" in contract["chat_template"] and "{{ range .Messages }}" in contract["ollama_template"]
    losses = [e["loss"] for e in json.loads((train_dir / "loss.json").read_text())]
    assert len(losses) == load_recipe(RECIPE).training.max_steps and min(losses[-5:]) < losses[0]

    gguf_dir = chat_run.tmp / "gguf"
    chat_run.tunectl("pull", chat_run.run, "--quant", "q4_k_m", "--to", str(gguf_dir))
    reader = GGUFReader(str(gguf_dir / "gguf" / f"{RECIPE}-q4_k_m.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == contract["chat_template"]
    # llama.cpp read the rendered smoke prompt into the tokens transformers makes of it (<|im_start|> is one token)
    tok = AutoTokenizer.from_pretrained(vllm_dir)
    smoke = json.loads((gguf_dir / "gguf" / "smoke.json").read_text())
    prompt = load_recipe(RECIPE).test_prompts[0].messages()
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert {(e["type"], e["prompt_tokens"], e["finish_reason"]) for e in smoke} == {
        (q, len(ids), "stop") for q in ("q4_k_m", "q8_0", "f16")
    }
    # No rows held out: each GGUF's fidelity is measured on the first training conversations' answers.
    fidelity = json.loads((gguf_dir / "gguf" / "manifest.json").read_text())["metrics"]["fidelity"]
    assert fidelity["source"] == "training" and fidelity["types"]["f16"]["kld"] == 0.0
    assert fidelity["types"]["q4_k_m"]["kld"] > fidelity["types"]["q8_0"]["kld"] > 0


def test_a_two_turn_conversation_through_ollama_chat_is_rendered_as_in_training_and_stops(
    chat_run, vllm_dir, ollama_server
):
    from transformers import AutoTokenizer

    from tunectl_jobs import llamarun

    dest, name = chat_run.tmp / "ollama", "chat-tiny:f16"
    out = chat_run.tunectl(
        "pull", chat_run.run, "--to", "ollama", str(dest), "--quant", "f16", "--name", name,
        "--ollama-host", ollama_server.url, extra_env={"TUNECTL_OLLAMA": ollama_server.binary},
    ).stdout  # fmt: skip
    assert f"created {name} on {ollama_server.url}" in out and "answered in" in out, out
    shown = ollama_server.run("show", name, "--modelfile")
    assert shown.returncode == 0 and "{{ range .Messages }}" in shown.stdout, shown.stderr
    assert re.search(r"^PARAMETER stop \"?<\|im_end\|>\"?$", shown.stdout, re.M), shown.stdout

    tok = AutoTokenizer.from_pretrained(vllm_dir)  # the trained template, as transformers and vLLM render it
    gguf = dest / "gguf" / f"{RECIPE}-f16.gguf"
    first = ollama_server.ask("chat", name, messages=FIRST)
    conversation = [SYSTEM, *FIRST, {"role": "assistant", "content": first["message"]["content"]}, FOLLOW_UP]
    second = ollama_server.ask("chat", name, messages=conversation)
    for messages, reply in ((FIRST, first), (conversation, second)):
        answer = reply["message"]["content"]
        assert reply["done_reason"] == "stop" and reply["eval_count"] < 128, reply
        assert HAN.search(answer), answer
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        raw = ollama_server.ask("generate", name, prompt=prompt, raw=True)
        assert (raw["response"], raw["prompt_eval_count"]) == (answer, reply["prompt_eval_count"]), (raw, reply)
        direct = llamarun.answer_in_child(gguf, prompt, 128)
        assert reply["prompt_eval_count"] == direct["prompt_tokens"], (reply, direct)
    assert "SmolLM" in tok.apply_chat_template(FIRST, tokenize=False)  # the default system message was in both


def test_the_vllm_layout_renders_conversations_into_the_tokens_training_used_and_stops(chat_run, vllm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunectl_jobs import chat

    contract = json.loads((vllm_dir / ".tunectl" / "merge" / "manifest.json").read_text())["contract"]
    tok = AutoTokenizer.from_pretrained(vllm_dir)
    assert (tok.eos_token, GenerationConfig.from_pretrained(vllm_dir).eos_token_id) == ("<|im_end|>", 2)
    base = AutoTokenizer.from_pretrained(contract["base_model"])
    conversation = [SYSTEM, *FIRST, {"role": "assistant", "content": "因为冬天阳光斜着照过来。"}, FOLLOW_UP]
    for messages in (conversation, conversation[1:]):
        served = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        trained, _ = chat.tokenize(base, contract["chat_template"], messages, [2], masks=False)
        assert served == trained

    model = AutoModelForCausalLM.from_pretrained(vllm_dir)
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=128, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
    assert new[-1] == 2 and len(new) < 128
    assert HAN.search(tok.decode(new, skip_special_tokens=True))
