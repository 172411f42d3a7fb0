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

import json
import re
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


def tokenized_dataset(
    ds: Any,
    spec: DataSpec,
    tokenizer: Any,
    template: str,
    stop_ids: Sequence[int],
    max_length: int,
    lines: list[int] | None = None,
) -> tuple[Any, dict[str, int]]:
    """The checked conversations as a pre-tokenized data set (`input_ids`, and `assistant_masks` when the loss is
    on the assistant's turns), with `data.too_long` applied to those longer than `max_length` tokens; counts for
    the manifest as `data.fit_to_length` gives them. A row the template cannot mark is refused, naming it."""
    import datasets

    from tunectl.datacheck import conversation, row_label

    masks = spec.loss_on == "assistant"
    rows: list[dict[str, list[int]]] = []
    for i, row in enumerate(ds):
        try:
            ids, mask = tokenize(tokenizer, template, conversation(row, spec), stop_ids, masks)
        except ValueError as e:
            raise ConfigError(f"data set {spec.source} {row_label(i, lines)}: {e}") from None
        rows.append({"input_ids": ids, **({"assistant_masks": mask} if mask is not None else {})})
    lengths = [len(r["input_ids"]) for r in rows]
    over = [i for i, n in enumerate(lengths) if n > max_length]
    counts = {"rows_trained": len(rows), "rows_too_long": len(over), "rows_dropped": 0, "rows_prompt_cut": 0,
              "longest_row_tokens": max(lengths, default=0)}  # fmt: skip
    if over:
        first = over[0]
        what = (
            f"data set {spec.source}: {len(over)} of {len(rows)} conversations are longer than model.max_seq_length "
            f"({max_length} tokens; first: {row_label(first, lines)} with {lengths[first]})"
        )
        if spec.too_long == "error":
            raise ConfigError(f"{what}; training would cut off their ends: raise model.max_seq_length, or set "
                              "data.too_long to drop")  # fmt: skip
        if len(over) == len(rows):
            raise ConfigError(f"{what}: dropping them leaves no rows; raise model.max_seq_length")
        dropped = set(over)
        rows = [r for i, r in enumerate(rows) if i not in dropped]
        counts.update(rows_dropped=len(over), rows_trained=len(rows))
    return datasets.Dataset.from_list(rows), counts


# Conversations whose renderings a template must share with ChatML to be written as Ollama's ChatML: one to three
# user turns, with and without a system message, and contents that would trip a renderer (braces, quotes, Go and
# Jinja delimiters, newlines, CJK).
_PROBE_TEXTS = ("一加一", 'say "{{ .Content }}" {% raw %}', "行一\n行二 }} {")


def _probes() -> list[list[dict[str, str]]]:
    a, b, c = _PROBE_TEXTS
    sys = {"role": "system", "content": "回答要简短 {x}"}
    talk = [{"role": "user", "content": a}, {"role": "assistant", "content": b}, {"role": "user", "content": c}]
    return [talk[:1], [sys, *talk[:1]], talk, [sys, *talk]]


def _chatml(messages: Sequence[dict[str, str]], default_system: str | None) -> str:
    head = (
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        if default_system is not None and messages[0]["role"] != "system"
        else ""
    )
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return head + turns + "<|im_start|>assistant\n"


def ollama_template(tokenizer: Any, template: str) -> tuple[str | None, str | None]:
    """The Modelfile TEMPLATE (Go) that renders what `template` renders, or (None, why not). Written for the ChatML
    family (with or without a default system message), and only after the Jinja template rendered the probe
    conversations exactly as ChatML does; Ollama puts every message, system ones included, in .Messages."""

    def render(messages: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True))  # fmt: skip

    mark = "\x01"
    found = re.fullmatch(
        r"(?:<\|im_start\|>system\n(.*?)<\|im_end\|>\n)?<\|im_start\|>user\n\x01<\|im_end\|>\n<\|im_start\|>assistant\n",
        render([{"role": "user", "content": mark}]),
        re.S,
    )
    if found is None:
        return None, "it is not ChatML (<|im_start|>ROLE ... <|im_end|>), the family tunectl writes for Ollama"
    default = found.group(1)
    for messages in _probes():
        if render(messages) != _chatml(messages, default):
            return None, "it renders some conversations differently from ChatML (e.g. with a system message)"

    def literal(text: str) -> str:  # Go string literal where the text holds braces (JSON escapes are Go's)
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{" in text or "}" in text else text

    turns = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    if default is None:
        return turns, None
    head = (
        '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
        f"<|im_start|>system\n{literal(default)}<|im_end|>\n{{{{ end }}}}"
    )
    return head + turns, None
