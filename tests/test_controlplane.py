"""The test control plane itself: real Kubernetes controllers and scheduler, kwok as the kubelet. These pin the
fake-pod contract (kwok-stages.yaml) that the Kubernetes backend's tests build on."""

from __future__ import annotations

import ipaddress
import time

import pytest
from cluster.controlplane import (
    EXIT_CODE,
    GPU,
    K8S_VERSION,
    POD_CIDR,
    REASON,
    WAITING_REASON,
    binaries,
    service_account_user,
)
from cluster.podrunner import PodRunner
from cluster.wait import wait_for
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@pytest.fixture
def api(cluster):
    with cluster.api_client() as api:
        yield api


@pytest.fixture
def kwok_only(cluster):
    if not cluster.kwok:
        pytest.skip("needs kwok's fake kubelets (not on an external cluster)")


def training_job(name: str, parallelism: int = 1, backoff_limit: int = 3) -> dict:
    """Shaped like a tunectl stage Job: Never restart, exit 78 fails the Job at once, disruptions don't count."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "parallelism": parallelism,
            "completions": parallelism,
            "backoffLimit": backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [78]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "train", "image": "tunectl/stage:test", "resources": {"limits": {GPU: "1"}}}
                    ],
                }
            },
        },
    }


def job_pods(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={job}").items


def job_condition(batch: client.BatchV1Api, namespace: str, job: str, kind: str) -> client.V1JobCondition | None:
    status = batch.read_namespaced_job_status(job, namespace).status
    return next((c for c in status.conditions or [] if c.type == kind and c.status == "True"), None)


def running_pod(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod:
    def one_running():
        pods = job_pods(core, namespace, job)
        return pods[0] if len(pods) == 1 and pods[0].status.phase == "Running" else None

    return wait_for(one_running, 30, f"the pod of job {job} Running")


def annotate(core: client.CoreV1Api, namespace: str, pod: str, annotations: dict[str, str]) -> None:
    core.patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": annotations}})


def runner_pod(name: str, script: str) -> dict:
    """A bare pod whose one container PodRunner runs: `python -u -c script` (unbuffered, so output comes as printed)."""
    container = {"name": "main", "image": "x", "command": ["python", "-u", "-c", script]}
    return {
        "metadata": {"name": name, "labels": {"tunectl.dev/run": "logs"}},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container]},
    }


def pod_log(core: client.CoreV1Api, namespace: str, pod: str, **options) -> str:
    """pods/log as text, from the raw body: kubernetes-client 36 returns read_namespaced_pod_log's text as the repr
    of its bytes ("b'...'", kubernetes-client/python#2596), and any version JSON-decodes a log that parses as JSON."""
    return core.read_namespaced_pod_log(pod, namespace, _preload_content=False, **options).data.decode()


def test_server_is_the_pinned_kubernetes_version(api, kwok_only):
    version = client.VersionApi(api).get_code()
    stale = f"stale build: rm -r {binaries()['kube-apiserver'].parent} && make cluster-tools"
    assert (version.git_version, version.major, version.minor) == (K8S_VERSION, "1", K8S_VERSION.split(".")[1]), stale


def test_nodes_are_ready_with_gpus(api, kwok_only):
    nodes = client.CoreV1Api(api).list_node(label_selector="type=kwok").items
    assert len(nodes) >= 2
    for node in nodes:
        assert node.status.allocatable[GPU] == "8"
        assert node.status.allocatable["pods"] == "110"
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True"
        assert not node.spec.taints


def test_job_pod_is_scheduled_runs_and_completes_on_exit_0(api, namespace, kwok_only):
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, training_job("ok"))

    pod = running_pod(core, namespace, "ok")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["type"] == "kwok"
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(POD_CIDR)
    assert pod.status.start_time is not None
    (cs,) = pod.status.container_statuses
    assert cs.ready and cs.state.running is not None
    assert next(c for c in pod.status.conditions if c.type == "Ready").status == "True"
    wait_for(lambda: batch.read_namespaced_job_status("ok", namespace).status.ready == 1, 10, "job.status.ready 1")

    time.sleep(1.5)  # a fake pod must not finish by itself
    assert core.read_namespaced_pod(pod.metadata.name, namespace).status.phase == "Running"

    annotate(core, namespace, pod.metadata.name, {EXIT_CODE: "0"})
    wait_for(lambda: job_condition(batch, namespace, "ok", "Complete"), 30, "job ok Complete")
    assert batch.read_namespaced_job_status("ok", namespace).status.succeeded == 1
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")


