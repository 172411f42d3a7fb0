"""Base models and the token contract (EOS / pad / template) that travels from training to serving."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from tunectl.errors import ConfigError
from tunectl.refs import resolve

log = logging.getLogger("tunectl")

# Tokens that are safe to pad with when a tokenizer has none (or pads with its EOS, which would hide the EOS
# from the loss in some collators and teach the model never to stop).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_250|>", "<|endoftext|>", "<pad>", "<unk>")


def cache_dir() -> Path:
    root = Path(
        os.environ.get("TUNECTL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunectl"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def base_model_path(name: str) -> str:
    """What `from_pretrained` should load for a recipe's `model.name`: a Hub id or a local directory.

    A GGUF file (local or inside a package) is de-quantized once into a safetensors directory in the cache,
    so training and merging load the same weights quickly and the merge stage sees a normal 16-bit base.
    """
    ref = resolve(name, "model")
    if ref.hub_id:
        return ref.hub_id
    assert ref.path is not None
    if ref.path.is_dir():
        if not (ref.path / "config.json").is_file():
            raise ConfigError(f"model {name}: {ref.path} has no config.json (not a Hugging Face model directory)")
        return str(ref.path)
    if ref.path.suffix != ".gguf":
        raise ConfigError(f"model {name}: expected a model directory, a .gguf file or a Hub id")
    return str(_dequantized_gguf(ref.path))


def _dequantized_gguf(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s into %s (once)", path.name, out)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    # Saved weights are plain tensors once the GGUF quantizer is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if _gguf_field(path, "tokenizer.ggml.model") == "gpt2":
        _as_byte_level_bpe(out / "tokenizer.json")
    (out / ".complete").write_text("ok\n")
    return out


def _gguf_field(path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _as_byte_level_bpe(tokenizer_json: Path) -> None:
    """Make a GPT-2-style vocabulary read back from GGUF a plain byte-level BPE again.

    transformers rebuilds such a vocabulary with SentencePiece-style byte fallback and decoder; encoding is
    unchanged, but llama.cpp's converter then takes it for an SPM vocabulary and writes a GGUF whose
    tokenizer llama.cpp cannot load. The original models ship byte-level BPE, which is what this restores.
    """
    doc = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    doc["model"]["byte_fallback"] = False
    doc["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer_json.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def resolve_token_contract(tokenizer: Any, model_config: Any, generation_config: Any | None) -> dict[str, Any]:
    """Decide the EOS and pad tokens training uses, and fix the tokenizer to match.

    The model's own configs say which ids end a generation. When the tokenizer's EOS is not one of them
    (SmolLM2's GGUF tokenizer reports `<|im_start|>` while its config says `<|im_end|>`), training would teach
    a token the server never stops on: the config's id wins and the tokenizer is corrected.
    """
    config_eos = _ids(getattr(generation_config, "eos_token_id", None)) or _ids(model_config.eos_token_id)
    tok_eos = tokenizer.eos_token_id
    if tok_eos is not None and (not config_eos or tok_eos in config_eos):
        eos_id = tok_eos
    elif config_eos:
        eos_id = config_eos[0]
        log.warning(
            "tokenizer EOS %r (id %s) is not the model's EOS; using %r (id %d)",
            tokenizer.eos_token,
            tok_eos,
            tokenizer.convert_ids_to_tokens(eos_id),
            eos_id,
        )
    else:
        raise ConfigError("the model defines no EOS token: set one in its tokenizer or generation config")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)

    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos_id:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in _PAD_CANDIDATES if t in vocab and vocab[t] != eos_id), None)
        if pad is None:
            raise ConfigError("the tokenizer has no pad token distinct from EOS; add one to the base model")
        tokenizer.pad_token = pad
    stop_ids = sorted({eos_id, *config_eos})
    return {
        "eos_token": tokenizer.eos_token,
        "eos_token_id": eos_id,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token": tokenizer.bos_token,
        "stop_token_ids": stop_ids,
        "stop_tokens": tokenizer.convert_ids_to_tokens(stop_ids),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def shape(config: Any) -> dict[str, int] | None:
    """A decoder's shape as the report's FLOPs count needs it (None for a model without these fields)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")  # fmt: skip
    got = {k: getattr(config, k, None) for k in keys}
    if any(not isinstance(v, int) for v in got.values()):
        return None
    head_dim = getattr(config, "head_dim", None) or got["hidden_size"] // got["num_attention_heads"]
    return {**got, "head_dim": int(head_dim)}  # type: ignore[dict-item]


def apply_contract_to_generation_config(model: Any, contract: dict[str, Any]) -> None:
    gc = model.generation_config
    gc.eos_token_id = contract["stop_token_ids"] if len(contract["stop_token_ids"]) > 1 else contract["eos_token_id"]
    gc.pad_token_id = contract["pad_token_id"]
    model.config.eos_token_id = contract["eos_token_id"]
    model.config.pad_token_id = contract["pad_token_id"]


def generate(
    model: Any, tokenizer: Any, prompts: list[tuple[str, int]], eos_ids: list[int], add_special_tokens: bool = True
) -> list[dict[str, Any]]:
    """Greedy answers for (prompt, max_new_tokens) pairs; records whether each stopped at EOS. A prompt rendered by
    a chat template already holds its special tokens (`add_special_tokens=False`)."""
    import torch

    results = []
    device = next(model.parameters()).device
    for prompt, max_new in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        stopped = bool(new) and new[-1] in eos_ids
        text = tokenizer.decode(new, skip_special_tokens=True)
        results.append({"prompt": prompt, "answer": text, "new_tokens": len(new), "stopped_at_eos": stopped})
        log.info("answer (%d tokens, %s): %s", len(new), "stopped" if stopped else "hit the limit", text.strip())
    return results
