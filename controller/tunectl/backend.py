"""Where runs run: one `Backend` interface, implemented by the local backend (`local.py`: the stage programs as
processes of this machine) and the Kubernetes backend (`kube.py`: a Job per stage), and the rule that picks one
for `--backend auto`.

The `--backend auto` rule (the CLI's help and the README say the same):

- `submit`: kubernetes when a cluster is configured (KUBECONFIG, ~/.kube/config, or running in a pod) and the
  store is s3:// (a cluster's pods can only hand artifacts over through S3); otherwise local.
- A command naming a RUN (`status`, `logs`, `cancel`): the local store first (no cluster call for a local run,
  so an unreachable cluster never delays it), then, when a cluster is configured, the cluster.
- `list`: the local store, and, when a cluster is configured, the cluster's namespace too, if it answers within
  the request timeout (TUNECTL_KUBE_TIMEOUT); if it does not, a note says so and the local runs are listed.

An explicit `--backend local|kubernetes` uses that backend alone, and its errors are errors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .recipe import Recipe
    from .runmodel import RunStatus

LOCAL = "local"
KUBERNETES = "kubernetes"
CHOICES = ("auto", LOCAL, KUBERNETES)

# Text to show the user while a run is submitted or followed; newlines included.
Echo = Callable[[str], None]


@dataclass(frozen=True)
class SubmitRequest:
    recipe: Recipe
    run_id: str | None = None  # the run's id; a new one when None
    values: tuple[Path, ...] = ()  # Kubernetes: chart values files
    helm_sets: tuple[str, ...] = ()  # Kubernetes: --helm-set KEY=VALUE


@dataclass(frozen=True)
class Submission:
    run: str
    stages: list[str]
    created: bool  # False: a run with this id and recipe was there already (Kubernetes: nothing was created)


class Backend(ABC):
    """A place runs run. Every method that takes a run raises TunectlError naming the run when it is not there,
    and ConfigError (one line) for what does not apply to this backend."""

    name: str
    # True: the run's stages are processes of this command, so `submit` always waits for the end and Ctrl-C
    # cancels the run. False: the run goes on without this command; `submit --wait` only follows it.
    runs_here: bool

    @abstractmethod
    def describe(self) -> str:
        """Where this backend keeps runs, for messages: a store URI, or `namespace NS (context C)`."""

    @abstractmethod
    def submit(self, request: SubmitRequest, echo: Echo) -> Submission:
        """Create the run (its records or objects); checks everything it can before anything is created."""

    @abstractmethod
    def wait(self, run: str, echo: Echo | None, poll_seconds: float) -> RunStatus:
        """Until the run is final (local: run its stages here); its final status."""

    @abstractmethod
    def has(self, run: str) -> bool:
        """Whether this backend holds `run` (one cheap read)."""

    @abstractmethod
    def status(self, run: str) -> RunStatus: ...

    @abstractmethod
    def list_runs(self) -> list[RunStatus]:
        """Every run, oldest first; a run whose records cannot be read is listed with state unknown and why."""

    @abstractmethod
    def logs(self, run: str, stage: str | None, follow: bool) -> Iterator[tuple[str, str]]:
        """(stage, text) chunks of each stage's log in stage order, or of `stage`'s; `follow` streams until the
        stage ends."""

    @abstractmethod
    def cancel(self, run: str, echo: Echo | None = None) -> dict[str, int]:
        """Stop the run; what was deleted, by kind. Artifacts in the store are kept. `echo` tells of a wait."""

    def resume(self, run: str, echo: Echo | None) -> RunStatus:
        """Go on with a stopped run: its unpublished stages, train from its newest checkpoint; its final status."""
        raise ConfigError(
            f"run {run} runs on {self.describe()}, where a stopped stage is retried and resumes by itself; "
            f"`tunectl status {run}` shows where it is"
        )


def auto_order(command: str, kubeconfig: bool, store_uri: str) -> tuple[str, ...]:
    """The backends `--backend auto` uses for `command`, in order (see the module's docstring): for `submit` the
    one to submit to; for a command naming a run, where to look for it; for `list`, what to list (after the
    first, only where the cluster answers)."""
    if command == "submit":
        return (KUBERNETES,) if kubeconfig and store_uri.startswith("s3://") else (LOCAL,)
    return (LOCAL, KUBERNETES) if kubeconfig else (LOCAL,)


def order(choice: str, command: str, kubeconfig: bool, store_uri: str) -> tuple[str, ...]:
    """The backends `--backend CHOICE` means for `command`."""
    if choice not in CHOICES:
        raise ValueError(choice)
    return auto_order(command, kubeconfig, store_uri) if choice == "auto" else (choice,)
