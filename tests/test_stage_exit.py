"""A stage that dies says why: the signal's name, the phase it was in and the file, never its last log line.

Real processes die of real signals here: a stage program of the local backend is sent SIGSEGV in the middle of a
phase, and a llama.cpp child that segfaults is reported by name. The Kubernetes side reads the same status
document from a container's termination message (the whole-cluster version is in test_kube_backend.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tunectl import kubestatus
from tunectl.kubestatus import termination_error as error_line
from tunectl.stageexit import STATUS_ENV, describe, read_status_file
from tunectl_jobs import llamarun


def stage_status(*args):
    return kubestatus.stage_status(*args).to_dict()


CRASH_CHILD = """
import os, signal, sys
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_a_signal_is_named_with_the_phase_and_file():
    status = {"stage": "gguf", "phase": "quantize q4_k_m", "file": "m-q4_k_m.gguf", "native": "llama.cpp"}
    assert (
        describe(-11, status, None) == "killed by SIGSEGV during 'quantize q4_k_m' of m-q4_k_m.gguf (llama.cpp crashed)"
    )
    assert describe(-9, {"stage": "train", "phase": "train"}, "ignored: a signal wins").startswith(
        "killed by SIGKILL during 'train' (killed from outside: out of memory"
    )
    assert describe(-4, {}, None) == "killed by SIGILL (native code ran an instruction this CPU lacks)"


def test_a_distributed_stage_names_the_rank_that_failed_first(tmp_path, monkeypatch):
    """A worker writes its status under the agent's directory (its RANK names the file); the agent reports the
    first failed rank's phase, and the rank."""
    from tunectl.stageexit import RANK_STATUS_DIR, STATUS_ENV, write_status

    monkeypatch.setenv(STATUS_ENV, str(tmp_path / "stage.status"))
    monkeypatch.setenv(RANK_STATUS_DIR, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    write_status({"stage": "train", "phase": "train"})
    assert not (tmp_path / "stage.status").exists() and (tmp_path / "rank1.json").is_file()
    monkeypatch.delenv("RANK")  # the agent itself writes the stage's own file
    write_status({"stage": "train", "phase": "train", "rank": 1})
    assert (tmp_path / "stage.status").is_file()
    assert describe(-9, {"stage": "train", "phase": "train", "rank": 1}, None) == (
        "killed by SIGKILL during 'train' on rank 1 (killed from outside: out of memory (the kernel's OOM killer) "
        "or a kill -9)"
    )


def test_an_exit_without_an_error_line_is_not_reported_as_the_last_log_line():
    assert describe(3, {"stage": "merge", "phase": "save merged 16-bit"}, None) == (
        "exit code 3 during 'save merged 16-bit', without an error line"
    )
    assert describe(1, {"stage": "merge", "phase": "merge", "error": "disk full"}, None) == "disk full"
    assert describe(1, {"stage": "merge", "error": "from the file"}, "from the log") == "from the log"


def test_the_stage_program_keeps_its_status_file(tmp_path):
    """The real stage entry point writes where it is and, on a config error, its error line."""
    status = tmp_path / "train.status"
    env = {**os.environ, STATUS_ENV: str(status)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunectl_jobs.train",
            "--recipe",
            str(tmp_path / "nope.yaml"),
            "--store",
            "x",
            "--run",
            "r",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 78
    doc = read_status_file(status)
    assert doc["stage"] == "train" and doc["phase"] == "start" and "nope.yaml" in doc["error"]
    assert doc["pid"] > 0


def pod_terminated(code: int, message: str = "", reason: str = "Error") -> dict:
    term = {"exitCode": code, "reason": reason}
    if message:
        term["message"] = message
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-12-01T10:00:00Z", "labels": {}},
        "spec": {},
        "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": term}}]},
    }


