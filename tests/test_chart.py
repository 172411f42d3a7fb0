"""The Helm chart: lint, render under several values scenarios, strict validation of every object by a real
kube-apiserver (server-side dry run, fieldValidation=Strict), and values typos rejected by values.schema.json."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe
from tunectl.render import chart_dir, helm_binary, render

pytestmark = pytest.mark.helm

STORE = "s3://tunectl-artifacts/team-a"
RUN = "ruozhiba-tiny-20261127-120000-abcd"

SCENARIOS = {
    "defaults": [],
    "everything-set": [
        "image.registry=registry.example.com/ml/",
        "image.tag=1.2.3",
        "imagePullSecrets[0].name=regcred",
        "s3.endpoint=http://minio.minio.svc:9000",
        "s3.credentialsSecret=s3-creds",
        "huggingFace.tokenSecret=hf-token",
        "kueue.queueName=gpu-queue",
        "scheduling.priorityClassName=batch-low",
        "scheduling.tolerations[0].key=nvidia.com/gpu",
        "scheduling.tolerations[0].operator=Exists",
        "scheduling.tolerations[0].effect=NoSchedule",
        "stages.gguf.nodeSelector.pool=cpu",
        "stages.train.gpus=2",
        "stages.train.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].key=gpu.product",
        "stages.train.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].operator=In",
        "stages.train.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].values[0]=H100",
    ],
    "no-reconciler": ["reconciler.enabled=false"],
}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("ruozhiba-tiny")


def rendered(recipe, sets=(), namespace="ml"):
    return render(recipe, RUN, STORE, namespace, (), tuple(sets))


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint_strict():
    proc = subprocess.run(
        [helm_binary(), "lint", "--strict", str(chart_dir()), "--set", f"run.store={STORE}", "--set", "recipe=x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_helm_template_works_on_its_own(tmp_path: Path):
    """Without tunectl: the release name is the run id, the recipe comes from a file."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(load_recipe("ruozhiba").to_yaml())
    proc = subprocess.run(
        [helm_binary(), "template", "my-run", str(chart_dir()), "--set", f"run.store={STORE}"]
        + ["--set-file", f"recipe={recipe_file}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(proc.stdout) if d]
    assert {"my-run-train", "my-run-merge", "my-run-gguf", "my-run-reconciler", "my-run-recipe"} <= set(names)


@pytest.mark.parametrize(
    ("stages", "says"),
    [
        (["--set", "run.stages={train,deploy}"], "/run/stages/1"),
        (["--set", "run.stages={train,train}"], "/run/stages"),
        (["--set-literal", "run.stages=train,deploy"], "/run/stages"),
        (["--set-literal", "run.stages=train,train"], "run.stages must name each of train, merge, gguf at most once"),
    ],
)
def test_helm_template_on_its_own_checks_the_stages(stages, says):
    """run.stages is a list in a values file, or the comma-joined string tunectl passes with --set-literal."""
    proc = subprocess.run(
        [helm_binary(), "template", "my-run", str(chart_dir()), "--set", f"run.store={STORE}", "--set", "recipe=x"]
        + stages,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and says in proc.stderr


def test_stages_as_a_string_or_a_list_render_the_same():
    def names(*stages: str) -> list[str]:
        proc = subprocess.run(
            [helm_binary(), "template", "r", str(chart_dir()), "--set", f"run.store={STORE}", "--set", "recipe=x"]
            + list(stages),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        return [d["metadata"]["name"] for d in yaml.safe_load_all(proc.stdout) if d]

    assert names("--set", "run.stages={train,merge}") == names("--set-literal", "run.stages=train,merge")
    assert "r-gguf" not in names("--set-literal", "run.stages=train,merge")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario_objects(recipe, scenario):
    docs = rendered(recipe, SCENARIOS[scenario])
    jobs = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(docs, "Job")}
    stages = ["train", "merge", "gguf"]
    assert set(jobs) == set(stages) | ({"reconciler"} if scenario != "no-reconciler" else set())
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["tunectl.dev/run"] == RUN and labels["app.kubernetes.io/instance"] == RUN
        assert labels["app.kubernetes.io/managed-by"] == "tunectl" and labels["app.kubernetes.io/name"] == "tunectl"
        assert doc["metadata"]["namespace"] == "ml"
    for i, stage in enumerate(stages):
        spec = jobs[stage]["spec"]
        pod = spec["template"]["spec"]
        [c] = pod["containers"]
        assert spec["suspend"] is (i > 0)
        assert jobs[stage]["metadata"]["annotations"].get("tunectl.dev/after") == (stages[i - 1] if i else None)
        assert spec["template"]["metadata"]["labels"]["tunectl.dev/stage"] == stage
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {
            "action": "FailJob",
            "onExitCodes": {"containerName": stage, "operator": "In", "values": [78]},
        }
        # A stage stopped after saving what a retry resumes from (75), and a disruption: retried, not counted.
        assert rules[1] == {
            "action": "Ignore",
            "onExitCodes": {"containerName": stage, "operator": "In", "values": [75]},
        }
        assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
        assert pod["terminationGracePeriodSeconds"] == (300 if stage == "train" else 60)
        assert spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
        assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["command"] == ["python", "-m", f"tunectl_jobs.{stage}"]
        assert c["args"] == ["--recipe", "/etc/tunectl/recipe.yaml", "--store", STORE, "--run", RUN]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert {"/etc/tunectl", "/scratch", "/dev/shm"} <= set(mounts)
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
        assert vols["recipe"]["configMap"]["name"] == f"{RUN}-recipe"
        # GPUs only as a limit (extended resources need no request), and only where asked.
        assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    assert (
        jobs["gguf"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") is None
    )
    [cm] = by_kind(docs, "ConfigMap")
    assert load_recipe("ruozhiba-tiny").to_yaml() == cm["data"]["recipe.yaml"]


def test_everything_set_reaches_the_objects(recipe):
    docs = rendered(recipe, SCENARIOS["everything-set"])
    jobs = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(docs, "Job")}
    train = jobs["train"]["spec"]["template"]["spec"]
    gguf = jobs["gguf"]["spec"]["template"]["spec"]
    assert train["containers"][0]["image"] == "registry.example.com/ml/tunectl-train:1.2.3"
    assert train["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert train["imagePullSecrets"] == [{"name": "regcred"}]
    assert train["priorityClassName"] == "batch-low"
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert train["affinity"]["nodeAffinity"]
    assert gguf["nodeSelector"] == {"pool": "cpu"} and "nodeSelector" not in train
    # Kueue: the first stage is queued at once; later ones carry the queue name for the reconciler to apply.
    assert jobs["train"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in jobs["merge"]["metadata"]["labels"]
    assert jobs["merge"]["metadata"]["annotations"]["tunectl.dev/queue-name"] == "gpu-queue"
    env = {e["name"]: e for e in train["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    # Where the stage keeps its phase and error line: the file the kubelet returns as the termination message.
    container = train["containers"][0]
    assert container["terminationMessagePath"] == env["TUNECTL_STATUS_FILE"]["value"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_credentials_only_by_secret_reference(recipe, scenario):
    docs = rendered(recipe, SCENARIOS[scenario])
    assert not by_kind(docs, "Secret")
    for job in by_kind(docs, "Job"):
        for env in job["spec"]["template"]["spec"]["containers"][0]["env"]:
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]) and env["name"] != "AWS_ACCESS_KEY_ID":
                assert "value" not in env, env
    for role in by_kind(docs, "Role"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"] and "*" not in rule["verbs"]


def test_reconciler_rbac_is_scoped_to_this_run(recipe):
    docs = rendered(recipe)
    [role] = by_kind(docs, "Role")
    writes = [r for r in role["rules"] if set(r["verbs"]) - {"get", "list", "watch"}]
    assert writes == [
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "resourceNames": [f"{RUN}-merge", f"{RUN}-gguf"],
            "verbs": ["patch"],
        }
    ]
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RUN}-reconciler", "namespace": "ml"}]


def test_single_stage_run_needs_no_reconciler(recipe):
    one = load_recipe("ruozhiba-tiny", ["export.lora=false", "export.merged_16bit=false", "export.gguf=[]"])
    docs = rendered(one)
    assert [d["metadata"]["name"] for d in by_kind(docs, "Job")] == [f"{RUN}-train"]
    assert not by_kind(docs, "Role") and by_kind(docs, "Job")[0]["spec"]["suspend"] is False


@pytest.mark.parametrize(
    ("typo", "says"),
    [
        ("stages.train.gpu=1", "additional properties 'gpu' not allowed"),
        ("reconciler.enable=false", "additional properties 'enable' not allowed"),
        ("s3.endpoit=http://x", "additional properties 'endpoit' not allowed"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("stages.train.resources.request.cpu=2", "additional properties 'request' not allowed"),
        ("stages.merge.gpus=-1", "/stages/merge/gpus"),
        ("stages.train.resources.limits.memory=lots", "/stages/train/resources/limits/memory"),
        ("image.tag=1.2.3 beta", "/image/tag"),
    ],
)
def test_values_typos_are_rejected_by_the_schema(recipe, typo, says):
    with pytest.raises(ConfigError) as e:
        rendered(recipe, [typo])
    assert str(e.value).startswith("chart values rejected: ")
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_server_side_strict_validation(recipe, cluster, namespace, monkeypatch):
    """Every object of every scenario passes the real API server's strict validation (unknown or duplicate
    fields are errors), without being created."""
    from tunectl.kube import Cluster

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    api = Cluster(namespace=namespace)
    for scenario, sets in SCENARIOS.items():
        for doc in rendered(recipe, sets, namespace=namespace):
            assert api.create(doc, dry_run=True), f"{scenario}: {doc['kind']} {doc['metadata']['name']}"
    for n in (2, 4):  # training across nodes: an Indexed Job and a headless Service
        for doc in rendered(across(recipe, n, 2), ["stages.train.gpus=2", "kueue.queueName=gpu"], namespace):
            assert api.create(doc, dry_run=True), f"{n} nodes: {doc['kind']} {doc['metadata']['name']}"
    assert api.batch.list_namespaced_job(namespace).items == []  # dry run: nothing was created


def test_stage_command_can_be_replaced_and_keeps_the_run_arguments(recipe):
    docs = rendered(recipe, ["stages.train.command={accelerate,launch,-m,tunectl_jobs.train}"])
    train = next(d for d in by_kind(docs, "Job") if d["metadata"]["name"] == f"{RUN}-train")
    [c] = train["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["accelerate", "launch", "-m", "tunectl_jobs.train"]
    assert c["args"] == ["--recipe", "/etc/tunectl/recipe.yaml", "--store", STORE, "--run", RUN]


def test_a_bad_run_id_is_refused_before_helm(recipe):
    from tunectl.render import render_run

    with pytest.raises(ConfigError, match="run id 'Bad_ID' must be lower-case"):
        render_run(recipe, STORE, "ml", "Bad_ID")
    with pytest.raises(ConfigError, match="at most 52 characters"):
        render_run(recipe, STORE, "ml", "r" * 53)
    with pytest.raises(ConfigError, match="Kubernetes runs hand artifacts over through S3"):
        render_run(recipe, "/tmp/store", "ml", "ok-run")


def test_chart_and_image_tags_follow_the_project_version():
    import tomllib

    import tunectl

    version = tomllib.loads((chart_dir().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((chart_dir() / "Chart.yaml").read_text())
    values = yaml.safe_load((chart_dir() / "values.yaml").read_text())
    assert tunectl.__version__ == version == chart["appVersion"] == values["image"]["tag"]


def test_pods_without_a_pod_network_use_the_hosts_and_reach_the_api_server_where_told(recipe):
    """hostNetwork for every pod; the reconciler's API address replaces the in-cluster Service's; it follows its
    own placement values, not the GPU stages' scheduling defaults."""
    sets = [
        "hostNetwork=true",
        "reconciler.apiServer.host=10.0.0.10",
        "reconciler.apiServer.port=6443",
        "reconciler.nodeSelector.pool=system",
        "scheduling.nodeSelector.pool=gpu",
    ]
    jobs = {j["metadata"]["name"].rsplit("-", 1)[1]: j for j in by_kind(rendered(recipe, sets), "Job")}
    assert set(jobs) == {"train", "merge", "gguf", "reconciler"}
    for name, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        assert (pod["hostNetwork"], pod["dnsPolicy"]) == (True, "ClusterFirstWithHostNet"), name
        assert pod["nodeSelector"] == {"pool": "system" if name == "reconciler" else "gpu"}, name
    env = {e["name"]: e.get("value") for e in jobs["reconciler"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("10.0.0.10", "6443")
    defaults = {j["metadata"]["name"]: j for j in by_kind(rendered(recipe), "Job")}
    for job in defaults.values():
        pod = job["spec"]["template"]["spec"]
        assert "hostNetwork" not in pod and "dnsPolicy" not in pod
        assert not any(e["name"].startswith("KUBERNETES_") for e in pod["containers"][0].get("env", []))


def test_the_api_server_address_needs_host_and_port(recipe):
    with pytest.raises(ConfigError, match="reconciler.apiServer: set both host and port, or neither"):
        rendered(recipe, ["reconciler.apiServer.host=10.0.0.10"])


def test_no_pod_runs_its_program_as_pid_1(recipe):
    """A Python PID 1 ignores SIGTERM (the kernel drops signals to a namespace's init without a handler), so every
    pod shares its process namespace and the sandbox's pause process is PID 1."""
    for job in by_kind(rendered(recipe), "Job"):
        assert job["spec"]["template"]["spec"]["shareProcessNamespace"] is True, job["metadata"]["name"]


def test_a_distributed_train_stage_gets_a_gpu_per_process(recipe):
    """training.nproc_per_node processes run in the train pod (torchrun inside): one GPU each, checked before
    anything reaches the cluster; a pod without GPUs (stages.train.gpus=0) runs gloo processes on its CPUs."""
    two = recipe.model_copy(update={"training": recipe.training.model_copy(update={"nproc_per_node": 2})})
    with pytest.raises(ConfigError) as e:
        rendered(two)
    assert str(e.value) == (
        "training.nproc_per_node 2 needs as many GPUs in each train pod, which asks for 1: pass --helm-set "
        "stages.train.gpus=2 or lower training.nproc_per_node"
    )
    train = next(
        d for d in by_kind(rendered(two, ["stages.train.gpus=2"]), "Job") if d["metadata"]["name"].endswith("-train")
    )
    [c] = train["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert (
        "nproc_per_node: 2"
        in next(d for d in by_kind(rendered(two, ["stages.train.gpus=2"]), "ConfigMap"))["data"]["recipe.yaml"]
    )
    assert rendered(two, ["stages.train.gpus=0"])


def across(recipe, nnodes, nproc_per_node=1):
    training = recipe.training.model_copy(update={"nnodes": nnodes, "nproc_per_node": nproc_per_node})
    return recipe.model_copy(update={"training": training})


@pytest.mark.parametrize("nnodes", [1, 2, 4])
def test_training_across_nodes_is_an_indexed_job_whose_pod_0_hosts_the_rendezvous(recipe, nnodes):
    """training.nnodes pods of nproc_per_node GPUs each, started together (Kueue admits the Job's pods as one
    workload); a headless Service names each pod, and every pod is told pod 0's name; a pod that only lost its peers
    (exit 76) is replaced without counting a failure. One node renders what it always did."""
    docs = rendered(across(recipe, nnodes, 2), ["stages.train.gpus=2", "kueue.queueName=gpu"])
    jobs = {d["metadata"]["labels"]["tunectl.dev/stage"]: d for d in by_kind(docs, "Job") if "tunectl.dev/stage" in
            d["metadata"]["labels"]}  # fmt: skip
    train, services = jobs["train"], by_kind(docs, "Service")
    pod = train["spec"]["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    ignored = [r["onExitCodes"]["values"] for r in train["spec"]["podFailurePolicy"]["rules"]
               if r["action"] == "Ignore" and "onExitCodes" in r]  # fmt: skip
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    if nnodes == 1:
        assert services == [] and "completionMode" not in train["spec"] and "parallelism" not in train["spec"]
        assert "subdomain" not in pod and "TUNECTL_RDZV_ENDPOINT" not in env and ignored == [[75]]
        return
    assert (train["spec"]["completionMode"], train["spec"]["completions"], train["spec"]["parallelism"]) == (
        "Indexed", nnodes, nnodes,
    )  # fmt: skip
    assert ignored == [[75], [76]]
    [svc] = services
    assert svc["metadata"]["name"] == pod["subdomain"] == f"{RUN}-train"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"tunectl.dev/run": RUN, "tunectl.dev/stage": "train"}
    assert env["TUNECTL_RDZV_ENDPOINT"] == f"{RUN}-train-0.{RUN}-train:29400"
    # The Service exists before the Job whose pods it names; merge and gguf stay one pod each.
    assert [d["kind"] for d in docs].index("Service") < [d["kind"] for d in docs].index("Job")
    assert all("parallelism" not in jobs[s]["spec"] for s in ("merge", "gguf"))
    # A cluster without cluster DNS for pods (hostNetwork on one node): the values name the host and the port.
    other = rendered(across(recipe, nnodes), ["stages.train.rendezvous.host=127.0.0.1",
                                              "stages.train.rendezvous.port=29555"])  # fmt: skip
    [train] = [d for d in by_kind(other, "Job") if d["metadata"]["name"] == f"{RUN}-train"]
    env = {e["name"]: e.get("value") for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TUNECTL_RDZV_ENDPOINT"] == "127.0.0.1:29555"
    assert by_kind(other, "Service")[0]["spec"]["ports"][0]["port"] == 29555
    # A train pod with fewer GPUs than processes is refused for every node count.
    with pytest.raises(ConfigError, match="needs as many GPUs in each train pod"):
        rendered(across(recipe, nnodes, 2))
