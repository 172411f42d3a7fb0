"""Hostile and careless chart values (issue 13, items 2, 3 and the namespace of item 10).

What the run owns (`run.*` and `recipe`) cannot come from the user's values, and no chart value can add a field
the templates do not write: every scalar a template inserts is quoted or serialized, and held to a pattern by
values.schema.json where Kubernetes has one. Everything runs the real helm; the CLI cases the real `tunectl render`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tunectl.errors import EXIT_CONFIG_ERROR, ConfigError
from tunectl.recipe import load_recipe
from tunectl.render import chart_dir, helm_binary, render, render_run, run_values, template_args
from tunectl.runmodel import stages_for

pytestmark = pytest.mark.helm

STORE = "s3://tunectl-artifacts/team-a"
RUN = "ruozhiba-tiny-20261127-120000-abcd"
INJECTED = "envFrom: [{secretRef: {name: s3-creds}}]"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("ruozhiba-tiny")


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert proc.stdout == ""  # no objects printed
    return lines[0]


def render_cli(tunectl, *args: str, namespace: str = "ml", store: str = STORE) -> subprocess.CompletedProcess[str]:
    return tunectl("--store", store, "render", "ruozhiba-tiny", "--run", RUN, f"--namespace={namespace}", *args)


def refused(recipe, sets=(), files=()) -> str:
    with pytest.raises(ConfigError) as e:
        render(recipe, RUN, STORE, "ml", tuple(files), tuple(sets))
    assert "\n" not in str(e.value)
    return str(e.value)


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for d in docs if d["kind"] == "Job" for c in d["spec"]["template"]["spec"]["containers"]]


# -- item 2: values the run owns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("helm_set", "key"),
    [
        ("run.id=victim-run", "run.id"),
        ("run.store=s3://victim-bucket/runs", "run.store"),
        ("run.stages={train}", "run.stages"),
        ("run.recipe=victim", "run.recipe"),
        ("recipe=name: evil", "recipe"),
        ("recipe.name=evil", "recipe.name"),
        # Several keys in one --set, escaped commas, lists and indexes: helm's own parser decides what is set.
        ("image.tag=1.2.3,run.id=victim-run", "run.id"),
        ("image.tag=x\\,y,run.store=s3://victim-bucket/p", "run.store"),
        ("stages.train.command={sh,-c},run.id=victim-run", "run.id"),
        ("run[0]=victim-run", "run"),
        ("run=null", "run"),
    ],
)
def test_helm_set_cannot_set_what_the_run_owns(tunectl, helm_set, key):
    line = one_line(render_cli(tunectl, "--helm-set", "image.tag=1.2.3", "--helm-set", helm_set))
    assert f"--helm-set {helm_set!r} sets {key}, which belongs to the run" in line
    assert "use --run for the run id" in line


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("run:\n  id: victim-run\n", "run.id"),
        ("recipe: |\n  name: evil\n", "recipe"),
        ("run:\n", "run"),
        (None, "run.id"),  # a copy of the chart's values.yaml
    ],
)
def test_values_file_cannot_set_what_the_run_owns(tunectl, tmp_path, content, key):
    f = tmp_path / "cluster values.yaml"
    if content is None:
        shutil.copy(chart_dir() / "values.yaml", f)
    else:
        f.write_text(content)
    line = one_line(render_cli(tunectl, "--values", str(f)))
    assert f"values file {str(f)!r} sets {key}, which belongs to the run" in line


def test_values_that_only_mention_run_are_fine(recipe, tmp_path):
    f = tmp_path / "a,b.yaml"  # helm splits --values at commas: tunectl must not
    f.write_text("podAnnotations: {run: x}\n")
    docs = render(recipe, RUN, STORE, "ml", (f,), ("podAnnotations.note=run.id=victim-run", "image.tag=run"))
    assert all(d["metadata"]["name"].startswith(f"{RUN}-") for d in docs)
    train = next(d for d in docs if d["metadata"]["name"] == f"{RUN}-train")
    assert train["spec"]["template"]["metadata"]["annotations"] == {"run": "x", "note": "run.id=victim-run"}


def test_the_runs_values_outrank_every_user_value(recipe, tmp_path):
    """Even past the refusal, helm applies tunectl's values last: the objects stay the run's."""
    values = tmp_path / "v.yaml"
    values.write_text("run: {id: victim-run, store: 's3://victim-bucket/a', stages: [train]}\nrecipe: evil\n")
    recipe_file = tmp_path / "recipe.yaml"
    own = run_values(recipe, RUN, STORE)
    recipe_file.write_text(own["recipe"])
    sets = ("run.id=victim-run,run.store=s3://victim-bucket/b,run.stages={gguf},run.recipe=victim", "recipe=evil")
    args = template_args(own, "ml", recipe_file, (values,), sets)
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert all(d["metadata"]["name"].startswith(f"{RUN}-") for d in docs)
    assert "victim" not in proc.stdout
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"] == {"recipe.yaml": recipe.to_yaml()}
    stages = [
        d["metadata"]["labels"]["tunectl.dev/stage"]
        for d in docs
        if d["kind"] == "Job" and "-reconciler" not in d["metadata"]["name"]
    ]
    assert stages == stages_for(recipe)


@pytest.mark.parametrize(
    ("template", "old", "new", "says"),
    [
        ("recipe-configmap.yaml", '{{ include "tunectl.run" . }}-recipe', "victim-run-recipe", "not named and"),
        ("recipe-configmap.yaml", "{{ .Values.recipe | quote }}", '"name: evil"', "not the recipe tunectl resolved"),
        ("recipe-configmap.yaml", '{{ include "tunectl.namespace" . }}', "kube-system", "in namespace 'kube-system'"),
        ("stage-jobs.yaml", '(include "tunectl.stages" .)', '"train"', "not the run's stages"),
    ],
)
def test_objects_that_are_not_the_runs_are_refused(recipe, tmp_path, monkeypatch, template, old, new, says):
    """Defence in depth, against a chart (TUNECTL_CHART) that does not keep to what the run owns."""
    chart = shutil.copytree(chart_dir(), tmp_path / "chart")
    path = chart / "templates" / template
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    monkeypatch.setenv("TUNECTL_CHART", str(chart))
    line = refused(recipe)
    assert line.startswith(f"the chart at {chart} rendered ") and says in line


# -- item 3: every inserted scalar quoted or held to a pattern ----------------------------------------------------


def test_newline_in_image_tag_is_refused(tunectl, tmp_path):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"image": {"tag": f"0.1.0\n          {INJECTED}"}}))
    line = one_line(render_cli(tunectl, "--values", str(f)))
    assert line.startswith("error: chart values rejected: at '/image/tag'")
    line = one_line(render_cli(tunectl, "--helm-set", f"image.tag=0.1.0\n{INJECTED}"))
    assert "at '/image/tag'" in line


def test_secret_key_cannot_change_the_secret_reference(tunectl):
    line = one_line(
        render_cli(
            tunectl,
            "--helm-set",
            "s3.credentialsSecret=s3-creds",
            "--helm-set",
            "s3.accessKeyIdKey=AWS_ACCESS_KEY_ID\\, optional: true",
        )
    )
    assert line.startswith("error: chart values rejected: at '/s3/accessKeyIdKey'")


# Every string the user's values can hold, each set (in a values file, so nothing is parsed out of it).
EVERY_STRING: dict[str, Any] = {
    "image": {"registry": "registry.example.com/ml/", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "s3": {
        "endpoint": "http://minio:9000",
        "region": "eu-west-1",
        "credentialsSecret": "s3-creds",
        "accessKeyIdKey": "id",
        "secretAccessKeyKey": "secret",
    },
    "huggingFace": {"tokenSecret": "hf-token", "tokenKey": "token"},
    "kueue": {"queueName": "gpu-queue"},
    "scheduling": {
        "priorityClassName": "batch",
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]},
                    }
                ]
            }
        },
    },
    "podAnnotations": {"note": "hello"},
    "podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {"capabilities": {"drop": ["ALL"]}},
    "stages": {
        stage: {
            "image": f"tunectl-{stage}",
            "command": ["python", "-m", f"tunectl_jobs.{stage}"],
            "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}},
            "scratchSize": "10Gi",
            "shmSize": "1Gi",
            "priorityClassName": "stage-class",
            "nodeSelector": {"pool": stage},
        }
        for stage in ("train", "merge", "gguf")
    },
    "reconciler": {"image": "tunectl-controller", "resources": {"requests": {"cpu": "10m"}}},
}
PAYLOADS = [
    f"\n{INJECTED}",
    f"\n          {INJECTED}",
    "\n    optional: true",
    ", optional: true",
    "}, optional: true, x: {",
    "] , x: [",
    '" # ',
    "' : x",
    "{{ .Release.Name }}",
    " *alias &anchor !!binary |",
]


def each_string(value: Any, f) -> Any:
    if isinstance(value, dict):
        return {k: each_string(v, f) for k, v in value.items()}
    if isinstance(value, list):
        return [each_string(v, f) for v in value]
    return f(value) if isinstance(value, str) else value


def shape(value: Any, at: str = "") -> set[str]:
    """Every key path in a rendered object: what fields exist, not what they hold."""
    if isinstance(value, dict):
        return {at} | {p for k, v in value.items() for p in shape(v, f"{at}/{k}")}
    if isinstance(value, list):
        return {at} | {p for i, v in enumerate(value) for p in shape(v, f"{at}/{i}")}
    return {at}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_value_adds_a_field_even_without_the_schema(recipe, tmp_path, monkeypatch, payload):
    """Quoting alone holds: with values.schema.json removed, every string value carrying YAML renders as that
    string, and the objects have exactly the fields they have with plain values."""
    chart = shutil.copytree(chart_dir(), tmp_path / "chart")
    (chart / "values.schema.json").unlink()
    monkeypatch.setenv("TUNECTL_CHART", str(chart))
    plain, hostile = tmp_path / "plain.yaml", tmp_path / "hostile.yaml"
    plain.write_text(yaml.safe_dump(EVERY_STRING))
    hostile.write_text(yaml.safe_dump(each_string(EVERY_STRING, lambda s: s + payload)))
    expected = render(recipe, RUN, STORE, "ml", (plain,))
    docs = render(recipe, RUN, STORE, "ml", (hostile,))
    assert [shape(d) for d in docs] == [shape(d) for d in expected]
    for c in containers(docs):
        assert "envFrom" not in c
        assert c["image"].endswith(f":1.2.3{payload}")
        for env in c["env"]:
            if "secretKeyRef" in env.get("valueFrom", {}):
                assert set(env["valueFrom"]["secretKeyRef"]) == {"name", "key"}
                assert env["valueFrom"]["secretKeyRef"]["name"].endswith(payload)


# Values the chart checks itself before inserting them (the run id, stage names, the namespace), helpers whose
# output is quoted or validated, and what makes an insertion safe.
_VALIDATED = {"$run", "$name", "$stage", "$namespace", "$id"}
_SAFE_HELPERS = {
    '"tunectl.run"',
    '"tunectl.image"',
    '"tunectl.namespace"',
    '"tunectl.stageJob"',
    '"tunectl.rendezvous"',
}
_SAFE_FUNCTIONS = {"quote", "toYaml", "toJson", "int", "nindent"}
_CONTROL = ("/*", "define", "end", "if", "else", "with", "range", "fail")


def test_every_template_scalar_is_quoted_serialized_or_validated():
    """A look at the templates themselves, so a value added later cannot go in bare."""
    for path in sorted((chart_dir() / "templates").iterdir()):
        for expr in re.findall(r"{{-?\s*(.*?)\s*-?}}", path.read_text(), re.S):
            words = expr.split()
            if expr.startswith(_CONTROL) or (len(words) > 1 and words[1] in (":=", "=")):
                continue
            if words[0] in _VALIDATED or _SAFE_FUNCTIONS & set(words) or expr == 'join "," $stages':
                continue
            assert words[0] == "include" and words[1] in _SAFE_HELPERS, f"{path.name}: {{{{ {expr} }}}} is bare"


@pytest.mark.parametrize(
    ("helm_set", "at"),
    [
        ("image.registry=registry.example.com", "/image/registry"),  # no trailing '/': names would run together
        ("image.registry=registry.example.com/ml/\n", "/image/registry"),
        ("image.pullPolicy=Always\n", "/image/pullPolicy"),
        ("stages.train.image=Evil:latest", "/stages/train/image"),
        ("reconciler.image=x y", "/reconciler/image"),
        ("imagePullSecrets[0].name=regcred\nx", "/imagePullSecrets/0/name"),
        ("s3.endpoint=http://minio:9000\nx: 1", "/s3/endpoint"),
        ("s3.region=us-east-1\nx", "/s3/region"),
        ("s3.credentialsSecret=s3-creds\\, optional: true", "/s3/credentialsSecret"),
        ("huggingFace.tokenKey=HF_TOKEN}", "/huggingFace/tokenKey"),
        ("kueue.queueName=q\nx: 1", "/kueue/queueName"),
        ("kueue.queueName=" + "q" * 64, "/kueue/queueName"),
        ("scheduling.priorityClassName=high\n  x: 1", "/scheduling/priorityClassName"),
        ("stages.merge.priorityClassName=High", "/stages/merge/priorityClassName"),
        ("scheduling.nodeSelector.pool=gpu\nx", "/scheduling/nodeSelector/pool"),
        ("stages.gguf.nodeSelector.bad key=x", "/stages/gguf/nodeSelector"),
        ("podAnnotations.bad key=x", "/podAnnotations"),
        ("stages.train.scratchSize=1Gi\n  medium: Memory", "/stages/train/scratchSize"),
        ("stages.train.shmSize=1Gi}", "/stages/train/shmSize"),
        ("stages.train.command[0]=", "/stages/train/command/0"),
    ],
)
def test_careless_and_hostile_values_are_refused_by_the_schema(recipe, helm_set, at):
    line = refused(recipe, [helm_set])
    assert line.startswith("chart values rejected: ") and f"at '{at}" in line


def test_odd_commands_and_annotations_render_as_given(recipe, tmp_path):
    f = tmp_path / "v.yaml"
    command = ["sh", "-c", "echo $HOME; cat /etc/passwd\nenvFrom: []", "{{ .Values }}", "- x"]
    note = "a\n  b: c\n}"
    f.write_text(yaml.safe_dump({"stages": {"train": {"command": command}}, "podAnnotations": {"x.io/note": note}}))
    docs = render(recipe, RUN, STORE, "ml", (f,))
    train = next(d for d in docs if d["metadata"]["name"] == f"{RUN}-train")
    [c] = train["spec"]["template"]["spec"]["containers"]
    assert c["command"] == command and "envFrom" not in c
    assert train["spec"]["template"]["metadata"]["annotations"] == {"x.io/note": note}


@pytest.mark.parametrize("store", ["s3://tunectl-artifacts/p\nx: 1", "s3://x", "/srv/store"])
def test_a_hostile_or_careless_store_is_refused(tunectl, store):
    assert "store" in one_line(render_cli(tunectl, store=store))


def test_a_store_with_quotes_renders_as_given(recipe):
    store = 's3://tunectl-artifacts/p", x: "1'
    docs = render(recipe, RUN, store, "ml")
    stages = [c for c in containers(docs) if "--store" in c["args"]]
    assert len(stages) == 3 and all(c["args"][c["args"].index("--store") + 1] == store for c in stages)


# -- item 10: the namespace --------------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["Team_A", "ml\nx: 1", "a" * 64, "-ml", "ml.team", 'ml", x: "y', ""])
def test_a_bad_namespace_is_refused(tunectl, recipe, namespace):
    line = one_line(render_cli(tunectl, namespace=namespace))
    assert "must be a DNS-1123 label" in line and "pass --namespace NAME" in line
    with pytest.raises(ConfigError, match="must be a DNS-1123 label") as e:
        render_run(recipe, STORE, namespace, RUN)
    assert "\n" not in str(e.value)


def test_a_bad_namespace_is_refused_by_the_chart_on_its_own(tmp_path):
    proc = subprocess.run(
        [helm_binary(), "template", "my-run", str(chart_dir()), "--namespace", "Team_A"]
        + ["--set", f"run.store={STORE}", "--set", "recipe=x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and 'namespace "Team_A" must be a DNS-1123 label' in proc.stderr
