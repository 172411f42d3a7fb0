"""The run model, in one place: the pipeline's stages and their order, the one vocabulary of stage and run states,
how stage states add up to a run state, the stage programs' `error:` line, and the typed status records every
backend returns and the CLI prints (`--output json` is `to_dict()` of the same records).

Both backends speak it: the local backend (stages as processes, state in the store) and the Kubernetes backend
(stages as Jobs, state read from the cluster by `kubestatus`). Nothing here imports a backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe

# The pipeline: every stage in order. A run has a prefix of it (stages_for); each stage reads the one before it.
STAGES: tuple[str, ...] = ("train", "merge", "gguf")


def stages_for(recipe: Recipe) -> list[str]:
    """The stages a run of `recipe` has: train always; merge when anything is exported; gguf when GGUF is."""
    e = recipe.export
    stages = ["train"]
    if e.lora or e.merged_16bit or e.merged_4bit or e.gguf:
        stages.append("merge")
    if e.gguf:
        stages.append("gguf")
    return stages


def upstream_of(stage: str) -> str | None:
    """The stage whose artifacts `stage` reads (None for the first)."""
    i = STAGES.index(stage)
    return STAGES[i - 1] if i else None


class _State(StrEnum):
    """A state is its string everywhere (JSON, tables, comparisons with "failed")."""


class StageState(_State):
    PENDING = "pending"  # about to run: its process or pod is being started, scheduled, or queued (Kueue)
    WAITING = "waiting"  # held until its upstream stage's manifest is complete
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # finished and its manifest is published
    FAILED = "failed"
    SKIPPED = "skipped"  # never started: an upstream stage did not succeed
    CANCELLED = "cancelled"  # stopped by the user (Ctrl-C or SIGTERM of a local submit)
    INTERRUPTED = "interrupted"  # the local process driving it died while it ran
    MISSING = "missing"  # its Job is gone (deleted, cancelled, expired by its TTL)


class RunState(_State):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    INCOMPLETE = "incomplete"  # a stage's Job is missing
    UNKNOWN = "unknown"  # its records cannot be read (the reason says why)


# A stage in one of these states will not change again by itself.
FINAL = frozenset(
    {
        StageState.SUCCEEDED,
        StageState.FAILED,
        StageState.SKIPPED,
        StageState.CANCELLED,
        StageState.INTERRUPTED,
        StageState.MISSING,
    }
)


def run_state(states: Iterable[str]) -> RunState:
    """A run's state from its stages' states, in stage order. The first rule that matches wins: every stage
    succeeded; one failed; one's Job is missing (incomplete); one runs; one was cancelled; one was interrupted;
    all are final yet not all succeeded (a stage skipped after an upstream that published nothing): failed;
    else pending."""
    s = [StageState(x) for x in states]
    if not s:
        return RunState.UNKNOWN
    if all(x == StageState.SUCCEEDED for x in s):
        return RunState.SUCCEEDED
    for stage_state, state in (
        (StageState.FAILED, RunState.FAILED),
        (StageState.MISSING, RunState.INCOMPLETE),
        (StageState.RUNNING, RunState.RUNNING),
        (StageState.CANCELLED, RunState.CANCELLED),
        (StageState.INTERRUPTED, RunState.INTERRUPTED),
    ):
        if stage_state in s:
            return state
    if all(x in FINAL for x in s):
        return RunState.FAILED
    return RunState.PENDING


# -- the error line --------------------------------------------------------------------------------------------

# A stage program (and the CLI) that fails prints one line, `error: <what to fix>`, as its last on stderr.
ERROR_PREFIX = "error: "


def format_error(message: str) -> str:
    """The error line for `message` (one line: a multi-line message is joined)."""
    return ERROR_PREFIX + " ".join(message.split())


def error_line(text: str) -> str | None:
    """The message of the last error line in a stage's output (its log), or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :]
    return None


# -- time ------------------------------------------------------------------------------------------------------


