"""vLLM as a pull target: a directory `vllm serve` loads as it is, with the contract written into its files.

The merged 16-bit model (or, with `--adapter`, the LoRA adapter) is pulled and verified into `DIR/.tunectl/`
(resumable, kept pristine) and hard-linked into `DIR` itself, where `tunectl.contract` rewrites what the serving
contract decides (EOS ids, chat template) by replacing files, never editing the verified copies in place.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from .files import copy_atomic, refuse_linked_dirs

PULLED = ".tunectl"


def link_tree(src: Path, dest: Path) -> None:
    """Hard-link every file of `src` into `dest` (a copy across file systems), replacing what is there; a
    symlink at a target's name is replaced itself, never written through."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        refuse_linked_dirs(dest, path.relative_to(src).as_posix())
        target = dest / path.relative_to(src)
        if not target.is_symlink() and target.exists() and os.path.samefile(path, target):
            continue
        copy_atomic(path, target, link=True)


def adapter_rank(adapter_dir: Path) -> int:
    return int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))


def serve_command(model_dir: Path, name: str, adapter_base: str | None = None, rank: int = 16) -> str:
    if adapter_base is None:
        return shlex.join(["vllm", "serve", str(model_dir), "--served-model-name", name])
    cmd = ["vllm", "serve", adapter_base, "--enable-lora", "--lora-modules", f"{name}={model_dir}"]
    return shlex.join([*cmd, "--max-lora-rank", str(max(rank, 16))])


def request_example(name: str, prompt: str, max_tokens: int) -> str:
    """An OpenAI-compatible chat request: the directory's chat template turns it into the training prompt."""
    body: dict[str, Any] = {
        "model": name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    payload = shlex.quote(json.dumps(body, ensure_ascii=False))
    return f"curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d {payload}"
