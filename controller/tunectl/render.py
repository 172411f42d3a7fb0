"""Render a run's Kubernetes objects from the Helm chart with `helm template` (no cluster needed).

tunectl fills only what belongs to the run (`run.*` and the resolved recipe); everything about the cluster
(images, S3 endpoint and Secret, resources, scheduling) comes from the chart's values and the user's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, TunectlError
from .local import stages_for
from .recipe import Recipe
from .refs import PACKAGE_PREFIX, resolve
from .runid import is_run_id, new_run_id

# "<run>-reconciler" must fit a 63-character object name.
MAX_RUN_ID = 52


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
    helm = os.environ.get("TUNECTL_HELM") or shutil.which("helm")
    if not helm:
        raise ConfigError("helm is not installed: install Helm 3 (https://helm.sh) or set TUNECTL_HELM to its path")
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
            f"run id '{run}' must be lower-case letters, digits and '-' (DNS-1123), at most {MAX_RUN_ID} characters"
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
            f"store {store}: Kubernetes runs hand artifacts over through S3; pass --store s3://BUCKET[/PREFIX]"
        )
    for f in values_files:
        if not f.is_file():
            raise ConfigError(f"values file {f} does not exist")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tunectl-run-") as tmp:
        yaml.safe_dump(run_values(recipe, run, store), tmp, allow_unicode=True)
        tmp.flush()
        # The run's own values go last: a user's values file cannot point a run at another run's id.
        cmd = [helm_binary(), "template", run, str(chart_dir()), "--namespace", namespace]
        for f in values_files:
            cmd += ["--values", str(f)]
        for s in sets:
            cmd += ["--set", s]
        cmd += ["--values", tmp.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Use --debug")]
        # Schema errors come as "- at '/path': problem" lines under a header; those lines are what to fix.
        specific = [ln[2:] for ln in lines if ln.startswith("- ")]
        detail = "; ".join(specific or [ln.removeprefix("Error: ") for ln in lines])
        raise ConfigError(f"chart values rejected: {detail[:600]}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    if not docs:
        raise TunectlError("helm template rendered nothing")
    return sorted(docs, key=creation_order)


_KIND_ORDER = {"ConfigMap": 0, "ServiceAccount": 1, "Role": 2, "RoleBinding": 3, "Job": 4}
# Followers and the reconciler first, the first stage last: an interrupted submit never leaves a training Job
# running without the stages that follow it.
_STAGE_ORDER = {"reconciler": 0, "gguf": 1, "merge": 2, "train": 3}


def creation_order(doc: dict[str, Any]) -> tuple[int, int]:
    component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
    return _KIND_ORDER.get(doc["kind"], 9), _STAGE_ORDER.get(component, 9)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the recipe in its ConfigMap) as literal blocks, so the output reads as YAML."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, explicit_start=True, width=120)
