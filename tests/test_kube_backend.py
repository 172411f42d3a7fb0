"""The Kubernetes backend on a real control plane, its pods on kwok's fake GPU nodes: kube-apiserver (RBAC on), the
Job controller, the scheduler and the garbage collector are the real ones; tests/cluster/podrunner.py, a stand-in
for the container runtime kwok lacks, runs each pod's command as a local process or fakes its exit as the test says.
These are the tests that steer a pod's outcome (hold, publish a stand-in artifact) or need GPU nodes the real node
is not; what a kubelet does with real containers is tested in test_real_node.py. Artifacts go through a real MinIO.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml
from cluster.podrunner import RUN
from cluster.runs import Kube, make_kube
from cluster.wait import wait_for

from tunectl.errors import EXIT_CONFIG_ERROR

pytestmark = [pytest.mark.cluster, pytest.mark.helm]


@pytest.fixture
def kube(cluster, namespace, minio, bucket, tmp_path, monkeypatch) -> Kube:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    return make_kube(cluster, namespace, minio, bucket, tmp_path)


def test_render_needs_no_cluster(kube):
    env = {k: v for k, v in kube.env.items() if k != "KUBECONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunectl.cli", "render", "ruozhiba-tiny", "--run", "r-1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout)]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job", "Job", "Job", "Job"]


def test_too_many_gpus_is_reported_as_insufficient(kube):
    with kube.runner(reconciler="hold"):
        run = kube.submit("--helm-set", "stages.train.gpus=16")
        train = wait_for(
            lambda: (s := kube.stages(run)["train"])["reason"].startswith("unschedulable") and s,
            60,
            "the scheduler to give up on the train pod",
        )
    assert train["state"] == "pending"
    assert "Insufficient nvidia.com/gpu" in train["reason"]
    assert "Insufficient nvidia.com/gpu" in kube.cli("status", run).stdout


def test_cancel_leaves_no_jobs_or_pods_and_keeps_artifacts(kube):
    from tunectl.stores import open_store

    with kube.runner(train="publish", merge="hold", reconciler=RUN):
        run = kube.submit()
        if kube.cluster.kwok:  # cancel in the middle: train's artifacts are in the store, merge is running
            wait_for(lambda: kube.stages(run)["merge"]["state"] == "running", 90, "merge to start")
        else:
            wait_for(lambda: kube.pods(run, "train"), 90, "the train pod")
        out = kube.cli("cancel", run).stdout
    assert f"run {run} cancelled" in out
    be = kube.backend()
    sel = f"tunectl.dev/run={run}"
    assert be.cluster.batch.list_namespaced_job(kube.namespace, label_selector=sel).items == []
    assert be.cluster.core.list_namespaced_pod(kube.namespace, label_selector=sel).items == []
    assert be.cluster.core.list_namespaced_config_map(kube.namespace, label_selector=sel).items == []
    if kube.cluster.kwok:
        assert open_store(kube.store).manifest(run, "train") is not None  # artifacts kept
    gone = kube.cli("status", run, check=False)
    assert gone.returncode == 1 and f"no run '{run}'" in gone.stderr


def test_repeated_submit_does_not_duplicate(kube):
    with kube.runner(train="hold", reconciler="hold"):
        run = kube.submit("--run", "same-run-1")
        wait_for(lambda: kube.pods(run, "train"), 60, "the train pod")
        again = kube.cli("submit", "ruozhiba-tiny", "-f", str(kube.values), "--run", run)
        assert "already exists in" in again.stderr and again.stdout.strip() == run
        time.sleep(1)
        jobs = kube.backend().cluster.batch.list_namespaced_job(kube.namespace).items
        assert sorted(j.metadata.name for j in jobs) == sorted(
            f"{run}-{s}" for s in ("train", "merge", "gguf", "reconciler")
        )
        assert len(kube.pods(run, "train")) == 1
        other = kube.cli(
            "submit",
            "ruozhiba-tiny",
            "-f",
            str(kube.values),
            "--run",
            run,
            "--set",
            "training.max_steps=3",
            check=False,
        )
    assert other.returncode == EXIT_CONFIG_ERROR
    assert other.stderr.strip() == (
        f"error: run {run} already exists in namespace {kube.namespace} with a different recipe: choose another --run"
    )
    rows = json.loads(kube.cli("list", "-o", "json").stdout)
    assert [r["run"] for r in rows] == [run] and rows[0]["backend"] == "kubernetes"


def test_submit_wait_releases_stages_without_the_reconciler(kube):
    if not kube.cluster.kwok:
        pytest.skip("stand-in artifacts come from the kwok pod runner")
    with kube.runner(train="publish", merge="publish", gguf="publish"):
        proc = kube.cli(
            "submit",
            "ruozhiba-tiny",
            "-f",
            str(kube.values),
            "--helm-set",
            "reconciler.enabled=false",
            "--wait",
            "--poll-seconds",
            "1",
            timeout=180,
        )
    assert "merge released: train succeeded and its manifest is complete" in proc.stderr
    assert "gguf released: merge succeeded and its manifest is complete" in proc.stderr
    assert proc.stdout.splitlines()[1].endswith(": succeeded")


def test_reconciler_service_account_has_least_privilege(kube):
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    with kube.runner(train="hold", reconciler="hold"):
        run = kube.submit()
        other_run = kube.submit()
    other_ns = kube.cluster.new_namespace("rbac-other")
    sa_config = kube.cluster.service_account_kubeconfig(kube.namespace, f"{run}-reconciler", kube.workdir / "sa.yaml")
    api = config.new_client_from_config(config_file=str(sa_config))
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)

    def status_of(call) -> int:
        try:
            call()
            return 200
        except ApiException as e:
            return e.status

    # What it needs: read Jobs here, patch this run's waiting Jobs.
    assert status_of(lambda: batch.list_namespaced_job(kube.namespace)) == 200
    assert (
        status_of(
            lambda: batch.patch_namespaced_job(
                f"{run}-merge", kube.namespace, {"metadata": {"annotations": {"x": "y"}}}
            )
        )
        == 200
    )
    # Nothing else: no Secrets, no other namespace, no other run's Jobs, not even its own first stage.
    assert status_of(lambda: core.list_namespaced_secret(kube.namespace)) == 403
    assert status_of(lambda: core.read_namespaced_secret("s3-creds", kube.namespace)) == 403
    assert status_of(lambda: batch.list_namespaced_job(other_ns)) == 403
    assert (
        status_of(
            lambda: batch.patch_namespaced_job(f"{other_run}-merge", kube.namespace, {"spec": {"suspend": False}})
        )
        == 403
    )
    assert (
        status_of(lambda: batch.patch_namespaced_job(f"{run}-train", kube.namespace, {"spec": {"suspend": True}}))
        == 403
    )
    assert status_of(lambda: batch.delete_namespaced_job(f"{run}-merge", kube.namespace)) == 403
    assert status_of(lambda: core.list_namespaced_pod(kube.namespace)) == 403
    assert status_of(lambda: batch.create_namespaced_job(kube.namespace, {"metadata": {"name": "x"}})) == 403
