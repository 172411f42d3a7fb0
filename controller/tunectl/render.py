"""Render a run's Kubernetes objects from the Helm chart with `helm template` (no cluster needed).

tunectl fills only what belongs to the run (`run.*` and the resolved recipe); everything about the cluster
(images, S3 endpoint and Secret, resources, scheduling) comes from the chart's values and the user's files.
The user's values may not touch what belongs to the run: they are refused if they try, tunectl passes the run's
values with helm's highest-precedence flag, and the rendered objects are checked to belong to the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .errors import ConfigError, EnvironmentProblem, TunectlError, executable
from .kubestatus import ANN_STORE, LABEL_COMPONENT, LABEL_RUN, LABEL_STAGE
from .recipe import Recipe
from .refs import PACKAGE_PREFIX, resolve
from .runid import is_run_id, new_run_id
from .runmodel import STAGES, stages_for

# "<run>-reconciler" must fit a 63-character object name.
MAX_RUN_ID = 52
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Top-level chart values that tunectl sets for the run; the user's values files and --helm-set may not.
RUN_OWNED = ("run", "recipe")


def chart_dir() -> Path:
    """charts/tunectl: inside an installed wheel (tunectl/chart), else in the source tree; TUNECTL_CHART overrides."""
    override = os.environ.get("TUNECTL_CHART")
    if override:
        return Path(override)
    packaged = Path(str(resources.files("tunectl"))) / "chart"
    if (packaged / "Chart.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "charts" / "tunectl"


def helm_binary() -> str:
    override = os.environ.get("TUNECTL_HELM")
    if override:
        return executable(override, "TUNECTL_HELM", "Helm 3")
    helm = shutil.which("helm")
    if not helm:
        raise EnvironmentProblem(
            "helm is not installed: install Helm 3 (https://helm.sh) or set TUNECTL_HELM to its path"
        )
    return helm


def check_portable(recipe: Recipe) -> None:
    """A cluster pod cannot read this machine's files: model and data must be Hub ids or package files."""
    for what, ref in (("model.name", recipe.model.name), ("data.source", recipe.data.source)):
        if ref.startswith(PACKAGE_PREFIX):
            continue
        if resolve(ref, what).is_local:
            raise ConfigError(
                f"{what} {ref} is a file on this machine, which the cluster cannot read: "
                "use a Hugging Face Hub id or a package: reference shipped in the image"
            )


def run_values(recipe: Recipe, run: str, store: str) -> dict[str, Any]:
    return {
        "run": {"id": run, "recipe": recipe.name, "store": store, "stages": stages_for(recipe)},
        "recipe": recipe.to_yaml(),
    }


def check_namespace(namespace: str) -> None:
    if not _DNS_LABEL.match(namespace):
        raise ConfigError(
            f"namespace {namespace!r} must be a DNS-1123 label (lower-case letters, digits and '-', starting and "
            "ending with a letter or digit, at most 63 characters): pass --namespace NAME"
        )


def render_run(
    recipe: Recipe,
    store: str | None,
    namespace: str,
    run: str | None = None,
    values_files: tuple[Path, ...] = (),
    sets: tuple[str, ...] = (),
) -> tuple[str, list[dict[str, Any]]]:
    """A new (or the given) run id and its objects; everything checkable without a cluster is checked here."""
    if not store:
        raise ConfigError("Kubernetes runs need an S3 store: pass --store s3://BUCKET[/PREFIX] or set TUNECTL_STORE")
    check_portable(recipe)
    run = run or new_run_id(recipe.name, max_len=MAX_RUN_ID)
    if len(run) > MAX_RUN_ID or not is_run_id(run):
        raise ConfigError(
            f"run id {run!r} must be lower-case letters, digits and '-' (DNS-1123), at most {MAX_RUN_ID} characters"
        )
    return run, render(recipe, run, store, namespace, values_files, sets)


