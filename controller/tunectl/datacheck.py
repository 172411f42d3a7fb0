"""Checks on an Alpaca-format data set, shared by the submit-time preflight and the train stage."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError
from .recipe import DataSpec


def check_columns(found: list[str], rows: int, spec: DataSpec, source: str) -> None:
    if rows == 0:
        raise ConfigError(f"data set {source} has no rows")
    cols = spec.columns
    for role in ("instruction", "output"):
        name = getattr(cols, role)
        if name not in found:
            raise ConfigError(
                f"data set {source} has no '{name}' column (found: {', '.join(found) or 'none'}); "
                f"rename it or map it with --set data.columns.{role}=<column>"
            )


def peek_local_file(path: Path, spec: DataSpec, source: str) -> None:
    """Fast check of a local JSON / JSONL file before a run is created (the train stage checks every format)."""
    if path.suffix not in (".json", ".jsonl"):
        return
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            doc = json.loads(text) if text.strip() else []
            rows = doc if isinstance(doc, list) else doc.get("data", doc.get("train", []))
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"data set {source}: not valid {path.suffix[1:].upper()} ({e})") from None
    if rows and not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"data set {source}: every record must be a JSON object")
    found = sorted({k for r in rows for k in r}) if rows else []
    check_columns(found, len(rows), spec, source)
