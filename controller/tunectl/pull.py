"""`tunectl pull`: copy a run's artifacts out of the store into a directory, verified and resumable."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import TunectlError
from .store import MANIFEST, Store, selected_files

STAGES = ("train", "merge", "gguf")
_GGUF = re.compile(r"-([a-z0-9_]+)\.gguf$")


@dataclass(frozen=True)
class Selection:
    stage: str
    select: Callable[[str], bool] | None
    size: int
    files: int


def plan(store: Store, run: str, stage: str | None, quant: str | None) -> list[Selection]:
    """Which files of which stages to pull; errors list what exists. A run is known by its record (local runs)
    or by any stage manifest (Kubernetes runs keep their record in the cluster)."""
    manifests = {s: store.manifest(run, s) for s in STAGES}
    if store.read_json(f"runs/{run}/run.json") is None and not any(manifests.values()):
        known = store.list_runs()
        raise TunectlError(f"no run '{run}' in {store.uri}" + (f"; runs: {', '.join(known[-5:])}" if known else ""))
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
            raise TunectlError(f"run {run} has no completed {s} stage (completed: {', '.join(done) or 'none'})")
        select = None
        if s == "gguf" and quant is not None:
            have = sorted({m.group(1) for f in manifest["files"] if (m := _GGUF.search(f))})
            if quant not in have:
                raise TunectlError(f"run {run} has no {quant} GGUF; it has: {', '.join(have)}")
            select = lambda rel, q=quant: not rel.endswith(".gguf") or rel.endswith(f"-{q}.gguf")  # noqa: E731
        chosen = [m for _, m in selected_files(manifest, select)]
        out.append(Selection(s, select, sum(m["size"] for m in chosen), len(chosen)))
    if not out:
        raise TunectlError(f"run {run} has no completed stage yet")
    return out


def pull(store: Store, run: str, dest: Path, selections: list[Selection], progress: Callable[[int], None]) -> None:
    lock = threading.Lock()

    def safe_progress(n: int) -> None:
        with lock:
            progress(n)

    for sel in selections:
        got = store.fetch(run, sel.stage, dest=dest / sel.stage, select=sel.select, progress=safe_progress)
        # The manifest goes along (last, as in the store), listing what was pulled, so the copy stays verifiable.
        files = dict(selected_files(got.manifest, sel.select))
        doc = {**got.manifest, "files": files}
        (dest / sel.stage / MANIFEST).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