def test_exit_78_fails_the_job_by_pod_failure_policy_without_retry(api, namespace, kwok_only):
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, training_job("bad-input", backoff_limit=3))
    pod = running_pod(core, namespace, "bad-input")

    annotate(core, namespace, pod.metadata.name, {EXIT_CODE: "78"})
    failed = wait_for(lambda: job_condition(batch, namespace, "bad-input", "Failed"), 30, "job bad-input Failed")
    assert failed.reason == "PodFailurePolicy"
    assert batch.read_namespaced_job_status("bad-input", namespace).status.failed == 1
    time.sleep(1)  # give a (wrong) replacement pod the time to appear
    (pod,) = job_pods(core, namespace, "bad-input")
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (78, "Error")


def test_exit_annotations_set_at_creation_and_reason_override(api, namespace, kwok_only):
    core = client.CoreV1Api(api)
    pod = {
        "metadata": {"name": "oom", "annotations": {EXIT_CODE: "137", REASON: "OOMKilled"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "x"}]},
    }
    core.create_namespaced_pod(namespace, pod)
    pod = wait_for(
        lambda: (p := core.read_namespaced_pod("oom", namespace)).status.phase == "Failed" and p, 30, "pod oom Failed"
    )
    states = [(s.name, s.state.terminated.exit_code, s.state.terminated.reason) for s in pod.status.container_statuses]
    assert sorted(states) == [("a", 137, "OOMKilled"), ("b", 137, "OOMKilled")]


def test_pod_asking_for_more_gpus_than_a_node_has_stays_pending(api, namespace):
    core = client.CoreV1Api(api)
    pod = {
        "metadata": {"name": "too-big"},
        "spec": {"containers": [{"name": "train", "image": "x", "resources": {"limits": {GPU: "16"}}}]},
    }
    core.create_namespaced_pod(namespace, pod)

    def unschedulable():
        p = core.read_namespaced_pod("too-big", namespace)
        return next((c for c in p.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"), None)

    condition = wait_for(unschedulable, 30, "PodScheduled False")
    assert condition.reason == "Unschedulable"
    assert f"Insufficient {GPU}" in condition.message
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_waiting_reason_keeps_the_pod_pending_until_removed(api, namespace, kwok_only):
    core = client.CoreV1Api(api)
    pod = {
        "metadata": {"name": "no-image", "annotations": {WAITING_REASON: "ImagePullBackOff"}},
        "spec": {"containers": [{"name": "train", "image": "registry.invalid/none:1"}]},
    }
    core.create_namespaced_pod(namespace, pod)

    def waiting():
        p = core.read_namespaced_pod("no-image", namespace)
        statuses = p.status.container_statuses or []
        return statuses and statuses[0].state.waiting and p

    pod = wait_for(waiting, 30, "container waiting")
    assert pod.status.phase == "Pending"
    assert pod.status.container_statuses[0].state.waiting.reason == "ImagePullBackOff"
    assert "registry.invalid/none:1" in pod.status.container_statuses[0].state.waiting.message
    time.sleep(1)
    assert core.read_namespaced_pod("no-image", namespace).status.phase == "Pending"

    core.patch_namespaced_pod("no-image", namespace, {"metadata": {"annotations": {WAITING_REASON: None}}})
    wait_for(lambda: core.read_namespaced_pod("no-image", namespace).status.phase == "Running", 30, "Running")


def test_deleting_a_job_in_the_background_leaves_no_pods(api, namespace, kwok_only):
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, training_job("gone", parallelism=2))
    wait_for(
        lambda: [p.status.phase for p in job_pods(core, namespace, "gone")] == ["Running", "Running"],
        30,
        "two Running pods",
    )
    # Finalizers are what could keep pods around: the Job controller puts its own on every pod.
    assert all("batch.kubernetes.io/job-tracking" in p.metadata.finalizers for p in job_pods(core, namespace, "gone"))

    batch.delete_namespaced_job("gone", namespace, propagation_policy="Background")
    wait_for(lambda: not job_pods(core, namespace, "gone"), 30, "no pods of job gone")
    with pytest.raises(ApiException) as e:
        batch.read_namespaced_job("gone", namespace)
    assert e.value.status == 404


def test_service_account_without_binding_is_forbidden_and_audited(cluster, api, namespace, tmp_path):
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="bot")))
    kubeconfig = cluster.service_account_kubeconfig(namespace, "bot", tmp_path / "bot.kubeconfig")

    with config.new_client_from_config(config_file=str(kubeconfig)) as sa_api:
        review = client.AuthenticationV1Api(sa_api).create_self_subject_review(client.V1SelfSubjectReview())
        assert review.status.user_info.username == service_account_user(namespace, "bot")
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(sa_api).list_namespaced_secret(namespace)
        assert e.value.status == 403

    if cluster.audit_log is None:
        return
    user = service_account_user(namespace, "bot")

    def denied_list():
        return [
            e
            for e in cluster.audit_events(user)
            if e["verb"] == "list"
            and e.get("objectRef", {}).get("resource") == "secrets"
            and e.get("responseStatus", {}).get("code") == 403
        ]

    (event,) = wait_for(denied_list, 10, "an audit event for the denied list")
    assert event["level"] == "Metadata" and event["objectRef"]["namespace"] == namespace
    # Only ServiceAccounts are logged: the admin (tests, controllers, kwok) would drown the numbers.
    assert all("system:serviceaccounts" in e["user"].get("groups", []) for e in cluster.audit_events())


