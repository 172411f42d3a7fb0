"""The artifact store: where stages hand their outputs to each other.

Layout, the same for every backend: `runs/<run-id>/<stage>/<files...>` plus `runs/<run-id>/<stage>/manifest.json`.
The manifest is written LAST and lists every file with its sha256 and size: a stage without a manifest is
not done, and a consumer refuses files whose checksums differ from it.

`LocalStore` is a directory; `S3Store` (s3store.py) is a bucket and prefix. Both implement the same methods.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union
from urllib.parse import urlparse

from .errors import ArtifactError, ConfigError, EnvironmentProblem, redact
from .files import copy_atomic, open_regular, write_atomic

if TYPE_CHECKING:
    from .s3store import S3Store

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


@dataclass(frozen=True)
class StageArtifacts:
    """A completed, verified stage: its files are under `path`."""

    run: str
    stage: str
    path: Path
    manifest: dict[str, Any]

    def file(self, rel: str) -> Path:
        return self.path / safe_key(rel)


class LocalStore:
    """A store in a local directory (the local backend's default)."""

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

    def location(self, run: str) -> str:
        return str(self.run_dir(run))

    def local_dir(self, run: str) -> Path:
        """A local working directory for a run: for a directory store, the run's own directory."""
        d = self.run_dir(run)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def claim_run(self, run: str) -> bool:
        """Take `run` as a new run's id: False if the id is in use. One mkdir, so of two processes that pick the
        same id exactly one gets it, and an existing run is never written over."""
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        try:
            self.run_dir(run).mkdir()
        except FileExistsError:
            return False
        return True

    def stage_dir(self, run: str, stage: str) -> Path:
        return self.run_dir(run) / safe_key(stage)

    def scratch_dir(self, run: str, stage: str) -> Path:
        """Where a stage writes before publishing; on the store's filesystem so publishing can hard-link."""
        d = self.run_dir(run) / ".scratch" / safe_key(stage)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- small documents (run record, state)
    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        write_atomic(self.root / safe_key(key), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    def read_json(self, key: str) -> dict[str, Any] | None:
        path = self.root / safe_key(key)
        if not path.is_file():
            return None
        return parse_document(path.read_bytes(), str(path))

    def read_text(self, key: str) -> str | None:
        path = self.root / safe_key(key)
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    def write_text(self, key: str, text: str) -> None:
        write_atomic(self.root / safe_key(key), text)

    def put_file(self, key: str, path: Path) -> None:
        target = self.root / safe_key(key)
        if target.resolve() != path.resolve():
            copy_atomic(path, target)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def list_runs(self) -> list[str]:
        base = self.root / "runs"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "run.json").is_file())

    # -- stage handoff
    def manifest(self, run: str, stage: str) -> dict[str, Any] | None:
        key = f"runs/{run}/{stage}/{MANIFEST}"
        doc = self.read_json(key)
        return None if doc is None else check_manifest(doc, str(self.root / key))

    def publish(
        self, run: str, stage: str, src: Path, manifest: dict[str, Any], progress: Progress | None = None
    ) -> dict[str, Any]:
        """Move `src`'s files into the stage's place, then write the manifest (the commit point)."""
        dest = self.stage_dir(run, stage)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)  # a re-run is incomplete until its manifest lands
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if rel == MANIFEST:
                continue
            target = dest / rel
            copy_atomic(path, target, link=True)
            files[rel] = {"sha256": sha256_file(target), "size": target.stat().st_size}
            if progress:
                progress(files[rel]["size"])
        doc = manifest_doc(run, stage, manifest, files)
        self.write_json(f"runs/{run}/{stage}/{MANIFEST}", doc)
        return doc

    def fetch(
        self,
        run: str,
        stage: str,
        dest: Path | None = None,
        select: Callable[[str], bool] | None = None,
        progress: Progress | None = None,
    ) -> StageArtifacts:
        """A completed stage's files, every checksum verified against its manifest (copied to `dest` if given)."""
        doc = completed_manifest(self, run, stage)
        base = self.stage_dir(run, stage)
        for rel, meta in selected_files(doc, select):
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
        return StageArtifacts(run, stage, dest or base, doc)


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


def completed_manifest(store: Store, run: str, stage: str) -> dict[str, Any]:
    """The stage's manifest; a stage without one has not completed and must not be consumed."""
    doc = store.manifest(run, stage)
    if doc is None:
        raise ArtifactError(f"stage '{stage}' of run {run} has no manifest in {store.uri}: it has not completed")
    return doc


def selected_files(doc: dict[str, Any], select: Callable[[str], bool] | None) -> list[tuple[str, dict[str, Any]]]:
    return [(rel, meta) for rel, meta in doc.get("files", {}).items() if select is None or select(rel)]


Progress = Callable[[int], None]
Store = Union[LocalStore, "S3Store"]


def default_store_uri() -> str:
    env = os.environ.get("TUNECTL_STORE")
    if env:
        return env
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return str(data_home / "tunectl")


def open_store(uri: str | None = None) -> Store:
    uri = uri or default_store_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme else uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"store {redact(uri)}: expected s3://BUCKET[/PREFIX]")
        if "@" in parsed.netloc:
            raise ConfigError(
                f"store {redact(uri)}: credentials do not belong in the store URI; "
                f"set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        from .s3store import S3Store

        return S3Store(parsed.netloc, parsed.path)
    raise ConfigError(
        f"store {redact(uri)}: unsupported scheme '{parsed.scheme}' (use a directory, file:// or s3:// URI)"
    )
