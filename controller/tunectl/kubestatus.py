"""What a run's Jobs and pods say about each stage, in the run model's words (`runmodel`), with a reason a user
can act on. The label and annotation keys the chart, the backend and the reconciler share live here.

Pure functions over the objects as the API returns them (camelCase dicts), so every reason is testable
without a cluster: waiting for upstream, unschedulable (Insufficient nvidia.com/gpu), image pull errors (with
what to change), OOMKilled, killed by a signal, retried after a disruption, failed with exit code N, succeeded.
"""

from __future__ import annotations

from typing import Any

from .errors import EXIT_CONFIG_ERROR, EXIT_PEER_LOST, EXIT_PREEMPTED
from .runmodel import StageState, StageStatus
from .stageexit import killed, read_status, signal_name, where

LABEL_RUN = "tunectl.dev/run"
LABEL_STAGE = "tunectl.dev/stage"
ANN_AFTER = "tunectl.dev/after"
ANN_BLOCKED = "tunectl.dev/blocked"
ANN_RELEASED = "tunectl.dev/released"
ANN_STORE = "tunectl.dev/store"
ANN_STAGES = "tunectl.dev/stages"
ANN_QUEUE = "tunectl.dev/queue-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
LABEL_RECIPE = "tunectl.dev/recipe"
LABEL_COMPONENT = "app.kubernetes.io/component"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # an Indexed Job's pod: its index
MANAGED = "app.kubernetes.io/managed-by=tunectl"  # a selector: every object tunectl creates


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def job_outcome(job: dict[str, Any]) -> StageState | None:
    """Succeeded, failed, or None while the Job is not finished."""
    if condition(job, "Complete"):
        return StageState.SUCCEEDED
    if condition(job, "Failed"):
        return StageState.FAILED
    return None


def job_state(job: dict[str, Any]) -> StageState:
    """A stage's state from its Job alone (what the reconciler, which may read only Jobs, sees): finished; skipped
    (blocked by the reconciler); waiting (suspended until its upstream is done); pending once released (with
    Kueue it stays suspended until admitted); running while a pod of it is active."""
    outcome = job_outcome(job)
    if outcome:
        return outcome
    if annotations_of(job).get(ANN_BLOCKED):
        return StageState.SKIPPED
    if (job.get("spec") or {}).get("suspend") and not annotations_of(job).get(ANN_RELEASED):
        return StageState.WAITING
    return StageState.RUNNING if (job.get("status") or {}).get("active") else StageState.PENDING


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        t = (cs.get("state") or {}).get("terminated")
        if t:
            return t
    return None


# What to change when a container cannot start for want of its image.
_IMAGE_FIXES = {
    "ErrImageNeverPull": "load the image onto the node, or set image.pullPolicy to pull it",
    "ErrImagePull": "check image.registry, image.tag and imagePullSecrets",
    "ImagePullBackOff": "check image.registry, image.tag and imagePullSecrets",
    "InvalidImageName": "check image.registry and the stage's image",
}


def _waiting_reason(pod: dict[str, Any]) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        w = (cs.get("state") or {}).get("waiting")
        if w and w.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            msg = (w.get("message") or "").strip()
            text = f"{w['reason']}: {msg}" if msg else w["reason"]
            fix = _IMAGE_FIXES.get(w["reason"])
            return f"{text} ({fix})" if fix else text
    return None


def _disruption(pod: dict[str, Any]) -> str | None:
    """Why a pod was disrupted (evicted, preempted, its node drained or lost), from its DisruptionTarget condition:
    the chart's podFailurePolicy retries such a pod without counting it against backoffLimit."""
    cond = condition(pod, "DisruptionTarget")
    if cond is None:
        return None
    return cond.get("reason") or "disrupted"


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            # The scheduler's preemption postscript repeats the same facts; the first sentence says what to fix.
            return "unschedulable: " + (c.get("message") or c.get("reason") or "").split(" preemption:")[0].strip()
    return None


def _signal(term: dict[str, Any]) -> int:
    """The signal a container died of: the runtime's own field, else an exit code of 128 + N (as the runtime
    reports a process killed by signal N)."""
    code = term.get("exitCode") or 0
    return term.get("signal") or (code - 128 if 128 < code < 128 + 32 else 0)


def _exit_text(term: dict[str, Any]) -> str:
    """Why a container ended, from its terminated state and the stage's status document, which the kubelet
    returns as the termination message (tunectl.stageexit)."""
    code = term.get("exitCode")
    status = read_status(term.get("message"))
    if term.get("reason") == "OOMKilled":
        return f"OOMKilled (exit code {code}){where(status)}: raise the stage's memory limit"
    if code == EXIT_CONFIG_ERROR:
        return f"failed with exit code {code} (configuration error, not retried)"
    if code == EXIT_PREEMPTED:
        return f"preempted (exit code {code}): {status.get('error') or 'stopped from outside'}"
    if code == EXIT_PEER_LOST:
        return f"lost a peer of its training group (exit code {code}), not counted as a failure"
    sig = _signal(term)
    if sig:
        return f"{killed(signal_name(sig), status)}, exit code {code}"
    return f"failed with exit code {code}"


