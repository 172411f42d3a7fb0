"""The train stage on several processes: torch.distributed data parallel, started by PyTorch's own launcher.

`python -m tunectl_jobs.train` reads the recipe; when `training.nproc_per_node x training.nnodes` is more than one
and it is not itself a worker, it becomes torchrun's agent for its node (`torch.distributed.launcher`: c10d
rendezvous, one agent per node, `nproc_per_node` workers each running the same train stage), and maps how the
workers ended to one exit code and one error line. What this module adds to torchrun is only the wiring a stage
needs:

- SIGTERM (a preemption, `tunectl cancel`) is passed to every worker and not acted on by the agent, which would
  kill workers 30 s later: each worker finishes its step, the ranks agree on the step (`agree`), rank 0 saves the
  checkpoint, all exit 75 together, and so does the agent.
- Only rank 0 publishes, saves checkpoints and writes the status document; each worker writes its own status into
  a directory the agent reads, so a failure is reported as the rank that failed first, with its phase and error.
- Workers die with their agent (PR_SET_PDEATHSIG), so a killed agent leaves no training behind.
- Every worker's output reaches the stage log with a `[rankN]` prefix.

Where a node's agent finds the others: `nnodes == 1`, a free port on 127.0.0.1; on Kubernetes across nodes, the
chart sets TUNECTL_RDZV_ENDPOINT (pod 0 of the Indexed Job, through a headless Service) and the pod with index 0
(JOB_COMPLETION_INDEX) hosts the rendezvous.

When a node of the group goes away (its pod killed, evicted, its machine lost), the others cannot go on: their
collectives fail (gloo at once; NCCL when its timeout or the agent's next rendezvous round ends them) or their
rendezvous host is gone. They exit EXIT_PEER_LOST, which the chart's podFailurePolicy ignores, so the Job replaces
every pod of the group without counting them, and the new group resumes from the newest checkpoint. Only the node
that failed by itself counts against the Job's backoffLimit.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunectl.errors import EXIT_CONFIG_ERROR, EXIT_FAILURE, EXIT_PEER_LOST, EXIT_PREEMPTED
from tunectl.runmodel import format_error
from tunectl.stageexit import RANK_STATUS_DIR, write_status

RDZV_ENDPOINT = "TUNECTL_RDZV_ENDPOINT"
# How long a node waits at the rendezvous for the others (their pods scheduled, images pulled, started).
JOIN_TIMEOUT_S = 900


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_worker() -> bool:
    """Started by torchrun's agent (ours or the user's own torchrun)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def worker_setup() -> None:
    """First thing in a worker: die with the agent."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def agree(*flags: bool) -> list[bool]:
    """Each flag True on every rank when it is True on any, in one all-reduce: one rank's SIGTERM (or clock) stops
    (or saves) all of them after the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    device = f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def peer_lost(e: BaseException) -> bool:
    """Whether a worker's exception is its group's communication breaking (a peer or the rendezvous store gone),
    not a fault of its own. torch raises DistError subclasses for NCCL, the store and the network; gloo's transport
    errors are plain RuntimeErrors that name their source file (gloo/transport/...)."""
    try:
        from torch.distributed import DistError
    except ImportError:
        return False
    return isinstance(e, DistError) or (isinstance(e, RuntimeError) and "gloo/transport/" in str(e))


def cpus() -> int:
    """The CPUs this process may use: its affinity, lowered to its cgroup's CPU limit (a pod's limits.cpu)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return max(1, min(n, math.ceil(limit)) if limit else n)


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 cpu.max, or v1 cfs quota); None: no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> list[int]:
    """This process's child processes (the workers: torchrun starts each in a session of its own)."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.append(int(stat.parent.name))
    return out


