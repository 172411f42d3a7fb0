"""`tunectl pull`: copy a run's artifacts out of the store into a directory, verified and resumable, and
optionally onto a serving host: an Ollama server (`to_ollama`) or a directory vLLM serves (`to_vllm`)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ollama, vllm
from .contract import ContractError, check_model_dir
from .errors import TunectlError, redact
from .files import refuse_linked_dirs, write_atomic
from .runmodel import STAGES
from .stores import Store
from .stores.manifest import MANIFEST, selected_files

EXAMPLE_PROMPT = "Say hello in one short sentence."  # where the run recorded no test prompt of its own
_GGUF = re.compile(r"-([a-z0-9_]+)\.gguf$")


@dataclass(frozen=True)
class Selection:
    stage: str
    select: Callable[[str], bool] | None
    size: int
    files: int
    manifest: dict[str, Any]


def plan(
    store: Store, run: str, stage: str | None, quant: str | None, only: Callable[[str], bool] | None = None
) -> list[Selection]:
    """Which files of which stages to pull; errors list what exists. A run is known by its record (local runs)
    or by any stage manifest (Kubernetes runs keep their record in the cluster). `only` narrows further."""
    manifests = {s: store.manifest(run, s) for s in STAGES}
    if store.read_json(f"runs/{run}/run.json") is None and not any(manifests.values()):
        known = store.list_runs()
        where = redact(store.uri)
        raise TunectlError(f"no run '{run}' in {where}" + (f"; runs: {', '.join(known[-5:])}" if known else ""))
    if quant is not None:
        if stage not in (None, "gguf"):
            raise TunectlError("--quant selects GGUF files: use it with --stage gguf or without --stage")
        stage = "gguf"
    stages = [stage] if stage else list(STAGES)
    out = []
    for s in stages:
        manifest = manifests[s]
        if manifest is None:
            if stage is None:
                continue
            done = [x for x in STAGES if manifests[x] is not None]
            state = (store.read_json(f"runs/{run}/state.json") or {}).get(s, {}).get("state")
            why = (
                f"'s {s} stage {state}" if state in ("failed", "skipped", "running") else f" has no completed {s} stage"
            )
            raise TunectlError(f"run {run}{why} (completed: {', '.join(done) or 'none'})")
        select: Callable[[str], bool] | None = None
        if s == "gguf" and quant is not None:
            have = sorted({m.group(1) for f in manifest["files"] if (m := _GGUF.search(f))})
            if quant not in have:
                raise TunectlError(f"run {run} has no {quant} GGUF; it has: {', '.join(have)}")
            select = lambda rel, q=quant: not rel.endswith(".gguf") or rel.endswith(f"-{q}.gguf")  # noqa: E731
        if only is not None:
            select = only if select is None else (lambda rel, a=select, b=only: a(rel) and b(rel))
        chosen = [m for _, m in selected_files(manifest, select)]
        out.append(Selection(s, select, sum(m["size"] for m in chosen), len(chosen), manifest))
    if not out:
        raise TunectlError(f"run {run} has no completed stage yet")
    return out


ProgressBar = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]


def transfer(store: Store, run: str, dest: Path, selections: list[Selection], bar: ProgressBar) -> None:
    """`pull` under one progress bar sized and labelled from the plan."""
    total = sum(s.size for s in selections)
    with bar(total, f"{run}: {sum(s.files for s in selections)} files, {total / 2**20:.1f} MiB") as update:
        pull(store, run, dest, selections, update)


def pull(store: Store, run: str, dest: Path, selections: list[Selection], progress: Callable[[int], None]) -> None:
    lock = threading.Lock()

    def safe_progress(n: int) -> None:
        with lock:
            progress(n)

    for sel in selections:
        for rel in [MANIFEST, *(rel for rel, _ in selected_files(sel.manifest, sel.select))]:
            refuse_linked_dirs(dest, f"{sel.stage}/{rel}")
        got = store.fetch(run, sel.stage, dest=dest / sel.stage, select=sel.select, progress=safe_progress)
        # The manifest goes along (last, as in the store), listing what was pulled, so the copy stays verifiable.
        # Written beside and renamed over whatever is at its name: a link there is replaced, never written through.
        files = dict(selected_files(got.manifest, sel.select))
        doc = {**got.manifest, "files": files}
        write_atomic(dest / sel.stage / MANIFEST, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def default_quant(store: Store, run: str) -> str | None:
    """q4_k_m where the run made it, else the first type it made (None: `plan` will say what is missing)."""
    manifest = store.manifest(run, "gguf")
    have = [m.group(1) for f in (manifest or {}).get("files", {}) if (m := _GGUF.search(f))]
    return "q4_k_m" if "q4_k_m" in have else next(iter(have), None)


def smoke_entry(manifest: dict[str, Any], quant: str) -> dict[str, Any]:
    """What the gguf stage saw when llama.cpp answered with this file (recorded in its smoke.json)."""
    contract = manifest.get("contract")
    if not contract:
        raise ContractError(f"run {manifest.get('run')}'s gguf manifest has no contract: re-run its gguf stage")
    entry = next((e for e in manifest.get("smoke", []) if e.get("type") == quant), None) or {}
    eos = entry.get("eos_token_id")
    if eos is not None and eos not in contract["stop_token_ids"]:
        raise ContractError(
            f"the {quant} GGUF ends generation at token id {eos}, but the model was trained to stop at "
            f"{contract['stop_token_ids']}: re-run the gguf stage of run {manifest.get('run')}"
        )
    return entry


def to_ollama(
    store: Store,
    run: str,
    dest: Path,
    quant: str | None,
    name: str | None,
    host: str | None,
    bar: ProgressBar,
) -> dict[str, Any]:
    """Pull one GGUF, write a Modelfile from the manifest's contract, and (with an Ollama client here) create
    the model on the server and check that it answers and stops. Returns what happened, for the CLI to print."""
    quant = quant or default_quant(store, run)
    # the one-line errors (unknown run, no gguf stage, no such type) come from plan
    selections = plan(store, run, "gguf", quant, only=lambda rel: rel != "Modelfile")
    manifest = selections[0].manifest
    if quant is None:
        raise TunectlError(f"run {run}'s gguf stage published no GGUF file: re-run it")
    name = ollama.check_name(name or f"{run}:{quant}")
    entry = smoke_entry(manifest, quant)
    transfer(store, run, dest, selections, bar)
    gguf_dir = dest / "gguf"
    gguf_name = next(f for f in manifest["files"] if f.endswith(f"-{quant}.gguf"))
    path = gguf_dir / "Modelfile"
    write_atomic(path, ollama.modelfile(gguf_name, manifest["contract"]), durable=False)
    url = ollama.base_url(host)
    result: dict[str, Any] = {"name": name, "quant": quant, "modelfile": path, "url": redact(url)}
    exe = ollama.binary()
    if exe is None:
        result["hint"] = ollama.create_hint(name, path, url)
        return result
    ollama.create(exe, name, path, url)
    instruction = entry.get("instruction") or EXAMPLE_PROMPT
    inp = entry.get("input", "")
    messages = None
    if manifest["contract"].get("format") in ("messages", "sharegpt"):  # the smoke test's conversation, via /api/chat
        system = [{"role": "system", "content": entry["system"]}] if entry.get("system") else []
        messages = [*system, {"role": "user", "content": instruction}]
    out = ollama.verify(url, name, instruction, inp, int(entry.get("max_tokens") or 128), messages=messages)
    result.update(created=True, asked=" / ".join(filter(None, (instruction, inp))), answer=out["response"])
    result["tokens"] = out.get("eval_count")
    if "answer" in entry:
        result["matches_llama_cpp"] = out["response"].strip() == entry["answer"].strip()
    return result


def to_vllm(
    store: Store,
    run: str,
    dest: Path,
    adapter: bool,
    base: str | None,
    name: str | None,
    bar: ProgressBar,
) -> dict[str, Any]:
    """Pull the merged 16-bit model (or the LoRA adapter) into `dest`, laid out for `vllm serve`, with the
    serving contract checked and fixed in its files."""
    part = "lora" if adapter else "merged-16bit"
    selections = plan(store, run, "merge", None, only=lambda rel: rel.startswith(f"{part}/"))
    if selections[0].files == 0:
        what = "LoRA adapter (export.lora)" if adapter else "merged 16-bit model (export.merged_16bit)"
        raise TunectlError(f"run {run}'s merge stage exported no {what}")
    merge_manifest = selections[0].manifest
    contract = merge_manifest.get("contract")
    if not contract:  # before fetching gigabytes
        raise ContractError(f"run {run}'s merge manifest has no contract: re-run its merge stage")
    refuse_linked_dirs(dest, f"{vllm.PULLED}/{MANIFEST}")  # the pristine copy goes under DIR too
    transfer(store, run, dest / vllm.PULLED, selections, bar)
    vllm.link_tree(dest / vllm.PULLED / "merge" / part, dest)
    fixed = check_model_dir(dest, contract)
    name = name or run
    result: dict[str, Any] = {"dir": dest, "name": name, "fixed": fixed}
    if adapter:
        base = base or merge_manifest.get("inputs", {}).get("merge_base")
        result["serve"] = vllm.serve_command(dest, name, base or "BASE_MODEL", vllm.adapter_rank(dest))
    else:
        result["serve"] = vllm.serve_command(dest, name)
    result["request"] = vllm.request_example(name, EXAMPLE_PROMPT, 128)
    return result