def termination_error(pods: list[dict[str, Any]]) -> str | None:
    """The error line the newest failed pod's stage program wrote into its termination message, if any."""
    for pod in _failed_causes_first(pods):
        term = _terminated(pod)
        return read_status(term.get("message")).get("error") if term else None
    return None


def _newest(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def _failed_causes_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The failed pods, newest first, except that a pod of a training group that only lost its peers comes after
    those that failed by themselves: the cause is what to report, not its effect on the others."""
    failed = [p for p in _newest(pods) if (p.get("status") or {}).get("phase") == "Failed"]
    return sorted(failed, key=lambda p: (_terminated(p) or {}).get("exitCode") == EXIT_PEER_LOST)


def _nodes(pods: list[dict[str, Any]]) -> str:
    nodes = sorted({n for p in pods if (n := (p.get("spec") or {}).get("nodeName"))})
    return f"node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}" if nodes else ""


def stage_status(stage: str, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> StageStatus:
    """One stage's state and reason from its Job and that Job's pods."""
    if job is None:
        return StageStatus(stage, StageState.MISSING, reason="no Job (deleted, cancelled or expired by its TTL)")
    st = job.get("status") or {}
    out = StageStatus(stage, job_state(job), job=job["metadata"]["name"])
    out.started = st.get("startTime")
    out.finished = st.get("completionTime")
    failed_pods = _failed_causes_first(pods)
    group = int((job.get("spec") or {}).get("parallelism") or 1)  # > 1: an Indexed Job, one pod per node
    pods_run = (st.get("failed") or 0) + (st.get("succeeded") or 0) + (st.get("active") or 0)
    attempts = -(-pods_run // group)  # a group's pods count as one attempt
    if attempts > 1:
        out.attempts = attempts
    if out.state == StageState.SUCCEEDED:
        return out
    if out.state == StageState.FAILED:
        cond = condition(job, "Failed") or {}
        if cond.get("lastTransitionTime"):
            out.finished = cond["lastTransitionTime"]
        term = next((t for t in map(_terminated, failed_pods) if t), None)
        if term is not None:
            out.exit_code = term.get("exitCode")
            reason = _exit_text(term)
        else:
            reason = cond.get("message") or cond.get("reason") or "failed"
        if cond.get("reason") == "BackoffLimitExceeded" and attempts > 1:
            reason += f" (after {attempts} attempts)"
        elif cond.get("reason") == "DeadlineExceeded":
            reason = "ran past its activeDeadlineSeconds"
        out.reason = reason
        return out
    ann = annotations_of(job)
    if out.state == StageState.SKIPPED:
        out.reason = ann[ANN_BLOCKED]
        return out
    if (job.get("spec") or {}).get("suspend"):
        after = ann.get(ANN_AFTER)
        if out.state == StageState.WAITING:
            out.reason = f"waiting for {after}" if after else "suspended"
        else:
            out.reason = f"queued in Kueue queue {ann.get(ANN_QUEUE, '')}".rstrip()
        return out
    live = [p for p in _newest(pods) if (p.get("status") or {}).get("phase") in ("Pending", "Running", None)]
    retry_note = ""
    if failed_pods:
        term = _terminated(failed_pods[0])
        disrupted = _disruption(failed_pods[0])
        if disrupted:
            retry_note = f"; retrying after a disruption ({disrupted}), not counted as a failure"
        elif term and term.get("exitCode") == EXIT_PREEMPTED:
            retry_note = f"; resuming after it was {_exit_text(term)}"
        else:
            retry_note = f"; retrying after {_exit_text(term) if term else 'a failed pod'}"
    if group > 1:
        return _group_status(out, live, group, retry_note)
    if not live:
        out.state, out.reason = StageState.PENDING, "creating its pod" + retry_note
        return out
    pod = live[0]
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Running":
        where = _nodes([pod])
        out.state, out.reason = StageState.RUNNING, (f"on {where}" + retry_note if where else retry_note[2:])
        return out
    out.state, out.reason = StageState.PENDING, (_unschedulable(pod) or _waiting_reason(pod) or "pod starting")
    out.reason += retry_note
    return out


def _group_status(out: StageStatus, live: list[dict[str, Any]], group: int, retry_note: str) -> StageStatus:
    """A stage that trains on `group` pods at once: running once all of them run (until then the ones running
    wait at the rendezvous), else pending with why the first of the others is not running."""
    newest: dict[str, dict[str, Any]] = {}
    for pod in live:  # newest first: a replacement pod stands for its index
        newest.setdefault((pod["metadata"].get("labels") or {}).get(JOB_INDEX_LABEL, ""), pod)
    pods = list(newest.values())
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if len(running) == group:
        out.state, out.reason = StageState.RUNNING, f"{group} pods on {_nodes(running)}" + retry_note
        return out
    waiting = next((p for p in pods if p not in running), None)
    why = (_unschedulable(waiting) or _waiting_reason(waiting) or "pod starting") if waiting else "creating its pods"
    out.state = StageState.PENDING
    out.reason = f"{len(running)} of {group} pods running (the others: {why})" + retry_note
    return out
