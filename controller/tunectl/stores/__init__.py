"""Artifact stores: where stages hand their outputs to each other, behind one `Store` interface (base.py).

- `local.py`: `LocalStore`, a directory (the local backend's default).
- `s3.py`: `S3Store`, an S3 bucket and prefix (AWS S3, MinIO, ...). Imported on first use, by `open_store` or
  `from tunectl.stores.s3 import S3Store`: a directory store does not need its transfer machinery.
- `manifest.py`: the manifest that commits a stage, checksums, key and document checks, shared by both.

`open_store` picks the store from a URI: a directory, file://... or s3://BUCKET[/PREFIX].
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError, redact
from .base import Progress, Store
from .local import LocalStore
from .manifest import CorruptDocument, StageArtifacts

__all__ = ["CorruptDocument", "LocalStore", "Progress", "StageArtifacts", "Store", "default_store_uri", "open_store"]


def default_store_uri() -> str:
    """TUNECTL_STORE, else `$XDG_DATA_HOME/tunectl` (`~/.local/share/tunectl`)."""
    env = os.environ.get("TUNECTL_STORE")
    if env:
        return env
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return str(data_home / "tunectl")


def open_store(uri: str | None = None) -> Store:
    """The store `uri` names (default: `default_store_uri()`); one line naming the fix for a URI that is not one."""
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
        from .s3 import S3Store

        return S3Store(parsed.netloc, parsed.path)
    raise ConfigError(
        f"store {redact(uri)}: unsupported scheme '{parsed.scheme}' (use a directory, file:// or s3:// URI)"
    )
