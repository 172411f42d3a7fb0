"""The serving contract on real files: SmolLM2's exported tokenizer reports `<|im_start|>` as EOS while its configs
say `<|im_end|>` and pad with the EOS; its chat template is ChatML, not the Alpaca prompt the recipe trains on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunectl.contract import ContractError, chat_template, check_model_dir
from tunectl.ollama import modelfile
from tunectl.recipe import load_recipe

pytestmark = pytest.mark.ml

pytest.importorskip("transformers")

RECIPE = load_recipe("ruozhiba-tiny")
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from tunectl_jobs.models import base_model_path

    return Path(base_model_path(RECIPE.model.name))


@pytest.fixture(scope="module")
def contract(base_dir: Path) -> dict:
    """What the train stage records: the EOS and pad it trained with, and the prompt template."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from tunectl_jobs.models import resolve_token_contract

    tok = AutoTokenizer.from_pretrained(base_dir)
    c = resolve_token_contract(tok, AutoConfig.from_pretrained(base_dir), GenerationConfig.from_pretrained(base_dir))
    return {**c, "prompt_template": RECIPE.data.prompt_template}


@pytest.fixture
def export(base_dir: Path, tmp_path: Path) -> Path:
    """The base model's configs and tokenizer as a merged export would carry them (weights are not read)."""
    for name in FILES:
        shutil.copy(base_dir / name, tmp_path / name)
    return tmp_path


def test_smollm2_trap_is_fixed_from_the_manifest(export, contract):
    from transformers import AutoTokenizer, GenerationConfig

    assert json.loads((export / "tokenizer_config.json").read_text())["eos_token"] == "<|im_start|>"
    fixed = check_model_dir(export, contract)
    assert [f.split(":")[0] for f in fixed] == [
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
    ]
    tok = AutoTokenizer.from_pretrained(export)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == contract["pad_token_id"] != 2
    gen = GenerationConfig.from_pretrained(export)
    assert gen.eos_token_id == 2 and gen.pad_token_id == contract["pad_token_id"]
    assert json.loads((export / "config.json").read_text())["pad_token_id"] == contract["pad_token_id"]
    assert check_model_dir(export, contract) == []  # a second pass finds nothing to fix


def test_chat_template_renders_the_training_prompt(export, contract):
    from transformers import AutoTokenizer

    check_model_dir(export, contract)
    tok = AutoTokenizer.from_pretrained(export)

    def render(messages, **kw):
        return tok.apply_chat_template(messages, tokenize=False, **kw)

    q = "为什么天是蓝的？"
    assert render([{"role": "user", "content": q}], add_generation_prompt=True) == RECIPE.prompt_for(q)
    # a system message is the instruction and the user message its input, as in the data's rows with an input
    sys_and_user = [{"role": "system", "content": "请用中文回答"}, {"role": "user", "content": q}]
    assert render(sys_and_user, add_generation_prompt=True) == RECIPE.prompt_for("请用中文回答", q)
    # a whole example renders as the training text: prompt, answer, EOS
    example = render([{"role": "user", "content": q}, {"role": "assistant", "content": "因为散射。"}])
    assert example == RECIPE.prompt_for(q) + "因为散射。<|im_end|>"


def test_eos_with_another_id_is_refused(export, contract):
    with pytest.raises(ContractError, match=r"maps EOS '<\|im_end\|>' to id 2, but the model was trained to emit id 5"):
        check_model_dir(export, {**contract, "eos_token_id": 5, "stop_token_ids": [5]})


def test_manifest_without_a_prompt_template_is_refused(export, contract):
    incomplete = {k: v for k, v in contract.items() if k != "prompt_template"}
    with pytest.raises(ContractError, match="no 'prompt_template' in its contract"):
        check_model_dir(export, incomplete)


def test_bos_is_written_where_the_tokenizer_adds_it(export, contract):
    """Llama 3's post-processor prepends <|begin_of_text|>; a chat prompt rendered without special tokens needs
    it in the template, or the served prompt lacks the BOS every training example began with."""
    tok_json = json.loads((export / "tokenizer.json").read_text())
    tok_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (export / "tokenizer.json").write_text(json.dumps(tok_json))
    check_model_dir(export, contract)
    assert (export / "chat_template.jinja").read_text() == chat_template(RECIPE.data.prompt_template, "<|im_start|>")
    assert "bos_token" in (export / "chat_template.jinja").read_text()


def test_modelfile_renders_both_prompt_shapes_and_stops(contract):
    text = modelfile("m-q4_k_m.gguf", contract)
    assert text.startswith('FROM ./m-q4_k_m.gguf\nTEMPLATE """{{ if .System }}')
    assert "### Instruction:\n{{ .System }}\n\n### Input:\n{{ .Prompt }}\n\n### Response:\n{{ else }}" in text
    assert '### Instruction:\n{{ .Prompt }}\n\n### Input:\n\n\n### Response:\n{{ end }}"""' in text
    assert text.endswith('PARAMETER stop "<|im_end|>"\n')
    # str.format's {{{{ is a literal {{: text with braces goes to Go as a string literal (tests/hostile renders it)
    braces = {**contract, "prompt_template": "Q {{{{x}}}}: {instruction} {input}\nA: {output}"}
    assert '{{ "Q {{x}}: " }}{{ .Prompt }}' in modelfile("m.gguf", braces)


def test_a_chat_run_keeps_the_template_it_trained_with_and_vllm_renders_what_training_saw(export, contract):
    """A conversation run's contract carries its chat template (here the base model's own ChatML): the export keeps
    it in both places a server or llama.cpp's converter reads, and transformers' rendering of a multi-turn
    conversation, as vLLM's chat endpoint does it, equals the training render."""
    from transformers import AutoTokenizer

    base = (export / "chat_template.jinja").read_text(encoding="utf-8")
    chat = {k: v for k, v in contract.items() if k != "prompt_template"}
    chat.update(format="messages", chat_template=base, train_on="assistant")
    cfg = json.loads((export / "tokenizer_config.json").read_text())
    (export / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ 'stale' }}"}))
    fixed = check_model_dir(export, chat)
    assert not any(f.startswith("chat_template.jinja") for f in fixed), fixed  # already the trained template
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == base
    talk = [{"role": "system", "content": "回答要简短。"}, {"role": "user", "content": "一加一"},
            {"role": "assistant", "content": "二。"}, {"role": "user", "content": "再加一"}]  # fmt: skip
    served = AutoTokenizer.from_pretrained(export).apply_chat_template(talk, tokenize=False, add_generation_prompt=True)
    trained = AutoTokenizer.from_pretrained(export).apply_chat_template(
        talk, chat_template=base, tokenize=False, add_generation_prompt=True
    )
    assert served == trained and served.endswith("<|im_start|>user\n再加一<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ContractError, match="has no 'chat_template' in its contract"):
        check_model_dir(export, {k: v for k, v in chat.items() if k != "chat_template"})
