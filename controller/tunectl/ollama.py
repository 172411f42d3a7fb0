"""Ollama as a pull target: a Modelfile that prompts like training and stops at EOS, `ollama create`, and one
generation through the server's HTTP API that must end at a stop token.

The client talks to the server named by `--ollama-host` / OLLAMA_HOST (Ollama's own variable, same forms:
`host:port` or a URL; default 127.0.0.1:11434). `ollama create` reads the GGUF here and uploads it to that server,
so the server may be another machine. Every message shows the URL with any user:password in it redacted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .contract import ContractError, render_prompt
from .errors import TunectlError, executable, redact

DEFAULT_HOST = "127.0.0.1:11434"
# Ollama's model names: a name of letters, digits and . _ - (optionally namespace/name), an optional :tag.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")


def modelfile(gguf_name: str, contract: dict[str, Any]) -> str:
    """TEMPLATE renders the training prompt (Go template syntax): for a chat run, the Go form of the chat template
    it trained with, over .Messages (the train stage wrote it after checking both render alike); for an Alpaca run,
    the prompt is the instruction, or, when a system message is given, the system message is the instruction and
    the prompt its input. One `PARAMETER stop` per token that ends a turn."""
    if contract.get("format") in ("messages", "sharegpt"):
        if not contract.get("stop_tokens"):
            raise ContractError("the run's manifest has no stop tokens: re-run its train stage")
        if not contract.get("ollama_template"):
            why = contract.get("ollama_refusal") or "the manifest has no Ollama template"
            raise ContractError(
                f"the run's chat template is not one tunectl can write for Ollama: {why}; its GGUF carries the "
                "template for llama.cpp, and `tunectl pull --to vllm` serves it as trained"
            )
        return _modelfile(gguf_name, contract["ollama_template"], contract["stop_tokens"])
    if "prompt_template" not in contract or not contract.get("stop_tokens"):
        raise ContractError("the run's manifest has no prompt template or stop tokens: re-run its train stage")

    def literal(text: str) -> str:
        # Text with a brace goes in as a Go string literal: a bare `{` or `{{` beside an action would be read
        # as part of it. JSON's string escapes are a subset of Go's.
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{" in text or "}" in text else text

    tpl = contract["prompt_template"]
    template = (
        "{{ if .System }}"
        + render_prompt(tpl, "{{ .System }}", "{{ .Prompt }}", literal)
        + "{{ else }}"
        + render_prompt(tpl, "{{ .Prompt }}", "", literal)
        + "{{ end }}"
    )
    return _modelfile(gguf_name, template, contract["stop_tokens"])


def _modelfile(gguf_name: str, template: str, stop_tokens: list[str]) -> str:
    if '"""' in template:
        raise ContractError('the prompt template contains """, which an Ollama Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(tok, ensure_ascii=False)}" for tok in stop_tokens]
    return "\n".join(lines) + "\n"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise TunectlError(
            f"--name {name!r} is not an Ollama model name: use letters, digits, '.', '_', '-', optionally ':tag'"
        )
    return name


def base_url(host: str | None) -> str:
    host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    return (host if "://" in host else f"http://{host}").rstrip("/")


def binary() -> str | None:
    override = os.environ.get("TUNECTL_OLLAMA")
    return executable(override, "TUNECTL_OLLAMA", "the ollama program") if override else shutil.which("ollama")


def create_hint(name: str, modelfile_path: Path, url: str) -> str:
    """The command a user runs where the Ollama client is."""
    return f"cd {modelfile_path.parent} && OLLAMA_HOST={redact(url)} ollama create {name} -f {modelfile_path.name}"


def create(exe: str, name: str, modelfile_path: Path, url: str) -> None:
    """`ollama create` from the Modelfile's directory (its FROM is relative) against the server at `url`."""
    proc = subprocess.run(
        [exe, "create", name, "-f", modelfile_path.name],
        cwd=modelfile_path.parent,
        env={**os.environ, "OLLAMA_HOST": url},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        last = next((ln for ln in reversed((proc.stderr + proc.stdout).splitlines()) if ln.strip()), "no output")
        raise TunectlError(redact(f"ollama create {name} against {url} failed: {last.strip()}"))


def generate(
    url: str,
    name: str,
    instruction: str,
    input: str,
    max_tokens: int,
    timeout: float = 300,
    messages: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """One greedy generation (the Modelfile's TEMPLATE applies): for a chat run, `messages` through /api/chat; else
    through /api/generate, an input as the prompt with the instruction as system message. The reply as
    /api/generate gives it (`response`, `done_reason`, `eval_count`)."""
    options = {"temperature": 0, "top_k": 1, "repeat_penalty": 1.0, "seed": 0, "num_predict": max_tokens}
    if messages is not None:
        endpoint, body = "chat", {"model": name, "messages": messages, "stream": False, "options": options}
    else:
        prompt = {"system": instruction, "prompt": input} if input else {"prompt": instruction}
        endpoint, body = "generate", {"model": name, **prompt, "stream": False, "options": options}
    req = urllib.request.Request(
        f"{url}/api/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = dict(json.loads(resp.read()))
            if messages is not None:
                out["response"] = (out.get("message") or {}).get("content", "")
            return out
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise TunectlError(redact(f"Ollama at {url} answered {e.code} for {name}: {detail}")) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TunectlError(redact(f"cannot reach Ollama at {url} ({reason}): start it or pass --ollama-host")) from None


def verify(
    url: str, name: str, instruction: str, input: str, max_tokens: int, messages: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """The created model must answer and stop at a stop token before `max_tokens`."""
    out = generate(url, name, instruction, input, max_tokens, messages=messages)
    answer = out.get("response", "")
    if out.get("done_reason") != "stop" or not answer.strip():
        raise TunectlError(
            f"{name} on {redact(url)} did not answer and stop within {max_tokens} tokens "
            f"(done_reason {out.get('done_reason')!r}, {out.get('eval_count')} tokens): check the Modelfile's stops"
        )
    return out
