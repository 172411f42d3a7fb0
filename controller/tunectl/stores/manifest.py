"""The manifest that commits a stage, and the checks every store applies to what it hands over.

A stage's manifest (`runs/<run-id>/<stage>/manifest.json`) lists every file of the stage with its sha256 and
size. Stores write it last; consumers refuse a stage without one and any file that differs from its entry.
Nothing here knows where a store keeps its bytes: these helpers are shared by the directory and the S3 store.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ArtifactError
from ..files import open_regular

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "tunectl.dev/manifest/v1"
_CHUNK = 1 << 20


class CorruptDocument(ArtifactError):
    """A record tunectl wrote (run.json, state.json, a manifest) cannot be parsed."""


def parse_document(data: bytes | str, where: str) -> dict[str, Any]:
    """A JSON object from a store document; anything else is a CorruptDocument naming `where`."""
    try:
        doc = json.loads(data)
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise CorruptDocument(f"{where} is corrupt (not valid JSON: {e}): repair or remove it") from None
    if not isinstance(doc, dict):
        raise CorruptDocument(f"{where} is corrupt (a JSON {type(doc).__name__}, not an object): repair or remove it")
    return doc


# -- checksums


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f, os.fstat(f.fileno()).st_size).hexdigest()


def sha256_stream(f: IO[bytes], length: int) -> hashlib._Hash:
    """The running sha256 of the next `length` bytes of `f`, to be continued with what follows them."""
    h = hashlib.sha256()
    while length > 0 and (chunk := f.read(min(_CHUNK, length))):
        h.update(chunk)
        length -= len(chunk)
    return h


# A publish's way to a file's sha256 computed before it (EarlyChecksums.digest); None: compute it now.
Digests = Callable[[Path], str | None]


class EarlyChecksums:
    """The sha256 of a stage's finished files, computed in the background while the stage goes on, so publishing
    does not read them a second time (a 16 GB GGUF is hashed while the next type is quantized). A digest is handed
    out only for the very file it was computed from, unchanged since: same device and inode (a hard link of it
    counts), size and modification time."""

    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._jobs: dict[tuple[int, int], tuple[tuple[int, int], Future[str]]] = {}

    def soon(self, path: Path) -> None:
        st = os.stat(path)
        self._jobs[(st.st_dev, st.st_ino)] = ((st.st_size, st.st_mtime_ns), self._pool.submit(sha256_file, path))

    def digest(self, path: Path) -> str | None:
        try:
            st = os.stat(path)
            job = self._jobs.get((st.st_dev, st.st_ino))
            if job is None or job[0] != (st.st_size, st.st_mtime_ns):
                return None
            digest = job[1].result()
            after = os.stat(path)
        except OSError:
            return None
        # Written to while it was read (its time changed since): the digest may be of neither version.
        return digest if (after.st_size, after.st_mtime_ns) == job[0] else None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def output_files(src: Path) -> list[str]:
    """The files a stage wrote under `src`, as sorted relative paths, a `manifest.json` there excepted (a store
    writes its own): what publish commits."""
    rels = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    return [rel for rel in rels if rel != MANIFEST]


def matches(path: Path, meta: dict[str, Any], follow: bool = False) -> bool:
    """Whether `path` is a regular file holding exactly what a manifest entry describes (size first: it is free).
    In a destination (`follow` False) a link, even to the right content, does not count: a real copy replaces it."""
    f = open_regular(path, follow=follow)
    if f is None:
        return False
    with f:
        size = os.fstat(f.fileno()).st_size
        return size == meta["size"] and sha256_stream(f, size).hexdigest() == meta["sha256"]


def safe_key(key: str) -> str:
    """Refuse keys that would escape their prefix (`..`, absolute paths)."""
    parts = key.replace("\\", "/").split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"refusing unsafe artifact key '{key}'")
    return "/".join(parts)


# -- manifests


@dataclass(frozen=True)
class StageArtifacts:
    """A completed, verified stage: its files are under `path`."""

    run: str
    stage: str
    path: Path
    manifest: dict[str, Any]

    def file(self, rel: str) -> Path:
        return self.path / safe_key(rel)


def manifest_doc(run: str, stage: str, manifest: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    return {"schema": MANIFEST_SCHEMA, "run": run, "stage": stage, **manifest, "files": files}


def check_manifest(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A manifest whose file list is usable (consumers index it without further checks)."""
    files = doc.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
        for m in files.values()
    )
    if not ok:
        raise CorruptDocument(f"{where} is corrupt (no valid 'files' list): re-run the stage")
    return doc


def selected_files(doc: dict[str, Any], select: Callable[[str], bool] | None) -> list[tuple[str, dict[str, Any]]]:
    return [(rel, meta) for rel, meta in doc.get("files", {}).items() if select is None or select(rel)]
