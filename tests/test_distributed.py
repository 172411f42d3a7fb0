"""The train stage on two processes (torchrun's agent and two gloo workers on the CPU), when a worker dies: the
stage fails at once, is reported as the signal that killed that rank in the phase it was in (never as the last
log line), and leaves no process behind. The losses and the preemption path of a two-process run are checked
against the single-process run in test_e2e_pipeline.py."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.train]


def _workers(run: str) -> dict[int, int]:
    """{rank: pid} of the train workers of run `run` (their environment names the rank; their command the run)."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"tunectl_jobs.train" in cmd and run.encode() in cmd and b"RANK" in env and b"LOCAL_RANK" in env:
            out[int(env[b"RANK"])] = int(proc.name)
    return out


def test_a_worker_killed_mid_training_fails_the_stage_naming_the_signal_and_the_rank(tmp_path):
    env = {**os.environ, "TUNECTL_STORE": str(tmp_path / "store"), "TUNECTL_BACKEND": "local"}
    sets = ["training.nproc_per_node=2", "training.gradient_accumulation_steps=2", "training.sample_answers=false",
            "export.gguf=[]"]  # fmt: skip
    submit = subprocess.Popen(
        [sys.executable, "-m", "tunectl.cli", "submit", "ruozhiba-tiny", *(a for s in sets for a in ("--set", s))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert submit.stderr is not None
    seen, deadline, killed = b"", time.monotonic() + 600, None
    while time.monotonic() < deadline and submit.poll() is None:
        if select.select([submit.stderr], [], [], 1)[0]:
            seen += os.read(submit.stderr.fileno(), 65536)
        found = re.search(rb"^run (\S+): stages", seen, re.M)
        if found and re.search(rb"\b[3-9]/40 \[", seen):  # a few steps in: both workers are in the training loop
            workers = _workers(found.group(1).decode())
            assert sorted(workers) == [0, 1], workers
            os.kill(workers[1], signal.SIGKILL)
            killed = found.group(1).decode()
            break
    assert killed, seen.decode(errors="replace")[-3000:]
    out, err = submit.communicate(timeout=300)
    text = err.decode(errors="replace")
    assert submit.returncode == 1, text[-3000:]
    assert (
        f"error: stage train of run {killed} failed: killed by SIGKILL during 'train' on rank 1 (killed from "
        f"outside: out of memory (the kernel's OOM killer) or a kill -9)"
    ) in text, text[-3000:]
    assert _workers(killed) == {}  # rank 0 did not live on
    status = subprocess.run(
        [sys.executable, "-m", "tunectl.cli", "status", killed], capture_output=True, text=True, env=env
    ).stdout
    assert re.search(r"^train\s+failed\b", status, re.M) and re.search(r"^merge\s+skipped\b", status, re.M), status
