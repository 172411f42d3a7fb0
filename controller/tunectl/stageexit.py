"""How a stage process ended, in one line a user can act on, for both backends.

A stage program keeps a small status document up to date (`TUNECTL_STATUS_FILE`): the phase it is in and, on a
clean failure, its error line. On Kubernetes that file is the container's terminationMessagePath, so the kubelet
hands it back in the pod's `state.terminated.message`; the local backend gives each stage a file of its own.
When the process dies without a word (a signal: a native crash, the OOM killer, a kill), the status still says
where it was, and the line names the signal, the phase and the file (the backends add the stage and the log):

    killed by SIGSEGV during 'quantize q4_k_m' of ruozhiba-tiny-q4_k_m.gguf (llama.cpp crashed)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

STATUS_ENV = "TUNECTL_STATUS_FILE"
# Set by a distributed train stage's agent (tunectl_jobs.distributed): each worker writes its rank's status there.
RANK_STATUS_DIR = "TUNECTL_RANK_STATUS_DIR"
MAX_BYTES = 4096  # the kubelet keeps at most 4096 bytes of a termination message

_HINTS = {
    "SIGSEGV": "crashed",
    "SIGBUS": "crashed",
    "SIGFPE": "crashed",
    "SIGABRT": "aborted",
    "SIGILL": "ran an instruction this CPU lacks",
}
_OUTSIDE = {
    "SIGKILL": "killed from outside: out of memory (the kernel's OOM killer) or a kill -9",
    "SIGTERM": "stopped from outside",
    "SIGINT": "interrupted",
    "SIGHUP": "its terminal went away",
}


def write_status(doc: dict[str, Any]) -> None:
    """Replace the status document, if this process was given one. Never raises: it is a diagnostic."""
    path = os.environ.get(STATUS_ENV)
    if os.environ.get(RANK_STATUS_DIR) and "RANK" in os.environ:  # a worker of a distributed train stage
        path = os.path.join(os.environ[RANK_STATUS_DIR], f"rank{os.environ['RANK']}.json")
    if not path:
        return
    data = json.dumps({**doc, "pid": os.getpid()}, ensure_ascii=False)[:MAX_BYTES]
    try:
        # Rewritten in place, not renamed: on Kubernetes it is a file the kubelet mounted. Never through a link.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(data)
    except OSError:
        pass


def read_status(text: str | None) -> dict[str, Any]:
    """The status document from a file's or a termination message's text; {} if there is none or it is not ours."""
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) and "stage" in doc else {}


def read_status_file(path: Path) -> dict[str, Any]:
    try:
        return read_status(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return {}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def phase_text(status: dict[str, Any]) -> str:
    """ "'quantize q4_k_m' of x.gguf" from a status document, or '' without a phase."""
    if not status.get("phase"):
        return ""
    text = f"'{status['phase']}'" + (f" of {status['file']}" if status.get("file") else "")
    return text + (f" on rank {status['rank']}" if "rank" in status else "")  # a distributed train stage's worker


def where(status: dict[str, Any]) -> str:
    text = phase_text(status)
    return f" during {text}" if text else ""


def killed(sig: str, status: dict[str, Any]) -> str:
    """The reason for a stage whose process died of signal `sig` (a name: SIGSEGV)."""
    if sig in _OUTSIDE:
        why = _OUTSIDE[sig]
    else:
        why = f"{status.get('native') or 'native code'} {_HINTS.get(sig, 'died')}"
    return f"killed by {sig}{where(status)} ({why})"


def describe(returncode: int, status: dict[str, Any], error: str | None) -> str:
    """The reason for a local stage process that did not succeed (`returncode` negative: a signal), given the
    error line it printed, if any, and its status document."""
    if returncode < 0:
        return killed(signal_name(-returncode), status)
    if error:
        return error
    if status.get("error"):
        return str(status["error"])
    return f"exit code {returncode}{where(status)}, without an error line"
