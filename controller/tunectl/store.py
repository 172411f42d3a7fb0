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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlparse

from .errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from .s3store import S3Store

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "tunectl.dev/manifest/v1"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    return sha256_prefix(path, path.stat().st_size).hexdigest()


def sha256_prefix(path: Path, length: int) -> hashlib._Hash:
    """The running sha256 of the first `length` bytes of `path`, to be continued with what follows them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0 and (chunk := f.read(min(_CHUNK, length))):
            h.update(chunk)
            length -= len(chunk)
    return h


def matches(path: Path, meta: dict[str, Any]) -> bool:
    """Whether `path` holds exactly the file a manifest entry describes (size first: it is free)."""
    return path.is_file() and path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"]


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

    def stage_dir(self, run: str, stage: str) -> Path:
        return self.run_dir(run) / safe_key(stage)

    def scratch_dir(self, run: str, stage: str) -> Path:
        """Where a stage writes before publishing; on the store's filesystem so publishing can hard-link."""
        d = self.run_dir(run) / ".scratch" / safe_key(stage)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- small documents (run record, state)
    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        path = self.root / safe_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # readers never see a half-written document

    def read_json(self, key: str) -> dict[str, Any] | None:
        path = self.root / safe_key(key)
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def read_text(self, key: str) -> str | None:
        path = self.root / safe_key(key)
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    def write_text(self, key: str, text: str) -> None:
        path = self.root / safe_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def put_file(self, key: str, path: Path) -> None:
        target = self.root / safe_key(key)
        if target.resolve() != path.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def list_runs(self) -> list[str]:
        base = self.root / "runs"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "run.json").is_file())

    # -- stage handoff
    def manifest(self, run: str, stage: str) -> dict[str, Any] | None:
        return self.read_json(f"runs/{run}/{stage}/{MANIFEST}")

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
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
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
                if not matches(path, meta):
                    raise ArtifactError(
                        f"run {run} stage {stage}: {rel} does not match its manifest checksum (corrupted); "
                        f"re-run the stage"
                    )
                if target is not None:
                    _copy(path, target)
            if progress:
                progress(meta["size"])
        return StageArtifacts(run, stage, dest or base, doc)


def manifest_doc(run: str, stage: str, manifest: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    return {"schema": MANIFEST_SCHEMA, "run": run, "stage": stage, **manifest, "files": files}


def completed_manifest(store: Store, run: str, stage: str) -> dict[str, Any]:
    """The stage's manifest; a stage without one has not completed and must not be consumed."""
    doc = store.manifest(run, stage)
    if doc is None:
        raise ArtifactError(f"stage '{stage}' of run {run} has no manifest in {store.uri}: it has not completed")
    return doc


def selected_files(doc: dict[str, Any], select: Callable[[str], bool] | None) -> list[tuple[str, dict[str, Any]]]:
    return [(rel, meta) for rel, meta in doc.get("files", {}).items() if select is None or select(rel)]


def _copy(src: Path, target: Path) -> None:
    """Copy a verified file; a partial copy never takes the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)


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
            raise ConfigError(f"store {uri}: expected s3://BUCKET[/PREFIX]")
        from .s3store import S3Store

        return S3Store(parsed.netloc, parsed.path)
    raise ConfigError(f"store {uri}: unsupported scheme '{parsed.scheme}' (use a directory, file:// or s3:// URI)")