def test_pod_log_through_the_apiserver_is_what_the_process_printed(cluster, api, namespace, kwok_only, tmp_path):
    core = client.CoreV1Api(api)
    script = (
        "import sys\nfor i in range(1, 6):\n    print(f'line {i}')\nprint('oops', file=sys.stderr)\nprint(end='tail')"
    )
    core.create_namespaced_pod(namespace, runner_pod("printer", script))
    with PodRunner(cluster, namespace, tmp_path) as runner:
        wait_for(lambda: "printer" in runner.exits, 30, "the process to exit")
    wait_for(lambda: core.read_namespaced_pod("printer", namespace).status.phase == "Succeeded", 30, "Succeeded")

    # Served by kwok's kubelet API from the pod's CRI log; a terminated container's log stays readable.
    expected = "line 1\nline 2\nline 3\nline 4\nline 5\noops\ntail"
    assert runner.log("printer") == expected
    assert pod_log(core, namespace, "printer") == expected
    assert pod_log(core, namespace, "printer", container="main") == expected
    assert pod_log(core, namespace, "printer", tail_lines=3) == "line 5\noops\ntail"
    stamped = pod_log(core, namespace, "printer", timestamps=True).splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == expected.splitlines()
    assert all(line[:4].isdigit() and line.split(" ", 1)[0].endswith("Z") for line in stamped)


def test_pod_log_follow_streams_output_while_the_process_runs(cluster, api, namespace, kwok_only, tmp_path):
    core = client.CoreV1Api(api)
    # Prints, then waits for a file in its working directory (<workdir>/<pod>) before printing again.
    script = (
        "import os, time\nprint('started')\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\nprint('resumed')"
    )
    core.create_namespaced_pod(namespace, runner_pod("follower", script))
    with PodRunner(cluster, namespace, tmp_path) as runner:
        # Also waits for kwok to have seen the pod's Logs object (a watch event after PodRunner creates it).
        wait_for(
            lambda: pod_log(core, namespace, "follower") == "started\n", 30, "the log so far", ignore=(ApiException,)
        )
        response = core.read_namespaced_pod_log(
            "follower", namespace, follow=True, _preload_content=False, _request_timeout=30
        )
        try:
            chunks = response.stream(1024)
            received = b""
            while b"started\n" not in received:
                received += next(chunks)
            assert "follower" not in runner.exits
            (tmp_path / "follower" / "go").touch()
            while b"resumed\n" not in received:
                received += next(chunks)
        finally:
            # kwok v0.8.0 never ends a follow stream (it cannot tell that a container exited): the client closes it.
            response.close()
        assert received == b"started\nresumed\n"
        wait_for(lambda: runner.exits.get("follower") == 0, 30, "the process to exit 0")
