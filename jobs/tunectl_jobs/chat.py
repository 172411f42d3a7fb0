"""Conversations as the trainer sees them: rendered with the recipe's chat template, tokenized, and, when the loss is
on the assistant's turns only, each token marked as the assistant's or not.

The marks come from the template itself, for any template: the assistant's i-th turn is what rendering the
conversation up to and including that turn adds to rendering it up to the turn before with the generation prompt
(`<|im_start|>assistant\\n` in ChatML), ended at its first stop token (the end-of-turn token the model must learn to
write, not the newline some templates put after it). Both renderings must be token prefixes of the whole
conversation: a template that rewrites earlier turns when later ones come, or a tokenizer that merges text across
a turn's boundary, would make the marks wrong, and the row is refused instead. TRL's SFTTrainer then turns the
marks (`assistant_masks`) into labels itself; its own `assistant_only_loss` needs `{% generation %}` markers that
most templates, SmolLM2's ChatML among them, do not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunectl.errors import ConfigError
from tunectl.recipe import DataSpec

# ChatML as SmolLM2, Qwen and others write it, without a default system prompt.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def template_for(spec: DataSpec, tokenizer: Any, model: str) -> str:
    """The Jinja text conversations are rendered with: the base tokenizer's own, ChatML, or the recipe's."""
    if spec.chat_template == "chatml":
        return CHATML
    if spec.chat_template != "model":
        return spec.chat_template
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str) or not own.strip():
        raise ConfigError(
            f"model {model} has no chat template of its own: set data.chat_template to chatml or a Jinja template"
        )
    return own


def _ids(tokenizer: Any, template: str, messages: Sequence[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=True, add_generation_prompt=generation_prompt,
        return_dict=True,
    )  # fmt: skip
    return list(out["input_ids"])


def tokenize(
    tokenizer: Any, template: str, messages: Sequence[dict[str, str]], stop_ids: Sequence[int], masks: bool
) -> tuple[list[int], list[int] | None]:
    """A conversation's token ids and, with `masks`, 1 for each token of an assistant turn (through its stop
    token), else 0. ValueError names what does not hold (the caller adds the row)."""
    ids = _ids(tokenizer, template, messages, False)
    if not masks:
        return ids, None
    mask = [0] * len(ids)
    stops = set(stop_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, template, messages[:i], True)
        through = _ids(tokenizer, template, messages[: i + 1], False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError(
                f"turn {i + 1}: the chat template does not render the conversation up to this turn as the start of "
                "the whole one (it changes earlier turns, or the tokenizer merges text across turns), so the "
                "assistant's tokens cannot be told apart"
            )
        span = range(len(before), len(through))
        end = next((j for j in span if ids[j] in stops), None)
        if end is None:
            raise ValueError(
                f"turn {i + 1}: the chat template ends the assistant's turn without a stop token "
                f"(ids {sorted(stops)}): the model would not learn to stop"
            )
        for j in range(span.start, end + 1):
            mask[j] = 1
    return ids, mask