def duration(started: str | None, finished: str | None, now: datetime) -> float | None:
    """Seconds from `started` to `finished` (or `now`), from ISO 8601 timestamps as the store or the API writes
    them; None without a start or with a timestamp that is not one (a hand-edited record)."""
    if not started:
        return None
    try:
        start = datetime.fromisoformat(started.replace("Z", "+00:00"))
        end = datetime.fromisoformat(finished.replace("Z", "+00:00")) if finished else now
        return round((end - start).total_seconds(), 1)
    except (TypeError, ValueError):
        return None


# -- records ---------------------------------------------------------------------------------------------------


def _plain(record: Any) -> dict[str, Any]:
    """The record's fields that are set, in declaration order; nested records as dicts."""
    out: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is None:
            continue
        if isinstance(value, list):
            value = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
        elif isinstance(value, _State):
            value = value.value
        out[f.name] = value
    return out


def manifest_phases(manifest: dict[str, Any]) -> dict[str, float] | None:
    """Seconds per phase of a finished stage, in the order it ran them, led by "start-up": the stage program's time
    outside any phase (imports of the ML libraries, Unsloth's patching, opening the store)."""
    timings = manifest.get("timings") or {}
    phases, seconds = timings.get("phases"), timings.get("seconds")
    if not isinstance(phases, dict) or not isinstance(seconds, (int, float)):
        return None
    timed = {str(k): float(v) for k, v in phases.items() if isinstance(v, (int, float))}
    return {"start-up": round(max(0.0, seconds - sum(timed.values())), 1)} | {k: round(v, 1) for k, v in timed.items()}


@dataclass
class StageStatus:
    """One stage of one run, as either backend sees it."""

    stage: str
    state: StageState
    reason: str | None = None  # why it is in this state, in words a user can act on
    error: str | None = None  # the stage program's own error line, when it failed with one
    started: str | None = None  # ISO 8601
    finished: str | None = None
    seconds: float | None = None
    exit_code: int | None = None
    attempts: int | None = None  # when more than one: pods started (Kubernetes), starts of the stage (local)
    earlier_seconds: float | None = None  # local: the earlier attempts' seconds (Kubernetes: in `seconds`)
    job: str | None = None  # Kubernetes: the stage's Job
    metrics: dict[str, Any] | None = None  # from the stage's manifest
    notes: list[str] | None = None  # from the stage's manifest: what was substituted on this machine
    files: int | None = None  # files in the stage's manifest
    checkpoint: dict[str, Any] | None = None  # train, unfinished: its newest checkpoint (step, saved, why, bytes)
    phases: dict[str, float] | None = None  # from the stage's manifest: seconds per phase (manifest_phases)

    def __post_init__(self) -> None:
        self.state = StageState(self.state)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass
class RunStatus:
    """One run: what was submitted, where, its state and its stages."""

    run: str
    recipe: str
    backend: str  # "local" | "kubernetes"
    state: RunState
    created: str
    stages: list[StageStatus] = field(default_factory=list)
    path: str | None = None  # where its artifacts are
    store: str | None = None
    namespace: str | None = None  # Kubernetes
    context: str | None = None  # Kubernetes
    reconciler: str | None = None  # Kubernetes: the reconciler Job's state, or "none"
    reason: str | None = None  # why the state is unknown
    tunectl: str | None = None  # the version that created it (local)

    def __post_init__(self) -> None:
        self.state = RunState(self.state)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def failure(self) -> str | None:
        """One line saying why the run did not succeed (None if it did), naming the stage and where its log is."""
        if self.state == RunState.SUCCEEDED:
            return None
        culprit = next((s for s in self.stages if s.state == StageState.FAILED), None)
        culprit = culprit or next((s for s in self.stages if s.state != StageState.SUCCEEDED), None)
        if culprit is None:
            return f"run {self.run} is {self.state}" + (f": {self.reason}" if self.reason else "")
        why = "; ".join(x for x in (culprit.error, culprit.reason) if x) or str(culprit.state)
        return (
            f"stage {culprit.stage} of run {self.run} {culprit.state}: {why} "
            f"(full log: tunectl logs {self.run} --stage {culprit.stage})"
        )
