"""The serving contract: a server must prompt the model as it was trained and stop where it learned to stop.

Training records the contract in every stage manifest (`contract`): the EOS token and id it appended to each
example, every id that ends a turn, the pad token, and the prompt template. A Hugging Face directory carries the
same facts in several files that servers read separately: `config.json` and `generation_config.json`
(`eos_token_id`, where vLLM and transformers stop), `tokenizer_config.json` (`eos_token`), `tokenizer.json`
(which id the EOS string is) and the chat template (how /v1/chat/completions builds the prompt).

`check_model_dir` compares them with the manifest and rewrites what the manifest decides: EOS and pad settings,
and a chat template that renders the training prompt (a base model's own chat format, ChatML for SmolLM2, is
not what an Alpaca-trained model answers to). What it cannot fix it refuses: a tokenizer whose EOS string is
another id than the one trained is a different vocabulary. Plain JSON and text only, so `tunectl pull` runs it
without torch or transformers.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TunectlError
from .files import write_atomic

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ContractError(TunectlError):
    """The files disagree with the training contract in a way the manifest cannot repair."""


def render_prompt(prompt_template: str, instruction: str, input: str, literal: Callable[[str], str]) -> str:
    """The inference prompt (the template up to its response slot) in a server's template language: the
    `instruction` and `input` code spliced in as given, every piece of fixed text passed through `literal`."""
    # Split as str.format splits it (the recipe checked the fields): escaped braces are literal text, and an
    # escaped `{{input}}` is not a field.
    out, text = [], ""
    for piece, field, _, _ in string.Formatter().parse(prompt_template):
        text += piece  # the parser breaks literal text at each escaped brace: keep it whole
        if field in ("instruction", "input"):
            out += [literal(text) if text else "", instruction if field == "instruction" else input]
            text = ""
    return "".join(out) + (literal(text) if text else "")


def chat_template(prompt_template: str, bos_token: str | None = None) -> str:
    """A Jinja chat template that renders a conversation as the training prompt. Without a system message the
    last user message is the instruction (input empty); with one, the system message is the instruction and
    the user message its input, the two shapes Alpaca rows have. An assistant message after the last user
    message (a rendered training example) is followed by `eos_token`. `bos_token` is written first when the
    tokenizer adds one on its own, since servers render chat prompts without special tokens."""

    def literal(text: str) -> str:
        # A Jinja string literal (JSON escapes are Jinja escapes), not a raw block, whose newlines the
        # trim_blocks setting servers use would eat.
        return "{{- " + json.dumps(text, ensure_ascii=False) + " -}}"

    with_input = render_prompt(prompt_template, "{{- ns.system -}}", "{{- ns.user -}}", literal)
    without = render_prompt(prompt_template, "{{- ns.user -}}", "", literal)
    return (
        "{%- set ns = namespace(system=none, user='', answer=none) -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}\n"
        "{%- elif message['role'] == 'user' -%}{%- set ns.user = message['content'] -%}{%- set ns.answer = none -%}\n"
        "{%- elif message['role'] == 'assistant' -%}{%- set ns.answer = message['content'] -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        + ("{{- bos_token -}}" if bos_token else "")
        + "{%- if ns.system is not none -%}"
        + with_input
        + "{%- else -%}"
        + without
        + "{%- endif -%}\n"
        "{%- if ns.answer is not none and not add_generation_prompt -%}{{- ns.answer + eos_token -}}{%- endif -%}"
    )


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write(path: Path, text: str) -> None:
    """Replace by rename: a hard-linked original (a verified pulled copy) keeps its content, and a symlink at
    the name is replaced, not written through."""
    write_atomic(path, text)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    _write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _token_str(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _token_id(tokenizer_json: dict[str, Any], token: str) -> int | None:
    for added in tokenizer_json.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = tokenizer_json.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def adds_bos(tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any]) -> bool:
    """Whether encoding text prepends BOS by itself (Llama 3's post-processor does, SmolLM2's does not)."""
    if tokenizer_config.get("add_bos_token") is True:
        return True
    bos = _token_str(tokenizer_config.get("bos_token"))
    if not bos:
        return False
    return bos in json.dumps(tokenizer_json.get("post_processor") or {}, ensure_ascii=False)


def check_model_dir(model_dir: Path, contract: dict[str, Any]) -> list[str]:
    """Make `model_dir`'s tokenizer, configs and chat template agree with the training contract.

    Returns one line per file it rewrote; raises ContractError for what the manifest cannot decide. Works on a
    merged model (config.json present) and on a LoRA adapter directory (tokenizer files only)."""
    chat = contract.get("format") in ("messages", "sharegpt")  # trained in a chat template, not the Alpaca prompt
    for key in ("eos_token", "eos_token_id", "stop_token_ids", "pad_token_id",
                "chat_template" if chat else "prompt_template"):  # fmt: skip
        if key not in contract:
            raise ContractError(f"the run's manifest has no '{key}' in its contract: re-run the train stage")
    eos, eos_id, stop_ids = (
        contract["eos_token"],
        int(contract["eos_token_id"]),
        [int(i) for i in contract["stop_token_ids"]],
    )
    pad, pad_id = contract.get("pad_token"), int(contract["pad_token_id"])
    fixed: list[str] = []

    tok_json = _read(model_dir / "tokenizer.json")
    if tok_json is None:
        raise ContractError(f"{model_dir} has no tokenizer.json: the export is incomplete")
    actual = _token_id(tok_json, eos)
    if actual != eos_id:
        raise ContractError(
            f"{model_dir / 'tokenizer.json'} maps EOS {eos!r} to id {actual}, but the model was trained to emit "
            f"id {eos_id}: this is not the tokenizer the run trained with"
        )

    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = _read(tok_cfg_path) or {}

    def current(key: str) -> Any:
        return _token_str(tok_cfg.get(key)) if key.endswith("_token") else tok_cfg.get(key)

    want = {"eos_token": eos, "eos_token_id": eos_id, "pad_token": pad, "pad_token_id": pad_id}
    # The token strings are always written; the ids only where the file carries them.
    changed = {
        k: v for k, v in want.items() if v is not None and (k in tok_cfg or k.endswith("_token")) and current(k) != v
    }
    if changed:
        fixed.append(f"tokenizer_config.json: { {k: current(k) for k in changed} } -> {changed}")
        tok_cfg.update(changed)

    if chat:  # the very template the conversations were rendered with
        template, trained = str(contract["chat_template"]), "the chat template the run trained with"
    else:
        template = chat_template(
            contract["prompt_template"], _token_str(tok_cfg.get("bos_token")) if adds_bos(tok_json, tok_cfg) else None
        )
        trained = "one that renders the training prompt"
    tpl_path = model_dir / CHAT_TEMPLATE_FILE
    existing = tpl_path.read_text(encoding="utf-8") if tpl_path.is_file() else tok_cfg.get("chat_template")
    if existing != template:
        _write(tpl_path, template)
        what = "replaced the base model's chat format" if existing else "written"
        fixed.append(f"{CHAT_TEMPLATE_FILE}: {what} with {trained}")
    # llama.cpp's converter reads tokenizer_config.json's chat_template before chat_template.jinja: keep them equal.
    stale_template = "chat_template" in tok_cfg and tok_cfg["chat_template"] != template
    if stale_template:
        tok_cfg["chat_template"] = template
        if not changed:
            fixed.append(f"tokenizer_config.json: chat_template set to {trained}")
    if changed or stale_template:
        _write_json(tok_cfg_path, tok_cfg)

    config_path = model_dir / "config.json"
    config = _read(config_path)
    if config is not None:
        if eos_id not in _ids(config.get("eos_token_id")) or config.get("pad_token_id") != pad_id:
            before = (config.get("eos_token_id"), config.get("pad_token_id"))
            config["eos_token_id"], config["pad_token_id"] = eos_id, pad_id
            _write_json(config_path, config)
            fixed.append(f"config.json: eos/pad {before} -> {(eos_id, pad_id)}")
        gen_path = model_dir / "generation_config.json"
        gen = _read(gen_path)
        want_eos: int | list[int] = stop_ids if len(stop_ids) > 1 else eos_id
        if (
            gen is None
            or sorted(_ids(gen.get("eos_token_id"))) != sorted(stop_ids)
            or gen.get("pad_token_id") != pad_id
        ):
            was = None if gen is None else (gen.get("eos_token_id"), gen.get("pad_token_id"))
            gen = {**(gen or {}), "eos_token_id": want_eos, "pad_token_id": pad_id}
            _write_json(gen_path, gen)
            fixed.append(f"generation_config.json: eos/pad {was} -> {(want_eos, pad_id)}")
    return fixed