def _forward_sigterm(signum: int, frame: Any) -> None:
    for pid in _children():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def launch(module: str, argv: list[str], run: str, nproc_per_node: int, nnodes: int) -> int:
    """Be torchrun's agent for this node: run `python -m module argv` on `nproc_per_node` workers; one exit code."""
    cuda = _cuda_devices()
    if cuda and nproc_per_node > cuda:
        _say(f"training.nproc_per_node {nproc_per_node} is more than the {cuda} GPUs this process sees: lower it "
             f"or give the stage more GPUs")  # fmt: skip
        return EXIT_CONFIG_ERROR
    node_rank = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    endpoint = os.environ.get(RDZV_ENDPOINT) or (
        f"127.0.0.1:{_free_port()}" if nnodes == 1 else ""
    )  # fmt: skip
    if not endpoint:
        _say(f"training.nnodes {nnodes}: no rendezvous endpoint ({RDZV_ENDPOINT}); run it with the Kubernetes "
             f"backend, which sets it")  # fmt: skip
        return EXIT_CONFIG_ERROR
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    work = Path(tempfile.mkdtemp(prefix="tunectl-ranks-"))
    os.environ[RANK_STATUS_DIR] = str(work / "status")
    (work / "status").mkdir()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # CPU workers share the cores instead of each taking all
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus() // nproc_per_node))
    # The agent handles the other signals as torchrun does; SIGTERM is passed on to the workers (see above).
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    signal.signal(signal.SIGTERM, _forward_sigterm)
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=run,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"is_host": node_rank == 0, "join_timeout": JOIN_TIMEOUT_S},
        max_restarts=0,  # a lost worker fails the stage; the Job's retry resumes from the newest checkpoint
        monitor_interval=1,
        logs_specs=DefaultLogsSpecs(log_dir=str(work / "logs"), tee=Std.ALL),
        log_line_prefix_template="[rank${rank}] ",
    )
    print(f"torchrun: {nproc_per_node} processes x {nnodes} nodes (this is node {node_rank}), "
          f"rendezvous {endpoint}", flush=True)  # fmt: skip
    # What the agent itself is doing, should it be killed: the workers' own phases are in their rank files.
    stage = module.rsplit(".", 1)[-1]
    write_status({"stage": stage, "phase": "distributed training"})
    try:
        try:
            elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
            failures: dict[int, Any] = {}
        except ChildFailedError as e:
            failures = dict(e.failures)
        except RendezvousTimeoutError:
            minutes = JOIN_TIMEOUT_S // 60
            return _fail(stage, f"the training group did not form: {nnodes} nodes were expected at the rendezvous "
                         f"{endpoint} and not all came within {minutes} minutes", EXIT_FAILURE)  # fmt: skip
        except RendezvousError as e:  # its host went away, or was never reached
            return _fail(stage, f"lost the training group's rendezvous at {endpoint} ({first_line(e)}): "
                         "the group is retried", EXIT_PEER_LOST)  # fmt: skip
        code = _report(failures, work / "status")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the workers' status files and torchrun's copies of their logs
    if code < 0:  # a worker died of a signal: so does the agent, and the backend names it
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _report(failures: dict[int, Any], status_dir: Path) -> int:
    """The stage's exit code (negative: the signal to die of) and status from its workers': preempted when every
    failed worker was, else the first failure as it was (its exit code, or the signal that killed it), with that
    rank's phase and error."""

    def doc(r: int) -> dict[str, Any]:
        try:
            return dict(json.loads((status_dir / f"rank{r}.json").read_text()))
        except (OSError, ValueError):
            return {}

    if not failures:
        write_status(doc(0))
        return 0
    codes = {r: f.exitcode for r, f in failures.items()}
    if all(c == EXIT_PREEMPTED for c in codes.values()):
        write_status(doc(0))
        return EXIT_PREEMPTED
    # A rank that failed by itself is the cause; ranks that only lost their peers (or stopped) are its effects.
    own = [r for r, c in codes.items() if c not in (EXIT_PREEMPTED, EXIT_PEER_LOST)]
    first = min(own or [r for r, c in codes.items() if c == EXIT_PEER_LOST],
                key=lambda r: failures[r].timestamp or 0)  # fmt: skip
    code, where = codes[first], doc(first)
    write_status({**where, "rank": first})
    if where.get("error"):
        _say(f"rank {first}: {where['error']}")
    return int(code) if code else 1


def _fail(stage: str, message: str, code: int) -> int:
    _say(message)
    write_status({"stage": stage, "phase": "rendezvous", "error": message})
    return code


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line, for a one-line error (its type's name when it has no text)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def _say(message: str) -> None:
    """The stage's one error line (what the backends report)."""
    print(format_error(message), file=sys.stderr, flush=True)


def _cuda_devices() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:
        return 0
