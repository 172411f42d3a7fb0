"""The EOS contract on the real SmolLM2 tokenizer and config (from the offline GGUF package)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ml

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from tunectl.recipe import load_recipe
    from tunectl_jobs.models import base_model_path

    path = base_model_path(load_recipe("ruozhiba-tiny").model.name)
    return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path), GenerationConfig.from_pretrained(path)


def test_tokenizer_eos_is_corrected_to_the_models(smollm2):
    from tunectl_jobs.models import resolve_token_contract

    tok, config, gen = smollm2
    assert tok.eos_token == "<|im_start|>"  # the trap: the GGUF tokenizer reports the wrong EOS
    c = resolve_token_contract(tok, config, gen)
    assert (c["eos_token"], c["eos_token_id"]) == ("<|im_end|>", 2)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    # The config pads with EOS; padding must not be the EOS or the loss could never see it.
    assert c["pad_token_id"] != 2 and tok.pad_token_id == c["pad_token_id"]
    assert c["stop_token_ids"] == [2] and c["stop_tokens"] == ["<|im_end|>"]


def test_alpaca_text_ends_with_the_eos_token(smollm2):
    import datasets

    from tunectl.recipe import load_recipe
    from tunectl_jobs.data import format_alpaca
    from tunectl_jobs.models import resolve_token_contract

    tok, config, gen = smollm2
    c = resolve_token_contract(tok, config, gen)
    spec = load_recipe("ruozhiba-tiny").data
    ds = datasets.Dataset.from_list([{"instruction": "问", "input": "", "output": "答"}])
    text = format_alpaca(ds, spec, c["eos_token"])[0]["text"]
    assert text.endswith("### Response:\n答<|im_end|>")
    assert tok(text)["input_ids"][-1] == 2
