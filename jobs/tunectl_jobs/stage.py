"""What every stage program shares: arguments, logging, exit codes, timings and the manifest."""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunectl import __version__
from tunectl.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILURE,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    ArtifactError,
    ConfigError,
    Preempted,
    TunectlError,
)
from tunectl.recipe import Recipe, recipe_from_file
from tunectl.runmodel import format_error
from tunectl.stageexit import write_status
from tunectl.stores import Store, open_store
from tunectl.stores.manifest import EarlyChecksums

from . import distributed

log = logging.getLogger("tunectl")


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageContext:
    """One stage's run: recipe, store, a scratch directory for outputs, and what goes in its manifest."""

    name: str
    recipe: Recipe
    store: Store
    run: str
    out: Path
    started: str = field(default_factory=_utcnow)
    phases: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # Run once the stage's manifest is committed (best effort): clean-up of what only a retry would have needed.
    after_publish: list[Callable[[], None]] = field(default_factory=list)
    # Where the stage is, as its status document says (tunectl.stageexit): what a crash report names.
    where: dict[str, Any] = field(default_factory=dict)
    # Outputs hashed while the stage goes on (finished()), so publishing them does not read them again.
    checksums: EarlyChecksums = field(default_factory=EarlyChecksums)
    _t0: float = field(default_factory=time.monotonic)

    def finished(self, path: Path) -> None:
        """`path` is written and will not change: its checksum is computed now, in the background."""
        self.checksums.soon(path)

    def phase(self, name: str, *, file: str | None = None, native: str | None = None) -> _Phase:
        """`with ctx.phase("load"):` times a step and logs its start and end. `file`: what the step works on;
        `native`: the native library it runs (llama.cpp), named if the process dies of a signal in it."""
        return _Phase(self, name, {k: v for k, v in (("file", file), ("native", native)) if v})

    def note(self, message: str) -> None:
        """A deviation from the recipe the user should know about (also recorded in the manifest)."""
        log.warning(message)
        self.notes.append(message)

    def publish(self) -> dict[str, Any]:
        manifest = {
            "inputs": self.inputs,
            "versions": versions(),
            "timings": {
                "started": self.started,
                "finished": _utcnow(),
                "seconds": round(time.monotonic() - self._t0, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()},
            },
            "metrics": self.metrics,
            "notes": self.notes,
            **self.extra,
        }
        doc = self.store.publish(self.run, self.name, self.out, manifest, digests=self.checksums.digest)
        shutil.rmtree(self.out, ignore_errors=True)  # published; a failed stage keeps its scratch to inspect
        log.info("published %d files to %s/runs/%s/%s", len(doc["files"]), self.store.uri, self.run, self.name)
        for hook in self.after_publish:
            try:
                hook()
            except (TunectlError, OSError) as e:
                log.warning("after publishing: %s", e)
        return doc


class _Phase:
    def __init__(self, ctx: StageContext, name: str, detail: dict[str, str]):
        self.ctx, self.name, self.detail = ctx, name, detail

    def __enter__(self) -> None:
        log.info("[%s] %s ...", self.ctx.name, self.name)
        self.ctx.where = {"stage": self.ctx.name, "phase": self.name, **self.detail}
        write_status(self.ctx.where)
        self.t = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        dt = time.monotonic() - self.t
        self.ctx.phases[self.name] = self.ctx.phases.get(self.name, 0.0) + dt
        if exc[0] is None:
            log.info("[%s] %s done in %.1fs", self.ctx.name, self.name, dt)


def versions() -> dict[str, str]:
    out = {"tunectl": __version__, "python": platform.python_version()}
    for dist in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "accelerate",
        "unsloth",
        "bitsandbytes",
        "llama-cpp-python",
        "gguf",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_stage(
    name: str, body: Callable[[StageContext], None], argv: list[str] | None = None, *, distributed_ok: bool = False
) -> int:
    """Parse the common arguments, run `body`, publish; map failures to exit codes with one-line errors.

    `distributed_ok`: a recipe asking for several processes makes this process torchrun's agent, which runs the
    stage program again in each worker (distributed.py)."""
    parser = argparse.ArgumentParser(prog=f"python -m tunectl_jobs.{name}", description=f"tunectl {name} stage")
    parser.add_argument(
        "--recipe", default=os.environ.get("TUNECTL_RECIPE"), help="resolved recipe YAML (env TUNECTL_RECIPE)"
    )
    parser.add_argument(
        "--store", default=os.environ.get("TUNECTL_STORE"), help="artifact store URI (env TUNECTL_STORE)"
    )
    parser.add_argument("--run", default=os.environ.get("TUNECTL_RUN"), help="run id (env TUNECTL_RUN)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    # A native crash prints the Python stack into the log; the process still dies of the signal.
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (run in-process by a test)
        pass
    where: dict[str, Any] = {"stage": name, "phase": "start"}
    write_status(where)

    def fail(e: BaseException | str, code: int) -> int:
        message = str(e)
        print(format_error(message), file=sys.stderr, flush=True)  # the line runmodel.error_line reads back
        write_status({**(ctx.where if ctx else where), "error": message})
        return code

    ctx: StageContext | None = None
    try:
        missing = [f"--{k}" for k in ("recipe", "store", "run") if not getattr(args, k)]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or TUNECTL_RECIPE / TUNECTL_STORE / TUNECTL_RUN)")
        recipe = recipe_from_file(args.recipe)
        t = recipe.training
        if distributed.is_worker():
            distributed.worker_setup()
        elif distributed_ok and t.world_size > 1:
            stage_argv = sys.argv[1:] if argv is None else argv
            return distributed.launch(f"tunectl_jobs.{name}", stage_argv, args.run, t.nproc_per_node, t.nnodes)
        store = open_store(args.store)
        # Each worker of a distributed stage works in its own scratch; only rank 0's outputs are published.
        main = distributed.rank() == 0
        out = store.scratch_dir(args.run, name if main else f"{name}.rank{distributed.rank()}")
        ctx = StageContext(name=name, recipe=recipe, store=store, run=args.run, out=out)
        body(ctx)
        if main:
            with ctx.phase("publish"):
                ctx.publish()
        else:
            shutil.rmtree(out, ignore_errors=True)
        write_status({"stage": name, "phase": "done"})
        return 0
    except (ConfigError, ArtifactError) as e:
        return fail(e, EXIT_CONFIG_ERROR)
    except Preempted as e:
        return fail(e, EXIT_PREEMPTED)
    except TunectlError as e:
        return fail(e, EXIT_FAILURE)
    except OSError as e:  # a full or read-only disk, a missing mount: the environment, maybe not this input
        return fail(e, EXIT_FAILURE)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:
        if distributed.is_worker() and distributed.peer_lost(e):  # a peer's failure (or stop), not this process's
            detail = distributed.first_line(e)
            return fail(f"lost a peer of the training group ({detail}): the group is retried", EXIT_PEER_LOST)
        raise
    finally:
        if ctx is not None:
            ctx.checksums.close()  # hashes not yet begun are dropped (a failed stage publishes nothing)