def failed_job() -> dict:
    return {
        "metadata": {"name": "r-gguf", "annotations": {}, "labels": {}},
        "spec": {},
        "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    }


def test_kubernetes_status_reads_the_signal_and_the_termination_message():
    message = json.dumps({"stage": "gguf", "phase": "quantize q8_0", "file": "m-q8_0.gguf", "native": "llama.cpp"})
    s = stage_status("gguf", failed_job(), [pod_terminated(139, message)])
    assert s["reason"] == ("killed by SIGSEGV during 'quantize q8_0' of m-q8_0.gguf (llama.cpp crashed), exit code 139")
    # Without a status document (a container that is not ours), the signal is still named.
    assert stage_status("gguf", failed_job(), [pod_terminated(134)])["reason"].startswith(
        "killed by SIGABRT (native code aborted), exit code 134"
    )
    # The runtime's own signal field, where it sets one, wins.
    pod = pod_terminated(1)
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["signal"] = 9
    assert "killed by SIGKILL" in stage_status("gguf", failed_job(), [pod])["reason"]
    # A clean failure's error line comes from the message too (no log read needed).
    err = json.dumps({"stage": "gguf", "phase": "smoke test", "error": "GGUF q8_0 did not stop"})
    assert error_line([pod_terminated(1, err)]) == "GGUF q8_0 did not stop"
    assert error_line([pod_terminated(1, "a log line, not ours")]) is None
    oom = stage_status(
        "gguf", failed_job(), [pod_terminated(137, json.dumps({"stage": "gguf", "phase": "convert f16"}), "OOMKilled")]
    )
    assert oom["reason"].startswith("OOMKilled (exit code 137) during 'convert f16': raise the stage's memory limit")


def test_llama_cpp_child_that_crashes_is_reported_and_does_not_take_the_caller_down(tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text(CRASH_CHILD)
    r = llamarun.answer_in_child(tmp_path / "m-q4_k_m.gguf", "hi", 8, command=[sys.executable, str(crash)])
    assert r["file"] == "m-q4_k_m.gguf" and r["signal"] == "SIGSEGV" and r["error"] == "killed by SIGSEGV"
    assert "Fatal Python error" not in r["error"]


@pytest.mark.e2e
@pytest.mark.train
def test_local_backend_names_a_stage_killed_in_a_phase(tmp_path):
    """A real train stage of the local backend, sent SIGSEGV while it loads its model, fails the run with the
    signal and the phase; the stages after it are skipped; `status` says the same."""
    from tunectl.local import LocalBackend, StageFailed
    from tunectl.recipe import load_recipe
    from tunectl.stores import open_store

    backend = LocalBackend(open_store(str(tmp_path / "store")))
    run = backend.create(load_recipe("ruozhiba-tiny"))
    status_file = backend.store.local_dir(run) / "logs" / "train.status"
    failure: list[BaseException] = []

    def execute() -> None:
        try:
            backend.execute(run)
        except StageFailed as e:
            failure.append(e)

    worker = threading.Thread(target=execute)
    worker.start()
    deadline = time.monotonic() + 300
    doc: dict = {}
    while time.monotonic() < deadline and doc.get("phase") in (None, "start"):
        time.sleep(0.2)
        doc = read_status_file(status_file)
    assert doc.get("phase") not in (None, "start"), "the train stage never reached a phase"
    os.kill(doc["pid"], signal.SIGSEGV)
    worker.join(timeout=120)
    assert failure, "the run did not fail"
    message = str(failure[0])
    assert (
        f"stage train of run {run} failed: killed by SIGSEGV during '{doc['phase']}' (native code crashed)" in message
    )
    assert f"tunectl logs {run} --stage train" in message
    status = backend.status(run).to_dict()
    train, *rest = status["stages"]
    assert train["state"] == "failed" and train["exit_code"] == -11
    assert train["error"].startswith(f"killed by SIGSEGV during '{doc['phase']}'")
    assert [s["state"] for s in rest] == ["skipped", "skipped"] and status["state"] == "failed"
    # faulthandler put the Python stack of the dying process into the stage's log.
    assert (
        "Fatal Python error: Segmentation fault"
        in Path(backend.store.local_dir(run) / "logs" / "train.log").read_text()
    )


def _submit_until_training(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, dict]:
    """`tunectl submit` of the tiny recipe, until its train stage is in a phase past start-up."""
    store = tmp_path / "store"
    env = {**os.environ, "TUNECTL_STORE": str(store), "TUNECTL_BACKEND": "local"}
    with open(tmp_path / "submit.log", "w") as log:  # a file, not a pipe nobody reads that could fill up
        # Ctrl-C as a terminal delivers it, also where this test runs in the background of a shell without job
        # control (which starts such commands with SIGINT ignored, and Python then installs no handler for it).
        submit = subprocess.Popen(
            [sys.executable, "-m", "tunectl.cli", "submit", "ruozhiba-tiny"], env=env, stdout=log, stderr=log,
            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    deadline = time.monotonic() + 300
    doc: dict = {}
    while time.monotonic() < deadline and doc.get("phase") in (None, "start"):
        time.sleep(0.2)
        found = list(store.glob("runs/*/logs/train.status"))
        doc = read_status_file(found[0]) if found else {}
    assert doc.get("phase") not in (None, "start"), "the train stage never reached a phase"
    return submit, next(store.glob("runs/*")), doc


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.e2e
@pytest.mark.train
def test_kill_9_of_submit_takes_its_stage_down_and_nothing_is_published_after(tmp_path):
    submit, run_dir, doc = _submit_until_training(tmp_path)
    submit.kill()
    submit.wait()
    # It gets SIGTERM when submit dies and may finish its step and save a checkpoint first (local.STOP_GRACE_S).
    assert _gone(doc["pid"], 150), "the train stage outlived `tunectl submit`"
    time.sleep(2)
    assert not (run_dir / "train" / "manifest.json").exists()
    status = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tunectl.cli",
                "--store",
                str(run_dir.parents[1]),
                "status",
                run_dir.name,
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert status["state"] == "interrupted" and status["stages"][0]["state"] == "interrupted"


@pytest.mark.e2e
@pytest.mark.train
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_of_submit_stops_the_stage_before_the_run_is_marked_cancelled(tmp_path, sig):
    submit, run_dir, doc = _submit_until_training(tmp_path)
    submit.send_signal(sig)
    assert submit.wait(timeout=300) == 130  # the stage may save a checkpoint first (local.STOP_GRACE_S)
    assert f"run {run_dir.name} cancelled" in (tmp_path / "submit.log").read_text()
    assert _gone(doc["pid"], 0.5), "submit returned while its stage was still running"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["train"]["state"] == "cancelled"
    assert state["merge"]["state"] == state["gguf"]["state"] == "skipped"
    assert not (run_dir / "train" / "manifest.json").exists()
