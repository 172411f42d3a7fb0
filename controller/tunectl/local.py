"""The local backend: the same stage programs the containers run, as subprocesses, in order.

Each run lives in the store under `runs/<run-id>/`: `run.json` (what was submitted), `recipe.yaml` (the
resolved recipe every stage reads), `state.json` (per-stage state and timings), `logs/<stage>.log`, and one
directory per stage whose `manifest.json` marks it complete.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from . import __version__, checkpoints
from .backend import LOCAL, Backend, Echo, Submission, SubmitRequest
from .datacheck import check_eval_rows, peek_local_file
from .errors import ConfigError, TunectlError, redact
from .files import create_fresh, write_atomic
from .recipe import Recipe
from .refs import resolve
from .runid import is_run_id, new_run_id
from .runmodel import (
    RunState,
    RunStatus,
    StageState,
    StageStatus,
    duration,
    error_line,
    manifest_phases,
    run_state,
    stages_for,
)
from .stageexit import STATUS_ENV, describe, phase_text, read_status_file
from .stores import CorruptDocument, Store

# How long a stage may take to exit after SIGTERM before its process group is killed: train finishes the step in
# flight and saves a checkpoint in it (a CPU step of the tiny model takes seconds, 20 s and more on a loaded
# machine). A second Ctrl-C kills it at once.
STOP_GRACE_S = 120
ID_ATTEMPTS = 8  # new ids tried when the one drawn is taken (same recipe, same second, same random suffix)
_PR_SET_PDEATHSIG = 1


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def preflight(recipe: Recipe) -> None:
    """Everything that can be checked without torch, before a run exists (bad input never leaves a run)."""
    model = resolve(recipe.model.name, "model")
    if model.path is not None and model.path.is_dir() and not (model.path / "config.json").is_file():
        raise ConfigError(f"model {recipe.model.name}: {model.path} has no config.json (not a model directory)")
    if recipe.model.merge_base:
        resolve(recipe.model.merge_base, "model.merge_base")
    data = resolve(recipe.data.source, "data set")
    if data.path is not None:
        if not data.path.is_file():
            raise ConfigError(f"data set {recipe.data.source}: {data.path} is not a file")
        local = peek_local_file(data.path, recipe.data, recipe.data.source)
        if local is not None:
            check_eval_rows(local.count, recipe.data, recipe.data.source)
    if recipe.export.gguf:
        from tunectl_jobs import llamacpp  # light: no torch at import

        llamacpp.converter()
    if recipe.export.merged_4bit:
        import torch  # only for this option: the stages run on this machine, so its GPU decides

        if not torch.cuda.is_available():
            raise ConfigError("export.merged_4bit needs a CUDA GPU (bitsandbytes) and this machine has none")


class StageFailed(TunectlError):
    pass


def _earlier_attempts(entry: dict[str, Any]) -> dict[str, Any]:
    """What a stage started again (`tunectl resume`) carries of its earlier attempts: how many there were and the
    seconds they ran (an attempt whose end was not recorded, its tunectl killed, counts without its seconds)."""
    if not entry.get("started"):
        return {}
    ran = duration(_text(entry.get("started")), _text(entry.get("finished")), datetime.now(UTC))
    earlier = (entry.get("earlier_seconds") or 0.0) + (ran if entry.get("finished") and ran else 0.0)
    return {"attempts": (entry.get("attempts") or 1) + 1, **({"earlier_seconds": round(earlier, 1)} if earlier else {})}


class LocalBackend(Backend):
    name = LOCAL
    runs_here = True

    def __init__(self, store: Store):
        self.store = store

    def describe(self) -> str:
        return redact(self.store.uri)

    # -- records
    def _state(self, run: str) -> dict[str, Any]:
        state = self.store.read_json(f"runs/{run}/state.json") or {}
        if not all(isinstance(v, dict) for v in state.values()):
            where = f"{self.store.location(run)}/state.json"
            raise CorruptDocument(f"{where} is corrupt (a stage entry is not an object): repair or remove it")
        return state

    def _save_state(self, run: str, state: dict[str, Any]) -> None:
        self.store.write_json(f"runs/{run}/state.json", state)

    def has(self, run: str) -> bool:
        try:
            return self.store.read_json(f"runs/{run}/run.json") is not None
        except CorruptDocument:
            return True  # there, if damaged: `status` says so

    def run_record(self, run: str) -> dict[str, Any]:
        doc = self.store.read_json(f"runs/{run}/run.json")
        if doc is None:
            known = self.store.list_runs()
            hint = f"; known runs: {', '.join(known[-5:])}" if known else "; no runs yet"
            raise TunectlError(f"no run '{run}' in {redact(self.store.uri)}{hint}")
        stages = doc.get("stages")
        if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
            where = f"{self.store.location(run)}/run.json"
            raise CorruptDocument(f"{where} is corrupt (no 'stages' list): repair or remove it")
        return doc

    def list_runs(self) -> list[RunStatus]:
        """Every run's status. A run whose records cannot be read is listed with state "unknown" and the reason,
        so one damaged run never hides the others."""
        rows = []
        for run in self.store.list_runs():
            try:
                rows.append(self.status(run))
            except CorruptDocument as e:
                try:
                    record = self.store.read_json(f"runs/{run}/run.json") or {}
                except CorruptDocument:
                    record = {}
                rows.append(
                    RunStatus(
                        run=run,
                        recipe=str(record.get("recipe", "?")),
                        backend=str(record.get("backend", LOCAL)),
                        state=RunState.UNKNOWN,
                        created=str(record.get("created", "?")),
                        reason=str(e),
                        path=self.store.location(run),
                    )
                )
        return rows

    # -- submit
    def submit(self, request: SubmitRequest, echo: Echo) -> Submission:
        if request.values or request.helm_sets:
            raise ConfigError("--values and --helm-set are for Kubernetes runs (--backend kubernetes)")
        if request.recipe.training.nnodes > 1:
            raise ConfigError(
                f"training.nnodes {request.recipe.training.nnodes}: the local backend runs on one machine; "
                f"use --backend kubernetes, or training.nnodes 1 with training.nproc_per_node"
            )
        run = self.create(request.recipe, request.run_id)
        return Submission(run, self.run_record(run)["stages"], created=True)

    def create(self, recipe: Recipe, run_id: str | None = None) -> str:
        """A new run of `recipe`: its id (`run_id`, or a new one) is claimed in the store first, so an existing
        run is never written over; a given id that is taken is an error, a drawn one is drawn again."""
        preflight(recipe)
        if run_id is not None and not is_run_id(run_id):
            raise ConfigError(f"run id '{run_id}' is not a DNS label (lowercase letters, digits and '-', <= 63)")
        self.store.check()
        run = self._claim(recipe, run_id)
        stages = stages_for(recipe)
        recipe_file = self.store.local_dir(run) / "recipe.yaml"  # the file the stage programs read
        write_atomic(recipe_file, recipe.to_yaml())
        self.store.put_file(f"runs/{run}/recipe.yaml", recipe_file)
        self._save_state(run, {s: {"state": str(StageState.PENDING)} for s in stages})
        self.store.write_json(
            f"runs/{run}/run.json",
            {
                "run": run,
                "recipe": recipe.name,
                "backend": LOCAL,
                "created": now(),
                "stages": stages,
                "store": self.store.uri,
                "tunectl": __version__,
            },
        )
        return run

    def _claim(self, recipe: Recipe, run_id: str | None) -> str:
        if run_id is not None:
            if not self.store.claim_run(run_id):
                raise TunectlError(f"run {run_id} already exists in {redact(self.store.uri)}: choose another id")
            return run_id
        for _ in range(ID_ATTEMPTS):
            run = new_run_id(recipe.name)
            if self.store.claim_run(run):
                return run
        raise TunectlError(f"could not find an unused run id in {redact(self.store.uri)} after {ID_ATTEMPTS} tries")

    def wait(self, run: str, echo: Echo | None, poll_seconds: float = 0.0) -> RunStatus:
        """Run the run's pending stages here (`execute`); its status once it ended, failed or not."""
        try:
            self.execute(run, echo)
        except StageFailed:
            pass  # the status says which stage and why
        return self.status(run)

    def resume(self, run: str, echo: Echo | None) -> RunStatus:
        """Run the stages that have not published, in order; train goes on from its newest checkpoint."""
        current = self.status(run)
        if current.state == RunState.SUCCEEDED:
            raise ConfigError(f"run {run} has already succeeded: nothing to resume")
        running = [s.stage for s in current.stages if s.state == StageState.RUNNING]
        if running:
            raise ConfigError(f"run {run} is still running ({running[0]}): wait for it, or stop it with Ctrl-C first")
        return self.wait(run, echo)

    def execute(self, run: str, echo: Echo | None = None) -> None:
        """Run every pending stage in order; the first failure stops the run and skips the rest.

        SIGTERM is taken as Ctrl-C here: the running stage is stopped and waited for, then the run is marked
        cancelled. A stage never outlives this process (it gets SIGTERM if this process is killed)."""
        if threading.current_thread() is not threading.main_thread():
            return self._execute(run, echo)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return self._execute(run, echo)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _execute(self, run: str, echo: Echo | None) -> None:
        stages = self.run_record(run)["stages"]
        state = self._state(run)
        for i, stage in enumerate(stages):
            done = state.get(stage, {}).get("state") == StageState.SUCCEEDED
            if done and self.store.manifest(run, stage) is not None:
                continue
            state[stage] = {"state": str(StageState.RUNNING), "started": now(), "pid": os.getpid(),
                            **_earlier_attempts(state.get(stage, {}))}  # fmt: skip
            self._save_state(run, state)
            try:
                rc, error = self._run_stage(run, stage, echo)
            except KeyboardInterrupt:
                state[stage].update(state=str(StageState.CANCELLED), finished=now())
                self._skip(run, state, stages[i + 1 :])
                raise
            state[stage].update(finished=now(), exit_code=rc)
            if rc == 0 and self.store.manifest(run, stage) is not None:
                state[stage]["state"] = str(StageState.SUCCEEDED)
                self._save_state(run, state)
                continue
            error = error or f"exit code {rc}, without a manifest"
            state[stage].update(state=str(StageState.FAILED), error=error)
            self._skip(run, state, stages[i + 1 :])
            raise StageFailed(
                f"stage {stage} of run {run} failed: {error} (full log: tunectl logs {run} --stage {stage})"
            )

    def _skip(self, run: str, state: dict[str, Any], rest: list[str]) -> None:
        for s in rest:
            state[s] = {"state": str(StageState.SKIPPED), "reason": "an upstream stage did not succeed"}
        self._save_state(run, state)

    def _run_stage(self, run: str, stage: str, echo: Echo | None) -> tuple[int, str | None]:
        work = self.store.local_dir(run)
        log_path = work / "logs" / f"{stage}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        status_path = work / "logs" / f"{stage}.status"  # where the stage is (tunectl.stageexit)
        status_path.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            f"tunectl_jobs.{stage}",
            "--recipe",
            str(work / "recipe.yaml"),
            "--store",
            self.store.uri,
            "--run",
            run,
        ]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            STATUS_ENV: str(status_path),
        }
        with create_fresh(log_path) as log:  # a new file: never appended to through a link left at its name
            # Its own process group (Ctrl-C in a terminal reaches this process, which stops the whole group and
            # waits for it), bound to this process's life.
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
            )
            assert isinstance(proc.stdout, io.BufferedReader)  # a pipe: read1 returns what is there, as it comes
            pending = b""
            try:
                while chunk := proc.stdout.read1(65536):
                    log.write(chunk)
                    log.flush()
                    if echo is not None:
                        echo(chunk.decode("utf-8", "replace"))
                    pending = (pending + chunk)[-8192:]
                rc = proc.wait()
            except BaseException:
                _stop(proc)
                # What it said while stopping (a checkpoint saved on SIGTERM) belongs in its log too.
                rest = proc.stdout.read()
                log.write(rest)
                if echo is not None and rest:
                    echo(rest.decode("utf-8", "replace"))
                raise
        self.store.put_file(f"runs/{run}/logs/{stage}.log", log_path)
        if rc == 0:
            return rc, None
        error = error_line(pending.decode("utf-8", "replace"))
        # Never the last log line: a signal is named with the phase the stage was in.
        return rc, describe(rc, read_status_file(status_path), error)

    # -- inspect
    def status(self, run: str) -> RunStatus:
        record = self.run_record(run)
        state = self._state(run)
        clock = datetime.now(UTC)
        stages = [self._stage_status(run, stage, state.get(stage, {}), clock) for stage in record["stages"]]
        return RunStatus(
            run=run,
            recipe=str(record.get("recipe", "?")),  # "?": a hand-edited record
            backend=str(record.get("backend", LOCAL)),
            state=run_state(s.state for s in stages),
            created=str(record.get("created", "?")),
            stages=stages,
            path=self.store.location(run),
            store=self.store.uri,  # where this run is read from: a run copied to another store reads its copy
            tunectl=record.get("tunectl"),
        )

    def _stage_status(self, run: str, stage: str, entry: dict[str, Any], clock: datetime) -> StageStatus:
        raw = entry.get("state", StageState.PENDING)
        try:
            state = StageState(raw)
        except (ValueError, TypeError):
            where = f"{self.store.location(run)}/state.json"
            problem = f"stage {stage} has state {raw!r}"
            raise CorruptDocument(f"{where} is corrupt ({problem}): repair or remove it") from None
        s = StageStatus(
            stage,
            state,
            reason=_text(entry.get("reason")),
            error=_text(entry.get("error")),
            started=_text(entry.get("started")),
            finished=_text(entry.get("finished")),
            exit_code=entry.get("exit_code") if isinstance(entry.get("exit_code"), int) else None,
            attempts=entry.get("attempts") if isinstance(entry.get("attempts"), int) else None,
            earlier_seconds=entry.get("earlier_seconds")
            if isinstance(entry.get("earlier_seconds"), (int, float))
            else None,
        )
        if s.state == StageState.RUNNING and not _alive(entry.get("pid")):
            s.state = StageState.INTERRUPTED
        elif s.state == StageState.RUNNING:
            at = phase_text(read_status_file(self.store.local_dir(run) / "logs" / f"{stage}.status"))
            if at:
                s.reason = f"in {at}"
        s.seconds = duration(s.started, s.finished, clock)
        if stage == "train" and s.state != StageState.SUCCEEDED:
            s.checkpoint = checkpoints.newest(self.store, run)
        manifest = self.store.manifest(run, stage)
        if manifest:
            seconds = (manifest.get("timings") or {}).get("seconds")
            if isinstance(seconds, (int, float)):
                s.seconds = seconds
            s.metrics = manifest.get("metrics", {})
            s.notes = manifest.get("notes", [])
            s.files = len(manifest["files"])
            s.phases = manifest_phases(manifest)
        return s

    def logs(self, run: str, stage: str | None, follow: bool = False) -> Iterator[tuple[str, str]]:
        if follow:
            raise ConfigError("--follow is for Kubernetes runs; a local run streams while it runs")
        stages = self.run_record(run)["stages"]
        if stage is not None and stage not in stages:
            raise TunectlError(f"run {run} has no stage '{stage}' (stages: {', '.join(stages)})")
        return iter(self._logs(run, [stage] if stage else stages))

    def _logs(self, run: str, stages: list[str]) -> list[tuple[str, str]]:
        out = []
        for s in stages:
            live = self.store.local_dir(run) / "logs" / f"{s}.log"  # a running stage's log is only here yet
            text = (
                live.read_text(errors="replace") if live.is_file() else self.store.read_text(f"runs/{run}/logs/{s}.log")
            )
            if text is not None:
                out.append((s, text))
        return out

    def cancel(self, run: str, echo: Echo | None = None) -> dict[str, int]:
        raise ConfigError("cancel is for Kubernetes runs; stop a local run with Ctrl-C")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _die_with(parent: int) -> Callable[[], None]:
    """Before the stage program starts: have the kernel send it SIGTERM when `parent` dies, even of SIGKILL, so
    no orphan stage publishes into a run already reported as interrupted (Linux; elsewhere nothing)."""

    try:
        prctl = ctypes.CDLL(None).prctl  # looked up here: the child between fork and exec should only call it
    except (OSError, AttributeError):
        prctl = None

    def setup() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return setup


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the stage's process group, then SIGKILL after STOP_GRACE_S or at a second Ctrl-C; returns once
    the stage is gone."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            print(f"stopping: the stage may take up to {STOP_GRACE_S}s to save its work (Ctrl-C again: kill it now)",
                  file=sys.stderr, flush=True)  # fmt: skip
        try:
            proc.wait(timeout=wait)
            break
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            continue
    proc.wait()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
