"""Conversations tokenized for training with the tiny model's tokenizer: the assistant's tokens marked through each
turn's stop token and nothing else, for the model's own template (ChatML with a default system prompt) and
tunectl's ChatML; templates whose marks could be wrong are refused."""

from __future__ import annotations

import pytest

from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe

pytestmark = pytest.mark.ml

pytest.importorskip("transformers")

RECIPE = load_recipe("ruozhiba-tiny", ["data.format=messages"])
TALK = [
    {"role": "user", "content": "一加一"},
    {"role": "assistant", "content": "等于二。"},
    {"role": "user", "content": "再加一呢？"},
    {"role": "assistant", "content": "三。"},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tunectl_jobs.models import base_model_path

    return AutoTokenizer.from_pretrained(base_model_path(RECIPE.model.name))


def marked(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize("template", ["model", "chatml"])
def test_only_the_assistant_turns_and_their_stop_tokens_are_marked(tok, template):
    from tunectl_jobs import chat

    spec = load_recipe("ruozhiba-tiny", ["data.format=messages", f"data.chat_template={template}"]).data
    text = chat.template_for(spec, tok, RECIPE.model.name)
    ids, mask = chat.tokenize(tok, text, TALK, [2], masks=True)
    rendered = tok.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\n三。<|im_end|>\n")
    assert ("You are a helpful AI assistant named SmolLM" in rendered) == (template == "model")
    assert marked(tok, ids, mask) == "等于二。<|im_end|>三。<|im_end|>"
    assert mask[-1] == 0  # the newline ChatML writes after <|im_end|> is the template's, not the answer's
    assert chat.tokenize(tok, text, TALK, [2], masks=False) == (ids, None)


def test_templates_whose_marks_could_be_wrong_are_refused(tok):
    from tunectl_jobs import chat

    # Shows only the newest exchange: the conversation so far is not the start of the whole one.
    newest_only = (
        "{%- for m in messages[-2:] -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    with pytest.raises(ValueError, match="^turn 2: the chat template does not render the conversation up to this"):
        chat.tokenize(tok, newest_only, TALK, [2], masks=True)
    no_stop = chat.CHATML.replace("'<|im_end|>'", "'\\n'")
    with pytest.raises(ValueError, match=r"^turn 2: the chat template ends the assistant's turn without a stop token"):
        chat.tokenize(tok, no_stop, TALK, [2], masks=True)


def test_a_model_without_a_chat_template_needs_one_named(tok):
    from tunectl_jobs import chat

    class Bare:
        chat_template = None

    with pytest.raises(ConfigError, match="has no chat template of its own: set data.chat_template to chatml"):
        chat.template_for(RECIPE.data, Bare(), "some/base")
    assert chat.template_for(RECIPE.data, tok, RECIPE.model.name) == tok.chat_template
