"""The pipeline's ordering, with no laptop attached: release each waiting stage when its upstream is done.

A run's downstream Jobs are created suspended with `tunectl.dev/after: <upstream>`. The reconciler watches the
run's Jobs and, when the upstream Job has succeeded AND its manifest is in the store (the commit point of the
hand-off), releases the follower: `spec.suspend: false`, or with Kueue, the queue label (Kueue then admits and
unsuspends it). When an upstream fails, every stage after it is marked skipped and never starts.

It is level-triggered (all it needs is in the Jobs and the store), so a restarted reconciler, or
`tunectl submit --wait` running the same code beside it, simply continues. It runs in the cluster as the
run's `<run>-reconciler` Job, whose ServiceAccount may read Jobs and patch only this run's waiting ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import TunectlError
from .kubestatus import (
    ANN_AFTER,
    ANN_BLOCKED,
    ANN_QUEUE,
    ANN_RELEASED,
    ANN_STORE,
    KUEUE_QUEUE_LABEL,
    LABEL_RUN,
    LABEL_STAGE,
    annotations_of,
    job_state,
)
from .runmodel import FINAL, StageState

# After the upstream Job succeeded, how long its manifest may take to appear before the run is failed.
MANIFEST_GRACE_SECONDS = 120.0
# How much longer than the watch's own timeout a watch connection may stay silent before it is dropped.
WATCH_SLACK_SECONDS = 15


@dataclass(frozen=True)
class Action:
    kind: str  # "release" | "block"
    stage: str
    detail: str


def _plain_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def plan(
    jobs: dict[str, dict[str, Any]], manifest_ready: Callable[[str], bool], waited: Callable[[str], float]
) -> list[Action]:
    """What to do now. `jobs` maps stage -> Job; `waited(stage)` is how long a succeeded stage's manifest
    has been missing."""
    actions = []
    for stage, job in jobs.items():
        after = annotations_of(job).get(ANN_AFTER)
        if not after or job_state(job) != StageState.WAITING:
            continue
        up = jobs.get(after)
        if up is None:
            actions.append(Action("block", stage, f"upstream {after} has no Job (deleted?)"))
            continue
        up_state = job_state(up)
        if up_state in (StageState.FAILED, StageState.SKIPPED):
            actions.append(Action("block", stage, f"upstream {after} {up_state}"))
        elif up_state == StageState.SUCCEEDED:
            if manifest_ready(after):
                actions.append(Action("release", stage, f"{after} succeeded and its manifest is complete"))
            elif waited(after) > MANIFEST_GRACE_SECONDS:
                actions.append(Action("block", stage, f"upstream {after} succeeded but published no manifest"))
    return actions


def finished(jobs: dict[str, dict[str, Any]]) -> bool:
    return bool(jobs) and all(job_state(j) in FINAL for j in jobs.values())


def release_patch(job: dict[str, Any], now: str) -> dict[str, Any]:
    queue = annotations_of(job).get(ANN_QUEUE)
    patch: dict[str, Any] = {"metadata": {"annotations": {ANN_RELEASED: now}}}
    if queue:
        patch["metadata"]["labels"] = {KUEUE_QUEUE_LABEL: queue}  # Kueue admits it, then unsuspends
    else:
        patch["spec"] = {"suspend": False}
    return patch


class Reconciler:
    """Drives one run to a final state. `batch` is a kubernetes.client.BatchV1Api; every API request goes through
    `call(fn, *args, **kwargs)`: kube.call (request timeout, retries) where the CLI builds one."""

    def __init__(
        self,
        batch: Any,
        namespace: str,
        run: str,
        *,
        open_store: Callable[[str], Any] | None = None,
        poll_seconds: float = 15.0,
        echo: Callable[[str], None] | None = None,
        call: Callable[..., Any] = _plain_call,
    ):
        from .stores import open_store as default_open

        self.batch, self.namespace, self.run, self.call = batch, namespace, run, call
        self.open_store = open_store or default_open
        self.poll = poll_seconds
        self.echo = echo or (lambda msg: None)
        self.requests = 0  # API requests made, for the benchmark and the exit log line
        self._stores: dict[str, Any] = {}
        self._missing_since: dict[str, float] = {}
        self._jobs: dict[str, dict[str, Any]] = {}  # Job name -> Job, kept current by the watch
        self._seen: dict[str, str] = {}

    # -- cluster
    def _selector(self) -> str:
        return f"{LABEL_RUN}={self.run},{LABEL_STAGE}"

    def _to_dict(self, obj: Any) -> dict[str, Any]:
        return self.batch.api_client.sanitize_for_serialization(obj)

    def _list(self) -> str:
        self.requests += 1
        resp = self.call(self.batch.list_namespaced_job, self.namespace, label_selector=self._selector())
        self._jobs = {j.metadata.name: self._to_dict(j) for j in resp.items}
        return resp.metadata.resource_version

    def _by_stage(self) -> dict[str, dict[str, Any]]:
        return {j["metadata"]["labels"][LABEL_STAGE]: j for j in self._jobs.values()}

    def _manifest_ready(self, jobs: dict[str, dict[str, Any]]) -> Callable[[str], bool]:
        def ready(stage: str) -> bool:
            uri = annotations_of(jobs[stage]).get(ANN_STORE)
            if not uri:
                return False
            if uri not in self._stores:
                self._stores[uri] = self.open_store(uri)
            if self._stores[uri].manifest(self.run, stage) is not None:
                self._missing_since.pop(stage, None)
                return True
            self._missing_since.setdefault(stage, time.monotonic())
            return False

        return ready

    def _waited(self, stage: str) -> float:
        since = self._missing_since.get(stage)
        return 0.0 if since is None else time.monotonic() - since

    def _apply(self, action: Action, jobs: dict[str, dict[str, Any]]) -> None:
        job = jobs[action.stage]
        now = datetime.now(UTC).isoformat(timespec="seconds")
        if action.kind == "release":
            body = release_patch(job, now)
        else:
            body = {"metadata": {"annotations": {ANN_BLOCKED: action.detail}}}
        self.requests += 1
        updated = self.call(self.batch.patch_namespaced_job, job["metadata"]["name"], self.namespace, body)
        self._jobs[job["metadata"]["name"]] = self._to_dict(updated)
        self.echo(f"{action.stage} {'released' if action.kind == 'release' else 'skipped'}: {action.detail}")

    def step(self) -> bool:
        """Act on the Jobs as they are now; True once every stage is final."""
        jobs = self._by_stage()
        for stage, job in jobs.items():
            state = job_state(job)
            said = "started" if state in (StageState.PENDING, StageState.RUNNING) else str(state)
            if self._seen.get(stage) != said:
                self._seen[stage] = said
                if state != StageState.WAITING:
                    self.echo(f"{stage} {said}")
        for action in plan(jobs, self._manifest_ready(jobs), self._waited):
            self._apply(action, jobs)
        return finished(self._by_stage())

    def run_until_done(self, timeout: float | None = None) -> dict[str, str]:
        """Reconcile until every stage is final (returns stage -> state), acting on each Job change as it is
        watched and at least once per poll interval (a succeeded stage's manifest may still be on its way)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        deadline = None if timeout is None else time.monotonic() + timeout
        rv = self._list()
        done = self.step()
        while not done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TunectlError(f"run {self.run} not finished after {timeout:.0f}s")
            wait = self.poll if left is None else max(1.0, min(self.poll, left))
            self.requests += 1
            try:
                for event in watch.Watch().stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    label_selector=self._selector(),
                    resource_version=rv,
                    timeout_seconds=max(1, int(wait)),
                    allow_watch_bookmarks=True,
                    # The server ends the watch after timeout_seconds; a silent connection is dropped after this.
                    _request_timeout=max(1, int(wait)) + WATCH_SLACK_SECONDS,
                ):
                    obj = event["object"]
                    if event["type"] == "ERROR":  # a Status, not a Job: usually 410, the window expired
                        raise ApiException(status=obj.get("code", 500), reason=obj.get("message", "watch error"))
                    if event["type"] == "BOOKMARK":  # only a newer resourceVersion (the client leaves it a dict)
                        rv = obj["metadata"]["resourceVersion"]
                        continue
                    rv = obj.metadata.resource_version
                    if event["type"] == "DELETED":
                        self._jobs.pop(obj.metadata.name, None)
                    else:
                        self._jobs[obj.metadata.name] = self._to_dict(obj)
                    if self.step():
                        break
                else:
                    done = self.step()
                    continue
                done = True
            except ApiException as e:
                if e.status != 410:
                    raise
                rv = self._list()  # the watch window expired: start over from a fresh list
                done = self.step()
            except (HTTPError, OSError):
                rv = self._list()  # the watch connection broke: a fresh list (retried by `call`) says where we are
                done = self.step()
        return {stage: str(job_state(job)) for stage, job in self._by_stage().items()}
