"""The train stage's side of checkpoints (the store format is tunectl.checkpoints): a transformers TrainerCallback
that saves one to the store every `training.save_steps` steps, whenever `training.save_minutes` passed, and on
SIGTERM: the step in flight finishes, the checkpoint is saved and training stops; the stage then exits
EXIT_PREEMPTED (75) for the orchestrator to retry, resuming, without counting a failure.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tunectl.checkpoints import save
from tunectl.recipe import Recipe
from tunectl.stores import Store

from . import distributed

log = logging.getLogger("tunectl")


def on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler where one can be (the main thread; a stage run in-process by a test may not be
    there); returns the previous one."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def store_checkpoints_callback(store: Store, run: str, recipe: Recipe) -> Any:
    """A transformers TrainerCallback that saves checkpoints to the store when the recipe says and on SIGTERM."""
    from transformers import TrainerCallback

    t = recipe.training

    class StoreCheckpoints(TrainerCallback):
        def __init__(self) -> None:
            self.preempted_at: int | None = None  # the step saved on SIGTERM
            self.resumed_from: int | None = None
            self._sigterm = False
            self._why = ""
            self._last_save = time.monotonic()
            self._previous: Any = None

        def _on_sigterm(self, signum: int, frame: Any) -> None:
            # Only a flag: the step in flight finishes, then on_step_end asks for a save and the end of training.
            if not self._sigterm:
                log.warning("SIGTERM: saving a checkpoint after the current step, then stopping")
            self._sigterm = True

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._previous = on_sigterm(self._on_sigterm)
            self._last_save = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            # Across processes every rank decides the same (a SIGTERM or a clock seen by one rank counts for all).
            due = bool(t.save_minutes) and time.monotonic() - self._last_save >= t.save_minutes * 60
            stop, due = distributed.agree(self._sigterm, due)
            if stop:
                self._why = "sigterm"
                control.should_save = True
                control.should_training_stop = True
            elif t.save_steps and step % t.save_steps == 0 and step < state.max_steps:
                self._why = "steps"
                control.should_save = True
            elif due and step < state.max_steps:
                self._why = "minutes"
                control.should_save = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            local = Path(args.output_dir) / f"checkpoint-{step}"
            if distributed.rank() == 0:  # the weights and optimizer are the same on every rank
                save(store, run, recipe, local, step, self._why or "steps")
            distributed.barrier()  # no rank goes on, or exits on SIGTERM, before the checkpoint is in the store
            shutil.rmtree(local, ignore_errors=True)
            self._last_save = time.monotonic()
            if self._why == "sigterm":
                self.preempted_at = step

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._previous is not None:
                on_sigterm(self._previous)

    return StoreCheckpoints()
