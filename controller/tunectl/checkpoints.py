"""Training checkpoints as store artifacts, so a retried or resumed train stage goes on where the last one stopped.
(The format and its reading and writing; the train stage's Trainer callback is tunectl_jobs.checkpoints.)

Each checkpoint is the Trainer's own checkpoint directory (LoRA weights, optimizer, scheduler, RNG states, step,
trainer state) committed like a stage: `runs/<run>/checkpoints/<stage>/step-NNNNNNNN/` with its manifest written
last (checksums of every file). After a checkpoint is complete, `runs/<run>/checkpoints/<stage>/latest.json` is
replaced whole; it lists the complete ones, newest first, with the recipe's checksum. So a checkpoint torn by a
SIGKILL mid-upload is never listed, and a listed one that fails its checksums is passed over for the one before.

When they are saved (`training.save_steps`, `training.save_minutes`, and on SIGTERM) is the train stage's
business (tunectl_jobs.checkpoints); the stage then exits EXIT_PREEMPTED (75) for a retry to resume.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ConfigError, TunectlError
from .recipe import Recipe
from .stores import Store

log = logging.getLogger("tunectl")


def recipe_checksum(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()


def _prefix(stage: str) -> str:
    return f"checkpoints/{stage}"


def _name(stage: str, step: int) -> str:
    return f"{_prefix(stage)}/step-{step:08d}"


def _index_key(run: str, stage: str) -> str:
    return f"runs/{run}/{_prefix(stage)}/latest.json"


def listed(store: Store, run: str, stage: str = "train") -> list[dict[str, Any]]:
    """The complete checkpoints of a run's stage, newest first: step, saved (UTC), why, size."""
    index = store.read_json(_index_key(run, stage)) or {}
    return list(index.get("checkpoints") or [])


def newest(store: Store, run: str, stage: str = "train") -> dict[str, Any] | None:
    """The newest complete checkpoint's entry (step, saved, why, bytes), for status; None where there is none or
    the store cannot say (status must not fail for it)."""
    try:
        entries = listed(store, run, stage)
    except (TunectlError, OSError):
        return None
    return entries[0] if entries and isinstance(entries[0], dict) else None


def restore(store: Store, run: str, recipe: Recipe, dest: Path, stage: str = "train") -> tuple[Path, int] | None:
    """The newest complete checkpoint whose files verify, fetched into `dest`: (its directory, its step); None
    where there is none. A checkpoint of a different recipe is refused with one line (ConfigError)."""
    index = store.read_json(_index_key(run, stage)) or {}
    checkpoints = list(index.get("checkpoints") or [])
    if not checkpoints:
        return None
    if index.get("recipe_sha256") != recipe_checksum(recipe):
        raise ConfigError(
            f"run {run} has a checkpoint at step {checkpoints[0]['step']} from a different recipe: resume it with "
            f"the recipe it started with (tunectl status {run} shows it), or submit a new run"
        )
    for entry in checkpoints:
        target = dest / f"checkpoint-{entry['step']}"
        try:
            store.fetch(run, _name(stage, entry["step"]), target)
        except ArtifactError as e:  # missing or corrupted: the one before it is still whole
            log.warning("checkpoint at step %d is unusable (%s); trying the one before", entry["step"], e)
            shutil.rmtree(target, ignore_errors=True)
            continue
        return target, int(entry["step"])
    return None


def save(store: Store, run: str, recipe: Recipe, src: Path, step: int, why: str, stage: str = "train") -> None:
    """Commit the Trainer's checkpoint directory `src` as the checkpoint at `step`, list it first in the index, and
    delete those beyond `training.keep_checkpoints`."""
    t0 = time.monotonic()
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    store.publish(run, _name(stage, step), src, {"step": step, "why": why, "recipe_sha256": recipe_checksum(recipe)})
    entry = {"step": step, "saved": datetime.now(UTC).isoformat(timespec="seconds"), "why": why, "bytes": size}
    keep = recipe.training.keep_checkpoints
    older = [c for c in listed(store, run, stage) if c["step"] != step]
    kept, dropped = [entry, *older][:keep], older[keep - 1 :]
    store.write_json(
        _index_key(run, stage), {"recipe_sha256": recipe_checksum(recipe), "checkpoints": kept}
    )  # the commit point of the new list: only then may the old ones go
    for old in dropped:
        store.delete(run, _name(stage, old["step"]))
    log.info(
        "checkpoint at step %d saved to the store (%s, %.1f MB in %.1fs)", step, why, size / 1e6, time.monotonic() - t0
    )


def delete_all(store: Store, run: str, stage: str = "train") -> None:
    """Remove a run's checkpoints (the stage they belong to has published: nothing will resume from them)."""
    for entry in listed(store, run, stage):
        store.delete(run, _name(stage, entry["step"]))
    store.delete(run, _prefix(stage))
