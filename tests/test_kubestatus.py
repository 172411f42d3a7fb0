"""Stage states and reasons from Job and pod objects as the API returns them, and the reconciler's decisions."""

from __future__ import annotations

import json

from tunectl import kubestatus, runmodel
from tunectl.reconcile import finished, plan, release_patch


def stage_status(*args):
    return kubestatus.stage_status(*args).to_dict()


def run_state(stages):
    return runmodel.run_state(s["state"] for s in stages)


def job(name="r-train", *, suspend=False, conditions=(), annotations=None, parallelism=1, **status):
    return {
        "metadata": {"name": name, "annotations": annotations or {}, "labels": {}},
        "spec": {"suspend": suspend, "parallelism": parallelism},
        "status": {"conditions": [{"type": t, "status": "True", **extra} for t, extra in conditions], **status},
    }


def pod(
    phase, *, created="2026-11-27T10:00:00Z", node=None, waiting=None, terminated=None, unschedulable=None, index=None
):
    state = {}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": "Back-off pulling image tunectl-train:0.1.0"}}
    if terminated:
        state = {"terminated": terminated}
    conditions = []
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    return {
        "metadata": {
            "name": "p",
            "creationTimestamp": created,
            "labels": {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"nodeName": node},
        "status": {"phase": phase, "conditions": conditions, "containerStatuses": [{"state": state}] if state else []},
    }


def test_waiting_for_upstream():
    s = stage_status("merge", job("r-merge", suspend=True, annotations={"tunectl.dev/after": "train"}), [])
    assert (s["state"], s["reason"]) == ("waiting", "waiting for train")


def test_released_to_kueue_is_queued():
    ann = {"tunectl.dev/after": "train", "tunectl.dev/released": "t", "tunectl.dev/queue-name": "gpu"}
    s = stage_status("merge", job("r-merge", suspend=True, annotations=ann), [])
    assert (s["state"], s["reason"]) == ("pending", "queued in Kueue queue gpu")


def test_unschedulable_names_the_missing_resource_without_the_preemption_postscript():
    msg = (
        "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available: "
        "2 No preemption victims found for incoming pod."
    )
    s = stage_status("train", job(active=1), [pod("Pending", unschedulable=msg)])
    assert s["state"] == "pending"
    assert s["reason"] == "unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."


def test_image_pull_backoff():
    s = stage_status("train", job(active=1), [pod("Pending", node="n1", waiting="ImagePullBackOff")])
    assert s["state"] == "pending" and s["reason"].startswith("ImagePullBackOff: Back-off pulling image")
    assert s["reason"].endswith("(check image.registry, image.tag and imagePullSecrets)")


def test_an_image_not_on_the_node_says_how_to_get_it_there():
    s = stage_status("train", job(active=1), [pod("Pending", node="n1", waiting="ErrImageNeverPull")])
    assert s["reason"].startswith("ErrImageNeverPull: ")
    assert s["reason"].endswith("(load the image onto the node, or set image.pullPolicy to pull it)")


def test_a_pod_lost_to_a_disruption_is_retried_without_counting_it():
    evicted = pod("Failed", created="2026-11-27T10:00:00Z", terminated={"exitCode": 143, "reason": "Error"})
    evicted["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    )
    pods = [evicted, pod("Running", created="2026-11-27T10:05:00Z", node="gpu-2")]
    s = stage_status("train", job(active=1), pods)
    assert s["state"] == "running" and "attempts" not in s
    assert s["reason"] == (
        "on node gpu-2; retrying after a disruption (EvictionByEvictionAPI), not counted as a failure"
    )


def test_running_names_the_node():
    s = stage_status("train", job(active=1, startTime="2026-11-27T10:00:00Z"), [pod("Running", node="gpu-1")])
    assert (s["state"], s["reason"]) == ("running", "on node gpu-1")


def test_a_group_runs_once_all_its_pods_run_and_names_their_nodes():
    pods = [pod("Running", node="gpu-1", index=0), pod("Running", node="gpu-2", index=1)]
    s = stage_status("train", job(parallelism=2, active=2), pods)
    assert (s["state"], s["reason"]) == ("running", "2 pods on nodes gpu-1, gpu-2") and "attempts" not in s
    short = [pods[0], pod("Pending", unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", index=1)]
    s = stage_status("train", job(parallelism=2, active=2), short)
    assert s["state"] == "pending"
    assert s["reason"] == (
        "1 of 2 pods running (the others: unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.)"
    )


def test_a_group_retried_after_a_node_failed_names_that_node_not_the_peers_it_took_down():
    crashed = pod("Failed", created="2026-11-27T10:00:00Z", terminated={"exitCode": 137, "reason": "Error"}, index=1)
    peer = pod("Failed", created="2026-11-27T09:59:00Z", terminated={"exitCode": 76, "reason": "Error"}, index=0)
    peer["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-11-27T10:00:05Z"
    again = [pod("Running", created="2026-11-27T10:01:00Z", node="gpu-1", index=i) for i in (0, 1)]
    s = stage_status("train", job(parallelism=2, active=2, failed=1), [peer, crashed, *again])
    assert s["state"] == "running" and s["attempts"] == 2
    assert s["reason"].startswith("2 pods on node gpu-1; retrying after killed by SIGKILL")
    only_peers = stage_status("train", job(parallelism=2, active=2), [peer, *again])
    assert only_peers["reason"] == (
        "2 pods on node gpu-1; retrying after lost a peer of its training group (exit code 76), not counted as a "
        "failure"
    )


def test_config_error_exit_code_is_reported_as_not_retried():
    failed = job(conditions=[("Failed", {"reason": "PodFailurePolicy", "message": "Container train ... rule 0"})])
    s = stage_status("train", failed, [pod("Failed", terminated={"exitCode": 78, "reason": "Error"})])
    assert s["state"] == "failed" and s["exit_code"] == 78
    assert s["reason"] == "failed with exit code 78 (configuration error, not retried)"


def test_oom_killed_says_what_to_raise():
    failed = job(conditions=[("Failed", {"reason": "BackoffLimitExceeded"})], failed=3)
    s = stage_status("train", failed, [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})])
    assert s["reason"] == "OOMKilled (exit code 137): raise the stage's memory limit (after 3 attempts)"


def test_a_retry_in_progress_mentions_the_previous_failure():
    pods = [
        pod("Failed", created="2026-11-27T10:00:00Z", terminated={"exitCode": 1, "reason": "Error"}),
        pod("Running", created="2026-11-27T10:05:00Z", node="gpu-2"),
    ]
    s = stage_status("train", job(active=1, failed=1), pods)
    assert s["state"] == "running" and s["attempts"] == 2
    assert s["reason"] == "on node gpu-2; retrying after failed with exit code 1"


def test_deadline_and_skipped_and_missing():
    s = stage_status("gguf", job(conditions=[("Failed", {"reason": "DeadlineExceeded"})]), [])
    assert s["reason"] == "ran past its activeDeadlineSeconds"
    blocked = job("r-gguf", suspend=True, annotations={"tunectl.dev/blocked": "upstream merge failed"})
    assert stage_status("gguf", blocked, [])["state"] == "skipped"
    assert stage_status("gguf", None, [])["state"] == "missing"


def test_run_state():
    assert run_state([{"state": "succeeded"}, {"state": "succeeded"}]) == "succeeded"
    assert run_state([{"state": "failed"}, {"state": "skipped"}]) == "failed"
    assert run_state([{"state": "running"}, {"state": "waiting"}]) == "running"
    assert run_state([{"state": "pending"}, {"state": "waiting"}]) == "pending"


def pipeline(train_conditions=(), merge_suspended=True):
    return {
        "train": job("r-train", conditions=train_conditions),
        "merge": job("r-merge", suspend=merge_suspended, annotations={"tunectl.dev/after": "train"}),
        "gguf": job("r-gguf", suspend=True, annotations={"tunectl.dev/after": "merge"}),
    }


def test_plan_waits_while_upstream_runs():
    assert plan(pipeline(), lambda s: True, lambda s: 0.0) == []


def test_plan_releases_only_with_the_manifest():
    jobs = pipeline(train_conditions=[("Complete", {})])
    assert plan(jobs, lambda s: False, lambda s: 0.0) == []
    [action] = plan(jobs, lambda s: s == "train", lambda s: 0.0)
    assert (action.kind, action.stage) == ("release", "merge")


def test_plan_fails_the_rest_when_upstream_fails_or_never_publishes():
    jobs = pipeline(train_conditions=[("Failed", {})])
    [action] = plan(jobs, lambda s: True, lambda s: 0.0)
    assert (action.kind, action.stage, action.detail) == ("block", "merge", "upstream train failed")
    jobs = pipeline(train_conditions=[("Complete", {})])
    [action] = plan(jobs, lambda s: False, lambda s: 1e6)
    assert action.kind == "block" and "no manifest" in action.detail
    # A skipped stage propagates to the one after it, and then the run is final.
    jobs["merge"]["metadata"]["annotations"]["tunectl.dev/blocked"] = "upstream train failed"
    [action] = plan(jobs, lambda s: True, lambda s: 0.0)
    assert (action.kind, action.stage) == ("block", "gguf")
    assert not finished(jobs)
    jobs["gguf"]["metadata"]["annotations"]["tunectl.dev/blocked"] = "upstream merge skipped"
    assert finished(jobs)
    assert not finished(pipeline())


def test_a_stage_released_to_kueue_is_not_released_again():
    jobs = pipeline(train_conditions=[("Complete", {})])
    jobs["merge"]["metadata"]["annotations"].update({"tunectl.dev/queue-name": "gpu", "tunectl.dev/released": "t"})
    assert plan(jobs, lambda s: True, lambda s: 0.0) == []  # still suspended: Kueue has not admitted it yet


def test_release_patch_with_and_without_kueue():
    plain = release_patch(job("r-merge", suspend=True), "now")
    assert plain["spec"] == {"suspend": False}
    queued = release_patch(job("r-merge", suspend=True, annotations={"tunectl.dev/queue-name": "gpu"}), "now")
    assert "spec" not in queued and queued["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "gpu"}


def test_a_stage_preempted_after_saving_a_checkpoint_is_resuming():
    error = "stopped by SIGTERM at step 12: checkpoint saved, a retry resumes from it"
    message = json.dumps({"stage": "train", "phase": "train", "error": error})
    stopped = pod(
        "Failed", created="2026-11-27T10:00:00Z", terminated={"exitCode": 75, "reason": "Error", "message": message}
    )
    pods = [stopped, pod("Running", created="2026-11-27T10:05:00Z", node="gpu-2")]
    s = stage_status("train", job(active=1), pods)
    assert s["state"] == "running"
    assert s["reason"] == (
        "on node gpu-2; resuming after it was preempted (exit code 75): stopped by SIGTERM at step 12: checkpoint "
        "saved, a retry resumes from it"
    )