def render(
    recipe: Recipe,
    run: str,
    store: str,
    namespace: str,
    values_files: tuple[Path, ...] = (),
    sets: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The run's objects, as `helm template` renders them, in the order they should be created."""
    if not store.startswith("s3://"):
        raise ConfigError(
            f"store {store!r}: Kubernetes runs hand artifacts over through S3; pass --store s3://BUCKET[/PREFIX]"
        )
    check_namespace(namespace)
    for f in values_files:
        if not f.is_file():
            raise ConfigError(f"values file {str(f)!r} does not exist")
    refuse_run_owned(values_files, sets)
    own = run_values(recipe, run, store)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tunectl-recipe-", encoding="utf-8") as tmp:
        tmp.write(own["recipe"])
        tmp.flush()
        out = _helm(template_args(own, namespace, Path(tmp.name), values_files, sets))
    docs = [d for d in yaml.safe_load_all(out) if d]
    if not docs:
        raise TunectlError("helm template rendered nothing")
    check_belongs_to_run(docs, own, namespace)
    check_train_processes(docs, recipe)
    return sorted(docs, key=creation_order)


def check_train_processes(docs: list[dict[str, Any]], recipe: Recipe) -> None:
    """A distributed train stage fits its pods: one GPU per process (a pod without GPUs runs gloo processes on its
    CPUs), and one pod per node."""
    t = recipe.training
    for doc in docs:
        if doc.get("kind") != "Job" or doc["metadata"].get("labels", {}).get(LABEL_STAGE) != "train":
            continue
        if int(doc["spec"].get("parallelism", 1)) != t.nnodes:
            raise ConfigError(
                f"the chart at {chart_dir()} rendered a train Job of {doc['spec'].get('parallelism', 1)} pods for "
                f"training.nnodes {t.nnodes}: use the chart of this tunectl version"
            )
        for c in doc["spec"]["template"]["spec"]["containers"]:
            gpus = int((c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
            if 0 < gpus < t.nproc_per_node:
                raise ConfigError(
                    f"training.nproc_per_node {t.nproc_per_node} needs as many GPUs in each train pod, which asks "
                    f"for {gpus}: pass --helm-set stages.train.gpus={t.nproc_per_node} or lower "
                    f"training.nproc_per_node"
                )


def template_args(
    own: dict[str, Any], namespace: str, recipe_file: Path, values_files: tuple[Path, ...], sets: tuple[str, ...]
) -> list[str]:
    """`helm template` arguments for the run's values `own` (run_values), its recipe in `recipe_file`, and the
    user's values files and --helm-set."""
    run = own["run"]["id"]
    args = ["template", run, str(chart_dir()), "--namespace", namespace, *_user_flags(values_files, sets)]
    # Helm applies -f files, then --set, --set-string, --set-file and --set-literal, later winning: the run's values
    # come last, so no user value can replace them. --set-literal takes a value as it is (no commas, braces or
    # escapes), so run.stages goes as a comma-joined string; the recipe goes as a file, as it may outgrow the
    # length of one command-line argument (--set-file beats everything a user can pass through tunectl).
    for key, value in own["run"].items():
        args += ["--set-literal", f"run.{key}={','.join(value) if key == 'stages' else value}"]
    return args + ["--set-file", "recipe=" + str(recipe_file).replace("\\", "\\\\").replace(",", "\\,")]


def _user_flags(values_files: tuple[Path, ...], sets: tuple[str, ...]) -> list[str]:
    # helm splits --values at commas (CSV) and reads "-" or "scheme:..." as stdin or a URL: an absolute path, quoted.
    files = ['--values="' + str(f.resolve()).replace('"', '""') + '"' for f in values_files]
    return files + [f"--set={s}" for s in sets]


def _helm(args: list[str]) -> str:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Use --debug")]
        # Schema errors come as "- at '/path': problem" lines under a header; those lines are what to fix.
        specific = [ln[2:] for ln in lines if ln.startswith("- ")]
        detail = "; ".join(specific or [ln.removeprefix("Error: ") for ln in lines])
        raise ConfigError(f"chart values rejected: {detail[:600]}")
    return proc.stdout


def user_values(values_files: tuple[Path, ...], sets: tuple[str, ...]) -> dict[str, Any]:
    """The values the user's files and --helm-set give, as helm itself reads them: --set has escapes, lists, indexes
    and several keys per flag, and a parser of our own could disagree with helm about which keys are set."""
    with tempfile.TemporaryDirectory(prefix="tunectl-values-") as d:
        chart = Path(d)
        (chart / "templates").mkdir()
        (chart / "Chart.yaml").write_text("apiVersion: v2\nname: values\nversion: 0.0.0\n")
        # A chart without defaults renders exactly the values it was given, as one line of JSON.
        (chart / "templates" / "values.json").write_text("{{ toJson .Values }}\n")
        out = _helm(["template", "values", str(chart), *_user_flags(values_files, sets)])
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))


def _owned_key(values: dict[str, Any]) -> str | None:
    for key in RUN_OWNED:
        if key in values:
            sub = values[key]
            return f"{key}.{next(iter(sub))}" if isinstance(sub, dict) and sub else key
    return None


def refuse_run_owned(values_files: tuple[Path, ...], sets: tuple[str, ...]) -> None:
    """One line naming the file or --helm-set that sets a value the run owns."""
    if not (values_files or sets) or _owned_key(user_values(values_files, sets)) is None:
        return
    sources: list[tuple[str, tuple[Path, ...], tuple[str, ...]]]
    sources = [(f"values file {str(f)!r}", (f,), ()) for f in values_files]
    sources += [(f"--helm-set {s!r}", (), (s,)) for s in sets]
    for what, files, one_set in sources:
        key = _owned_key(user_values(files, one_set))
        if key is not None:
            raise ConfigError(
                f"{what} sets {key}, which belongs to the run and only tunectl sets: remove it (use --run for the "
                "run id, --store for the store, --set KEY=VALUE for recipe fields)"
            )


def check_belongs_to_run(docs: list[dict[str, Any]], own: dict[str, Any], namespace: str) -> None:
    """Defence in depth: every object is named and labelled for this run, and carries its store and recipe."""
    run, store, stages = own["run"]["id"], own["run"]["store"], own["run"]["stages"]

    def refuse(what: str) -> NoReturn:
        raise ConfigError(f"the chart at {chart_dir()} rendered {what}: it must render only run {run}'s objects")

    for doc in docs:
        meta = doc.get("metadata") or {}
        name, labels = str(meta.get("name", "")), meta.get("labels") or {}
        if not name.startswith(f"{run}-") or labels.get(LABEL_RUN) != run:
            refuse(f"{doc.get('kind')} {name!r}, which is not named and labelled for the run")
        if meta.get("namespace") != namespace:
            refuse(f"{doc.get('kind')} {name!r} in namespace {meta.get('namespace')!r}, not {namespace!r}")
    configmaps = [d for d in docs if d.get("kind") == "ConfigMap"]
    if [d["metadata"]["name"] for d in configmaps] != [f"{run}-recipe"]:
        refuse(f"ConfigMaps {[d['metadata']['name'] for d in configmaps]}, not just {run}-recipe")
    [cm] = configmaps
    if cm.get("data") != {"recipe.yaml": own["recipe"]}:
        refuse("a recipe ConfigMap whose data is not the recipe tunectl resolved")
    if (cm["metadata"].get("annotations") or {}).get(ANN_STORE) != store:
        refuse(f"a recipe ConfigMap whose store is not {store}")
    jobs = [d["metadata"]["labels"].get(LABEL_STAGE) for d in docs if d.get("kind") == "Job"]
    if sorted(j for j in jobs if j) != sorted(stages):
        refuse(f"stage Jobs {[j for j in jobs if j]}, not the run's stages {stages}")


_KIND_ORDER = {"ConfigMap": 0, "ServiceAccount": 1, "Role": 2, "RoleBinding": 3, "Service": 4, "Job": 5}
# Followers and the reconciler first, the first stage last: an interrupted submit never leaves a training Job
# running without the stages that follow it.
_STAGE_ORDER = {"reconciler": 0, **{stage: i for i, stage in enumerate(reversed(STAGES), start=1)}}


def creation_order(doc: dict[str, Any]) -> tuple[int, int]:
    component = doc["metadata"].get("labels", {}).get(LABEL_COMPONENT, "")
    return _KIND_ORDER.get(doc["kind"], 9), _STAGE_ORDER.get(component, 9)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the recipe in its ConfigMap) as literal blocks, so the output reads as YAML."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, explicit_start=True, width=120)
