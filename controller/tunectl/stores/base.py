"""The `Store` interface: what every artifact store does, and the contract the stages rely on.

Layout, the same in every store, under its root (a directory, or an S3 bucket and prefix):

    runs/<run-id>/run.json, recipe.yaml, state.json, logs/...   the run's records (written by the backends)
    runs/<run-id>/<stage>/<files...>                            what the stage produced
    runs/<run-id>/<stage>/manifest.json                         the stage's commit point

A stage is complete when, and only when, its manifest exists: `publish` removes an old manifest before anything
else and writes the new one after every file, so an interrupted or repeated publish never looks complete. The
manifest lists each file's sha256 and size; `fetch` refuses a stage without a manifest and any file that differs
from its entry. Keys are relative and '/'-separated; one that would leave the store (`..`, an absolute path) is
refused (`safe_key`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .manifest import MANIFEST, Digests, StageArtifacts, check_manifest, safe_key

Progress = Callable[[int], None]
"""Told the number of bytes just transferred, or found already in place, as a transfer goes on."""


class Store(ABC):
    """An artifact store: a directory (`LocalStore`) or an S3 bucket and prefix (`S3Store`)."""

    # -- naming

    @property
    @abstractmethod
    def uri(self) -> str:
        """The store as `--store` / TUNECTL_STORE name it: a file:// or s3:// URI."""

    @abstractmethod
    def location(self, run: str) -> str:
        """Where run `run` is kept, for messages: a path or an s3:// URI."""

    @abstractmethod
    def where(self, key: str) -> str:
        """The object at `key` as error messages name it: a path, or an s3:// URI."""

    # -- local working space

    @abstractmethod
    def local_dir(self, run: str) -> Path:
        """A local directory for run `run` (created): the run's own directory in a directory store, a cache
        directory for a remote one. The recipe file the stages read and the logs being written live here."""

    def scratch_dir(self, run: str, stage: str) -> Path:
        """Where a stage writes its outputs before publishing them (created). It lies under `local_dir`, so a
        directory store publishes by hard-linking."""
        d = self.local_dir(run) / ".scratch" / safe_key(stage)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- runs

    @abstractmethod
    def check(self) -> None:
        """Fail early, with one line, where the store cannot be used (a missing bucket, bad credentials)."""

    @abstractmethod
    def claim_run(self, run: str) -> bool:
        """Take `run` as a new run's id: False if anything is stored under it. Atomic: of two clients that pick
        the same id exactly one gets it, and an existing run is never written over."""

    @abstractmethod
    def list_runs(self) -> list[str]:
        """The ids of the runs that have a `run.json` (readable or not), sorted."""

    # -- small documents (run record, state, logs)

    @abstractmethod
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at `key`; None where there is none. Anything but a JSON object is a CorruptDocument
        naming `where(key)`."""

    @abstractmethod
    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        """Replace the object at `key` with `doc` as indented UTF-8 JSON, whole: a reader never sees half of it."""

    @abstractmethod
    def read_text(self, key: str) -> str | None:
        """The text at `key` (undecodable bytes replaced); None where there is none."""

    @abstractmethod
    def write_text(self, key: str, text: str) -> None:
        """Replace the object at `key` with `text`, whole."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Replace the object at `key` with a copy of the local file `path`, whole."""

    # -- stage handoff

    def manifest(self, run: str, stage: str) -> dict[str, Any] | None:
        """The stage's manifest; None while the stage has not completed. A manifest without a usable file list is
        a CorruptDocument."""
        key = f"runs/{run}/{stage}/{MANIFEST}"
        doc = self.read_json(key)
        return None if doc is None else check_manifest(doc, self.where(key))

    def completed_manifest(self, run: str, stage: str) -> dict[str, Any]:
        """The stage's manifest; a stage without one has not completed and must not be consumed."""
        doc = self.manifest(run, stage)
        if doc is None:
            raise ArtifactError(f"stage '{stage}' of run {run} has no manifest in {self.uri}: it has not completed")
        return doc

    @abstractmethod
    def publish(
        self,
        run: str,
        stage: str,
        src: Path,
        manifest: dict[str, Any],
        progress: Progress | None = None,
        digests: Digests | None = None,
    ) -> dict[str, Any]:
        """Commit the files under the local directory `src` as the stage's artifacts and return the manifest.

        The stage's old manifest goes first; then every file (a `manifest.json` in `src` excepted), its sha256
        and size recorded; last the manifest: `manifest` (metrics and the like) plus schema, run, stage and
        the file list. Safe to repeat after an interruption; files already in place may be skipped. `digests`
        gives a file's sha256 where it was computed already (EarlyChecksums), else None."""

    @abstractmethod
    def delete(self, run: str, stage: str) -> None:
        """Remove a stage's artifacts: its manifest first, so a half-deleted stage never looks complete, then every
        other object under it. Nothing there is not an error."""

    @abstractmethod
    def fetch(
        self,
        run: str,
        stage: str,
        dest: Path | None = None,
        select: Callable[[str], bool] | None = None,
        progress: Progress | None = None,
    ) -> StageArtifacts:
        """A completed stage's files (those `select` accepts, all by default) in a local directory, each one
        verified against the manifest's sha256: copied into `dest` where given, else wherever the store keeps
        them locally. A verified file already at its destination is not transferred again. Raises ArtifactError
        for a stage without a manifest and for a missing or corrupted file."""
