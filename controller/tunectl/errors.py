"""Error types and exit codes shared by the CLI and the stage programs.

Every error a user sees is one line that says what to fix, and its class decides the exit code:
- EXIT_CONFIG_ERROR (78, sysexits EX_CONFIG): bad recipe, values, data or model reference. Retrying the same
  input cannot help; the Kubernetes chart's podFailurePolicy fails the Job at once on this code, and the CLI
  uses it too, so a script can tell "fix your input" from everything else.
- EXIT_ENVIRONMENT (74, sysexits EX_IOERR): this machine's files, disk or programs (a read-only or full
  destination, a store path that is a file, a missing or broken helm/ollama). The input was fine; fix the host.
- EXIT_PREEMPTED (75, sysexits EX_TEMPFAIL): the stage was stopped from outside (SIGTERM: eviction, preemption,
  a drain, Ctrl-C of a local run) and saved what it needs to go on (a training checkpoint). The chart retries it
  without counting a failure; a retry resumes.
- EXIT_PEER_LOST (76, sysexits EX_PROTOCOL): a process of a training group across nodes whose collective or
  rendezvous broke because another node of the group went away. Not this node's fault: the chart retries it without
  counting a failure (the node that went away is counted, if it failed), and the group resumes from its checkpoint.
- EXIT_FAILURE (1): anything else, treated as transient and retried by the chart.
"""

import os
import re

EXIT_CONFIG_ERROR = 78  # sysexits.h EX_CONFIG
EXIT_ENVIRONMENT = 74  # sysexits.h EX_IOERR
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL
EXIT_PEER_LOST = 76  # sysexits.h EX_PROTOCOL
EXIT_FAILURE = 1


class TunectlError(Exception):
    """A problem the user can fix; its message is one line that says what to do."""


class ConfigError(TunectlError):
    """Bad recipe, values, data or model reference: retrying the same input cannot succeed."""


class EnvironmentProblem(TunectlError):
    """The machine, not the input: files, disk space, permissions, or a program tunectl runs."""


class Preempted(TunectlError):
    """Stopped from outside after saving what a retry needs to resume (exit EXIT_PREEMPTED)."""


class ArtifactError(TunectlError):
    """A stage's inputs are missing, incomplete or fail their checksums."""


def describe_os_error(e: OSError, doing: str = "") -> str:
    """One line for an OSError: what failed, on which path, and the system's reason."""
    reason = e.strerror or type(e).__name__
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    where = f" {paths}" if paths else ""
    return f"{doing + ': ' if doing else ''}{reason}{':' if where else ''}{where}"


def executable(path: str, variable: str, what: str) -> str:
    """A program named by an environment variable, checked before it is run: a wrong path is the setting's fault,
    and saying so beats the bare 'No such file or directory' of the exec that would follow."""
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        reason = "is not an executable file" if os.path.exists(path) else "does not exist"
        raise EnvironmentProblem(f"{variable}={path} {reason}: point it at {what} or unset it")
    return path


# The user:password part of a URL (an S3 endpoint, an Ollama host): never printed.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#]*@")


def redact(text: str) -> str:
    """`text` with the user:password of every URL in it replaced by `***`: for everything tunectl prints."""
    return _USERINFO.sub(r"\1***@", text)
