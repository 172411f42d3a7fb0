"""Where a recipe's `model.name` or `data.source` points: a local path, a file inside an installed
Python package (`package:<module>/<file>`), or a Hugging Face Hub id."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class Ref:
    raw: str
    path: Path | None  # set for local files and package files
    hub_id: str | None  # set for Hub ids

    @property
    def is_local(self) -> bool:
        return self.path is not None


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.endswith((".gguf", ".json", ".jsonl", ".parquet", ".csv"))


def resolve(ref: str, what: str) -> Ref:
    """Resolve without importing the package (some data packages import heavy plugins on import)."""
    if ref.startswith(PACKAGE_PREFIX):
        module, _, inner = ref[len(PACKAGE_PREFIX) :].partition("/")
        # A top-level name only (find_spec of `a.b` imports `a`), and a file inside it: in an image, a path
        # that climbs out of the package would read whatever else the container holds.
        if not module.isidentifier() or not inner or inner.startswith("/") or ".." in inner.split("/"):
            raise ConfigError(f"{what} {ref}: expected package:<module>/<file inside it>")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{what} {ref}: Python package '{module}' is not installed (pip install it)")
        root = Path(list(spec.submodule_search_locations)[0])
        path = root / inner
        if not path.resolve().is_relative_to(root.resolve()):
            raise ConfigError(f"{what} {ref}: leads outside package '{module}' (through a link)")
        if not path.exists():
            raise ConfigError(f"{what} {ref}: {path} does not exist in package '{module}'")
        return Ref(ref, path, None)
    path = Path(ref).expanduser()
    if path.exists():
        return Ref(ref, path.resolve(), None)
    if _looks_like_path(ref) or ref.count("/") != 1:
        raise ConfigError(f"{what} {ref}: path does not exist (a Hub id looks like owner/name)")
    return Ref(ref, None, ref)
