"""The train stage on several processes (torchrun's agent with gloo workers on the CPU): a worker that dies fails
the stage at once, reported as the signal that killed that rank in the phase it was in (never as the last log line),
leaving no process behind; two stages started as two nodes (as pods of an Indexed Job would be) meet at the c10d
rendezvous and train as one, and a lost node fails the other instead of hanging it. The losses and the preemption
path of a two-process run are checked against the single-process run in test_e2e_pipeline.py."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunectl.errors import EXIT_PEER_LOST

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


def _node(recipe: Path, store: Path, run: str, index: int, endpoint: str, log: Path) -> subprocess.Popen[bytes]:
    """One node's train stage, as a pod of an Indexed Job runs it: its index and the rendezvous in its env."""
    env = {**os.environ, "JOB_COMPLETION_INDEX": str(index), "TUNECTL_RDZV_ENDPOINT": endpoint,
           "TUNECTL_STATUS_FILE": str(log.with_suffix(".status"))}  # fmt: skip
    cmd = [sys.executable, "-m", "tunectl_jobs.train", "--recipe", str(recipe), "--store", str(store), "--run", run]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)


def _two_node_recipe(tmp_path: Path, steps: int) -> Path:
    from tunectl.recipe import load_recipe

    recipe = load_recipe("ruozhiba-tiny", ["training.nnodes=2", "training.gradient_accumulation_steps=2",
                                           f"training.max_steps={steps}", "training.sample_answers=false"])  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    return path


def test_two_nodes_meet_at_the_rendezvous_and_train_as_one(tmp_path):
    """Two train stages started as two nodes (what two pods of an Indexed Job are; here two processes on 127.0.0.1,
    one gloo worker each): node 0's agent hosts the c10d rendezvous, node 1 joins it (here first), and rank 0 alone
    publishes."""
    from minio_server import free_port

    recipe, store, endpoint = _two_node_recipe(tmp_path, 6), tmp_path / "store", f"127.0.0.1:{free_port()}"
    nodes = [_node(recipe, store, "two", i, endpoint, tmp_path / f"node{i}.log") for i in (1, 0)]  # joining first
    codes = [p.wait(timeout=600) for p in nodes]
    logs = [(tmp_path / f"node{i}.log").read_text(errors="replace") for i in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"torchrun: 1 processes x 2 nodes (this is node 0), rendezvous {endpoint}" in logs[0]
    assert "(this is node 1)" in logs[1]
    # Ranks go by arrival at the rendezvous (c10d), not by node index: one node has rank 0 and publishes.
    assert sorted(("[rank0] " in log, "[rank1] " in log) for log in logs) == [(False, True), (True, False)]
    manifest = json.loads((store / "runs" / "two" / "train" / "manifest.json").read_text())
    assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["steps"] == 6


def test_a_lost_node_fails_the_other_instead_of_hanging_it(tmp_path):
    """Node 1 killed mid-training (a pod lost with its machine): node 0 fails within a minute, so its Job retries
    the group (from the newest checkpoint) instead of waiting on a peer that is gone; it exits EXIT_PEER_LOST, which
    the chart does not count as a failure, with one line saying so."""
    from minio_server import free_port

    recipe, store, endpoint = _two_node_recipe(tmp_path, 200), tmp_path / "store", f"127.0.0.1:{free_port()}"
    node0 = _node(recipe, store, "lost", 0, endpoint, tmp_path / "node0.log")
    node1 = _node(recipe, store, "lost", 1, endpoint, tmp_path / "node1.log")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not re.search(r"\b[3-9]/200 \[", (tmp_path / "node0.log").read_text()):
        assert node0.poll() is None and node1.poll() is None, (tmp_path / "node0.log").read_text()[-3000:]
        time.sleep(1)
    node1.kill()  # its agent (SIGKILL); its worker follows it (PR_SET_PDEATHSIG)
    killed_at = time.monotonic()
    code = node0.wait(timeout=300)
    log = (tmp_path / "node0.log").read_text()
    assert code == EXIT_PEER_LOST and time.monotonic() - killed_at < 120, log[-3000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert errors and re.match(r"error: rank [01]: lost a peer of the training group \(", errors[-1]), errors
    assert errors[-1].endswith("): the group is retried"), errors
    time.sleep(2)
    assert _workers("lost") == {}  # node 1's worker died with its agent; node 0's with its own
    assert not (store / "runs" / "lost" / "train" / "manifest.json").exists()
