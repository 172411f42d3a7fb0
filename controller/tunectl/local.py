"""The local backend: the same stage programs the containers run, as subprocesses, in order.

Each run lives in the store under `runs/<run-id>/`: `run.json` (what was submitted), `recipe.yaml` (the
resolved recipe every stage reads), `state.json` (per-stage state and timings), `logs/<stage>.log`, and one
directory per stage whose `manifest.json` marks it complete.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

from . import __version__
from .datacheck import peek_local_file
from .errors import ConfigError, TunectlError, redact
from .files import create_fresh, write_atomic
from .recipe import Recipe
from .refs import resolve
from .runid import is_run_id, new_run_id
from .stageexit import STATUS_ENV, describe, phase_text, read_status_file
from .store import CorruptDocument, Store

STAGES = ("train", "merge", "gguf")
STOP_GRACE_S = 30  # how long a stage may take to exit after SIGTERM before its process group is killed
ID_ATTEMPTS = 8  # new ids tried when the one drawn is taken (same recipe, same second, same random suffix)
_PR_SET_PDEATHSIG = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stages_for(recipe: Recipe) -> list[str]:
    e = recipe.export
    stages = ["train"]
    if e.lora or e.merged_16bit or e.merged_4bit or e.gguf:
        stages.append("merge")
    if e.gguf:
        stages.append("gguf")
    return stages


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
        peek_local_file(data.path, recipe.data, recipe.data.source)
    if recipe.export.gguf:
        from tunectl_jobs import llamacpp  # light: no torch at import

        llamacpp.converter()
    if recipe.export.merged_4bit:
        import torch  # only for this option: the stages run on this machine, so its GPU decides

        if not torch.cuda.is_available():
            raise ConfigError("export.merged_4bit needs a CUDA GPU (bitsandbytes) and this machine has none")


class StageFailed(TunectlError):
    pass


class LocalBackend:
    def __init__(self, store: Store):
        self.store = store

    # -- records
    def _state(self, run: str) -> dict[str, Any]:
        state = self.store.read_json(f"runs/{run}/state.json") or {}
        if not all(isinstance(v, dict) for v in state.values()):
            where = f"{self.store.location(run)}/state.json"
            raise CorruptDocument(f"{where} is corrupt (a stage entry is not an object): repair or remove it")
        return state

    def _save_state(self, run: str, state: dict[str, Any]) -> None:
        self.store.write_json(f"runs/{run}/state.json", state)

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

    def list_status(self) -> list[dict[str, Any]]:
        """Every run's status, for `list`. A run whose records cannot be read is listed with state "unknown" and
        the reason, so one damaged run never hides the others."""
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
                    {
                        "run": run,
                        "recipe": str(record.get("recipe", "?")),
                        "state": "unknown",
                        "created": str(record.get("created", "?")),
                        "backend": str(record.get("backend", "local")),
                        "stages": [],
                        "reason": str(e),
                        "path": self.store.location(run),
                    }
                )
        return rows

    # -- submit
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
        self._save_state(run, {s: {"state": "pending"} for s in stages})
        self.store.write_json(
            f"runs/{run}/run.json",
            {
                "run": run,
                "recipe": recipe.name,
                "backend": "local",
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

    def execute(self, run: str, echo: IO[str] | None = None) -> None:
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

    def _execute(self, run: str, echo: IO[str] | None) -> None:
        stages = self.run_record(run)["stages"]
        state = self._state(run)
        for i, stage in enumerate(stages):
            if self.store.manifest(run, stage) is not None and state.get(stage, {}).get("state") == "succeeded":
                continue
            state[stage] = {"state": "running", "started": now(), "pid": os.getpid()}
            self._save_state(run, state)
            try:
                rc, error = self._run_stage(run, stage, echo)
            except KeyboardInterrupt:
                state[stage].update(state="cancelled", finished=now())
                self._skip(run, state, stages[i + 1 :])
                raise
            state[stage].update(finished=now(), exit_code=rc)
            if rc == 0 and self.store.manifest(run, stage) is not None:
                state[stage]["state"] = "succeeded"
                self._save_state(run, state)
                continue
            error = error or f"exit code {rc}, without a manifest"
            state[stage].update(state="failed", error=error)
            self._skip(run, state, stages[i + 1 :])
            raise StageFailed(
                f"stage {stage} of run {run} failed: {error} (full log: tunectl logs {run} --stage {stage})"
            )

    def _skip(self, run: str, state: dict[str, Any], rest: list[str]) -> None:
        for s in rest:
            state[s] = {"state": "skipped", "reason": "an upstream stage did not succeed"}
        self._save_state(run, state)

    def _run_stage(self, run: str, stage: str, echo: IO[str] | None) -> tuple[int, str | None]:
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
        error: str | None = None
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
            assert proc.stdout is not None
            pending = b""
            try:
                while chunk := proc.stdout.read1(65536):
                    log.write(chunk)
                    log.flush()
                    if echo is not None:
                        echo.write(chunk.decode("utf-8", "replace"))
                        echo.flush()
                    pending = (pending + chunk)[-8192:]
                rc = proc.wait()
            except BaseException:
                _stop(proc)
                raise
        self.store.put_file(f"runs/{run}/logs/{stage}.log", log_path)
        if rc == 0:
            return rc, None
        for line in reversed(pending.decode("utf-8", "replace").splitlines()):
            if line.startswith("error: "):
                error = line[len("error: ") :]
                break
        # Never the last log line: a signal is named with the phase the stage was in.
        return rc, describe(rc, read_status_file(status_path), error)

    # -- inspect
    def status(self, run: str) -> dict[str, Any]:
        record = self.run_record(run)
        state = self._state(run)
        stages = []
        for stage in record["stages"]:
            s = dict(state.get(stage, {"state": "pending"}))
            if s.get("state") == "running" and not _alive(s.get("pid")):
                s["state"] = "interrupted"
            elif s.get("state") == "running":
                at = phase_text(read_status_file(self.store.local_dir(run) / "logs" / f"{stage}.status"))
                if at:
                    s["reason"] = f"in {at}"
            if "started" in s:
                end = s.get("finished") or now()
                s["seconds"] = round(_seconds_between(s["started"], end), 1)
            manifest = self.store.manifest(run, stage)
            if manifest:
                seconds = (manifest.get("timings") or {}).get("seconds")
                if isinstance(seconds, (int, float)):
                    s["seconds"] = seconds
                s["metrics"] = manifest.get("metrics", {})
                s["notes"] = manifest.get("notes", [])
                s["files"] = len(manifest["files"])
            s.pop("pid", None)
            stages.append({"stage": stage, **s})
        states = [s["state"] for s in stages]
        overall = (
            "succeeded"
            if all(x == "succeeded" for x in states)
            else "failed"
            if "failed" in states
            else "running"
            if "running" in states
            else next((x for x in states if x in ("cancelled", "interrupted")), "pending")
        )
        defaults = {"run": run, "recipe": "?", "created": "?", "backend": "local"}  # a hand-edited record
        return {**defaults, **record, "state": overall, "stages": stages, "path": self.store.location(run)}

    def logs(self, run: str, stage: str | None) -> list[tuple[str, str]]:
        record = self.run_record(run)
        stages = record["stages"]
        if stage is not None and stage not in stages:
            raise TunectlError(f"run {run} has no stage '{stage}' (stages: {', '.join(stages)})")
        out = []
        for s in [stage] if stage else stages:
            live = self.store.local_dir(run) / "logs" / f"{s}.log"  # a running stage's log is only here yet
            text = (
                live.read_text(errors="replace") if live.is_file() else self.store.read_text(f"runs/{run}/logs/{s}.log")
            )
            if text is not None:
                out.append((s, text))
        return out


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
    """SIGTERM to the stage's process group, then SIGKILL after STOP_GRACE_S; returns once the stage is gone."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _seconds_between(start: str, end: str) -> float:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):  # a hand-edited state.json: no duration rather than no status
        return 0.0


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
