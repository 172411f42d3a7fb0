"""Run ids: `<recipe>-<utc yyyymmdd-hhmmss>-<4 hex>`, a valid DNS-1123 label (<= 63 chars)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def new_run_id(recipe_name: str, now: datetime | None = None, max_len: int = 63) -> str:
    """`max_len` leaves room for suffixes such as the Kubernetes backend's "-reconciler"."""
    now = now or datetime.now(UTC)
    stem = re.sub(r"[^a-z0-9-]+", "-", recipe_name.lower()).strip("-") or "run"
    suffix = f"-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    return stem[: max_len - len(suffix)].rstrip("-") + suffix


def is_run_id(s: str) -> bool:
    return bool(_LABEL.match(s))
