"""The directory store: `runs/<run-id>/<stage>/...` under a local directory (the local backend's default)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, EnvironmentProblem
from ..files import copy_atomic, write_atomic
from .base import Progress, Store
from .manifest import (
    MANIFEST,
    Digests,
    StageArtifacts,
    manifest_doc,
    matches,
    output_files,
    parse_document,
    safe_key,
    selected_files,
    sha256_file,
)


class LocalStore(Store):
    """A store in a local directory. Files are written whole, never through a link (files.py); publishing
    hard-links a stage's outputs from its scratch directory where the file system allows."""

    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        _refuse_file_root(self.root)

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({self.root})"

    # -- paths
    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / safe_key(run)

    def stage_dir(self, run: str, stage: str) -> Path:
        return self.run_dir(run) / safe_key(stage)

    def location(self, run: str) -> str:
        return str(self.run_dir(run))

    def where(self, key: str) -> str:
        return str(self.root / safe_key(key))

    def local_dir(self, run: str) -> Path:
        """For a directory store, the run's own directory."""
        d = self.run_dir(run)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- runs
    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def claim_run(self, run: str) -> bool:
        """One mkdir, so of two processes that pick the same id exactly one gets it."""
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        try:
            self.run_dir(run).mkdir()
        except FileExistsError:
            return False
        return True

    def list_runs(self) -> list[str]:
        base = self.root / "runs"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "run.json").is_file())

    # -- small documents (run record, state)
    def read_json(self, key: str) -> dict[str, Any] | None:
        path = self.root / safe_key(key)
        if not path.is_file():
            return None
        return parse_document(path.read_bytes(), str(path))

    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        write_atomic(self.root / safe_key(key), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    def read_text(self, key: str) -> str | None:
        path = self.root / safe_key(key)
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    def write_text(self, key: str, text: str) -> None:
        write_atomic(self.root / safe_key(key), text)

    def put_file(self, key: str, path: Path) -> None:
        target = self.root / safe_key(key)
        if target.resolve() != path.resolve():
            copy_atomic(path, target)

    # -- stage handoff
    def publish(
        self,
        run: str,
        stage: str,
        src: Path,
        manifest: dict[str, Any],
        progress: Progress | None = None,
        digests: Digests | None = None,
    ) -> dict[str, Any]:
        """Move `src`'s files into the stage's place, then write the manifest (the commit point)."""
        dest = self.stage_dir(run, stage)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)  # a re-run is incomplete until its manifest lands
        targets = {rel: dest / rel for rel in output_files(src)}
        for rel, target in targets.items():
            copy_atomic(src / rel, target, link=True)

        def checksum(rel: str) -> dict[str, Any]:
            size = targets[rel].stat().st_size
            digest = (digests and digests(targets[rel])) or sha256_file(targets[rel])
            if progress:
                progress(size)
            return {"sha256": digest, "size": size}

        with _hashing_pool() as pool:
            files = dict(zip(targets, pool.map(checksum, targets), strict=True))
        doc = manifest_doc(run, stage, manifest, files)
        self.write_json(f"runs/{run}/{stage}/{MANIFEST}", doc)
        return doc

    def delete(self, run: str, stage: str) -> None:
        dest = self.stage_dir(run, stage)
        (dest / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)

    def fetch(
        self,
        run: str,
        stage: str,
        dest: Path | None = None,
        select: Callable[[str], bool] | None = None,
        progress: Progress | None = None,
    ) -> StageArtifacts:
        """Without `dest`, the files are verified where they are, in the stage's directory."""
        doc = self.completed_manifest(run, stage)
        base = self.stage_dir(run, stage)

        def one(rel: str, meta: dict[str, Any]) -> None:
            target = None if dest is None else dest / safe_key(rel)
            if target is None or not matches(target, meta):  # a verified copy already there needs nothing more
                path = base / safe_key(rel)
                if not path.is_file():
                    raise ArtifactError(f"run {run} stage {stage}: {rel} is listed in the manifest but missing")
                if not matches(path, meta, follow=True):
                    raise ArtifactError(
                        f"run {run} stage {stage}: {rel} does not match its manifest checksum (corrupted); "
                        f"re-run the stage"
                    )
                if target is not None:
                    copy_atomic(path, target)
            if progress:
                progress(meta["size"])

        with _hashing_pool() as pool:
            # In the manifest's order, so the first bad file is the one named.
            for job in [pool.submit(one, rel, meta) for rel, meta in selected_files(doc, select)]:
                job.result()
        return StageArtifacts(run, stage, dest or base, doc)


def _hashing_pool() -> ThreadPoolExecutor:
    """Threads that checksum files side by side (hashlib and file reads run without the GIL): a model in shards,
    and a stage's several GGUFs, are hashed in the time of the largest file, not of all of them."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _refuse_file_root(root: Path) -> None:
    """A store path that is (or lies under) a file: one line now, not a confusing "no runs" or errno later."""
    p = root
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        where = f"{root} is" if p == root else f"{root}: {p} is"
        raise EnvironmentProblem(
            f"store {where} a file, not a directory: pass a directory or s3://BUCKET with --store or TUNECTL_STORE"
        )
