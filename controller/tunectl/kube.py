"""The Kubernetes backend: a run is a set of objects rendered from the chart and created with the official
client. The cluster is the record: the run's ConfigMap (`<run>-recipe`) says what was submitted, its Jobs and
pods say where each stage is. Artifacts live in the S3 store and outlive every object here.
"""

from __future__ import annotations

import codecs
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError, TunectlError
from .kubestatus import (
    ANN_STAGES,
    ANN_STORE,
    LABEL_RUN,
    LABEL_STAGE,
    error_line,
    run_state,
    seconds,
    stage_status,
)
from .recipe import Recipe
from .render import check_namespace, render_run

COMPONENT = "app.kubernetes.io/component"
MANAGED = "app.kubernetes.io/managed-by=tunectl"


def kubeconfig_present() -> bool:
    """Whether a cluster is configured here: KUBECONFIG, ~/.kube/config, or running inside a pod."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return any(Path(p).expanduser().is_file() for p in env.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config").is_file() or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class Cluster:
    """An API client, the namespace to use, and the typed APIs the backend needs."""

    def __init__(self, context: str | None = None, namespace: str | None = None):
        from kubernetes import client, config

        # One line here, not the API server's 404 or 422 later (a kubeconfig's own namespace is checked below).
        check_namespace(namespace or "default")
        cfg = client.Configuration()
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not (
                os.environ.get("KUBECONFIG") or (Path.home() / ".kube" / "config").is_file()
            ):
                config.load_incluster_config(client_configuration=cfg)
                ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                default_ns = ns_file.read_text().strip() if ns_file.is_file() else "default"
                self.context = "in-cluster"
            else:
                # Read KUBECONFIG now: the client's default is fixed when it is first imported.
                path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
                if not any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p):
                    raise ConfigError(f"no kubeconfig at {path}: set KUBECONFIG to your cluster's config file")
                config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
                contexts, active = config.list_kube_config_contexts(config_file=path)
                if context:
                    active = next(c for c in contexts if c["name"] == context)
                default_ns = active["context"].get("namespace") or "default"
                self.context = active["name"]
        except (config.ConfigException, StopIteration, OSError) as e:
            what = f"context '{context}'" if context else "a kubeconfig"
            raise ConfigError(f"cannot load {what}: {e} (set KUBECONFIG or pass --context)") from None
        self.api = client.ApiClient(cfg)
        self.host = cfg.host
        self.namespace = namespace or default_ns
        check_namespace(self.namespace)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)

    def to_dict(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    def explain(self, e: Exception, doing: str) -> TunectlError:
        """One line for an API failure."""
        from kubernetes.client.exceptions import ApiException

        if isinstance(e, ApiException):
            import json

            try:
                message = json.loads(e.body or "{}").get("message") or e.reason
            except ValueError:
                message = e.reason
            if e.status == 403:
                return TunectlError(f"{doing}: forbidden by the cluster's RBAC: {message}")
            if e.status == 401:
                return TunectlError(f"{doing}: the cluster rejected the credentials of context {self.context}")
            return TunectlError(f"{doing}: {message} (HTTP {e.status})")
        return TunectlError(f"{doing}: cannot reach the Kubernetes API at {self.host} ({type(e).__name__})")

    # -- generic create/delete for the kinds the chart renders
    def _ops(self, kind: str) -> tuple[Any, str]:
        table = {
            "ConfigMap": (self.core, "config_map"),
            "ServiceAccount": (self.core, "service_account"),
            "Role": (self.rbac, "role"),
            "RoleBinding": (self.rbac, "role_binding"),
            "Job": (self.batch, "job"),
        }
        if kind not in table:
            raise TunectlError(f"the chart rendered a {kind}, which tunectl does not know how to create")
        return table[kind]

    def create(self, doc: dict[str, Any], dry_run: bool = False) -> bool:
        """Create one object; False if it already exists. `dry_run` asks the server to validate strictly."""
        from kubernetes.client.exceptions import ApiException

        api, suffix = self._ops(doc["kind"])
        extra = {"dry_run": "All"} if dry_run else {}
        try:
            getattr(api, f"create_namespaced_{suffix}")(
                doc["metadata"].get("namespace", self.namespace), doc, field_validation="Strict", **extra
            )
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        api, suffix = self._ops(kind)
        try:
            return self.to_dict(getattr(api, f"read_namespaced_{suffix}")(name, self.namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise


class KubernetesBackend:
    def __init__(self, cluster: Cluster, store_uri: str | None = None):
        self.cluster = cluster
        self.store_uri = store_uri

    @property
    def namespace(self) -> str:
        return self.cluster.namespace

    def _call(self, doing: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except (ApiException, HTTPError, OSError) as e:
            raise self.cluster.explain(e, doing) from None

    # -- submit
    def render(
        self, recipe: Recipe, run: str | None = None, values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()
    ) -> tuple[str, list[dict[str, Any]]]:
        return render_run(recipe, self.store_uri, self.namespace, run, values, sets)

    def submit(self, run: str, docs: list[dict[str, Any]], echo: Callable[[str], None]) -> bool:
        """Create the run's objects; safe to repeat (existing objects are kept). False if it all existed."""
        existing = self._call(f"submitting {run}", lambda: self.cluster.read("ConfigMap", f"{run}-recipe"))
        wanted = next(d for d in docs if d["kind"] == "ConfigMap")
        if existing is not None and existing.get("data") != wanted.get("data"):
            raise ConfigError(
                f"run {run} already exists in namespace {self.namespace} with a different recipe: choose another --run"
            )
        created = 0
        for doc in docs:
            what = f"creating {doc['kind']} {doc['metadata']['name']} in namespace {self.namespace}"
            if self._call(what, lambda d=doc: self.cluster.create(d)):
                created += 1
        if created and created < len(docs):
            echo(f"run {run}: created the {created} missing of {len(docs)} objects")
        return created > 0

    # -- inspect
    def run_record(self, run: str) -> dict[str, Any]:
        """The run's ConfigMap (what was submitted); the same name as LocalBackend's lookup."""
        cm = self._call(f"reading run {run}", lambda: self.cluster.read("ConfigMap", f"{run}-recipe"))
        if cm is None:
            raise TunectlError(f"no run '{run}' in namespace {self.namespace} (context {self.cluster.context})")
        return cm

    def _objects(self, selector: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        jobs = self._call(
            "listing Jobs", lambda: self.cluster.batch.list_namespaced_job(self.namespace, label_selector=selector)
        )
        pods = self._call(
            "listing pods", lambda: self.cluster.core.list_namespaced_pod(self.namespace, label_selector=selector)
        )
        return [self.cluster.to_dict(j) for j in jobs.items], [self.cluster.to_dict(p) for p in pods.items]

    def status(self, run: str) -> dict[str, Any]:
        cm = self.run_record(run)
        jobs, pods = self._objects(f"{LABEL_RUN}={run}")
        return self._status(cm, jobs, pods, with_errors=True)

    def _status(
        self, cm: dict[str, Any], jobs: list[dict[str, Any]], pods: list[dict[str, Any]], with_errors: bool
    ) -> dict[str, Any]:
        run = cm["metadata"]["labels"][LABEL_RUN]
        ann = cm["metadata"].get("annotations") or {}
        stages = _stages(cm)
        by_stage = {j["metadata"]["labels"].get(LABEL_STAGE): j for j in jobs}
        now = datetime.now(timezone.utc)
        rows = []
        for stage in stages:
            owned = [p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == stage]
            row = stage_status(stage, by_stage.get(stage), owned)
            secs = seconds(row, now)
            if secs is not None:
                row["seconds"] = secs
            if with_errors and row["state"] == "failed":
                error = error_line(owned) or self._error_line(owned)
                if error:
                    row["error"] = error
            rows.append(row)
        reconciler = by_stage.get(None)
        return {
            "run": run,
            "recipe": cm["metadata"]["labels"].get("tunectl.dev/recipe", ""),
            "backend": "kubernetes",
            "namespace": self.namespace,
            "context": self.cluster.context,
            "created": cm["metadata"]["creationTimestamp"],
            "store": ann.get(ANN_STORE, ""),
            "path": f"{ann.get(ANN_STORE, '')}/runs/{run}",
            "state": run_state(rows),
            "stages": rows,
            "reconciler": stage_status("reconciler", reconciler, [])["state"] if reconciler else "none",
        }

    def _log_text(self, pod: str, tail_lines: int | None = None) -> str:
        # The raw body: the client's own decoding turns some logs into "b'...'" text or parses them as JSON.
        kw = {"tail_lines": tail_lines} if tail_lines else {}
        resp = self.cluster.core.read_namespaced_pod_log(pod, self.namespace, _preload_content=False, **kw)
        return resp.data.decode("utf-8", "replace")

    def _error_line(self, pods: list[dict[str, Any]]) -> str | None:
        """The `error: ...` line a stage program prints before a non-zero exit, from its newest failed pod."""
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        for pod in sorted(failed, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)[:1]:
            try:
                text = self._log_text(pod["metadata"]["name"], tail_lines=50)
            except Exception:  # noqa: BLE001 - logs are a courtesy here; the node may be gone
                return None
            for line in reversed(text.splitlines()):
                if line.startswith("error: "):
                    return line[len("error: ") :]
        return None

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run in the namespace, oldest first, from three list requests however many runs there are."""
        sel = f"{MANAGED},{COMPONENT}=recipe"
        cms = self._call(
            "listing runs", lambda: self.cluster.core.list_namespaced_config_map(self.namespace, label_selector=sel)
        )
        jobs, pods = self._objects(MANAGED)
        by_run: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = defaultdict(lambda: ([], []))
        for i, objs in enumerate((jobs, pods)):
            for obj in objs:
                by_run[obj["metadata"]["labels"].get(LABEL_RUN, "")][i].append(obj)
        cms = sorted((self.cluster.to_dict(c) for c in cms.items), key=lambda c: c["metadata"]["creationTimestamp"])
        return [self._status(cm, *by_run[cm["metadata"]["labels"][LABEL_RUN]], False) for cm in cms]

    def logs(self, run: str, stage: str | None, follow: bool) -> Iterator[tuple[str, str]]:
        """(stage, text) chunks from each stage's newest pod; with `follow`, stream one stage until it ends."""
        stages = _stages(self.run_record(run))  # the record is enough: no status (and its log reads) here
        if stage is not None and stage not in stages:
            raise TunectlError(f"run {run} has no stage '{stage}' (stages: {', '.join(stages)})")
        if follow and stage is None:
            raise ConfigError("--follow needs --stage (one stream at a time)")
        _, pods = self._objects(f"{LABEL_RUN}={run}")
        for s in [stage] if stage else stages:
            owned = [p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == s]
            if not owned:
                continue
            pod = max(owned, key=lambda p: p["metadata"]["creationTimestamp"])
            name = pod["metadata"]["name"]
            if follow:
                yield from ((s, text) for text in self._follow(name))
            else:
                yield s, self._call(f"reading logs of {name}", lambda n=name: self._log_text(n))

    def _follow(self, pod: str, grace: float = 2.0) -> Iterator[str]:
        """Stream a pod's log until the pod is finished. A kubelet ends the stream when the container exits;
        this also ends it `grace` seconds after the pod turns terminal, in case the node never does."""
        import queue
        import threading
        import time

        resp = self._call(
            f"reading logs of {pod}",
            lambda: self.cluster.core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False),
        )
        chunks: queue.Queue[bytes | None] = queue.Queue()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may straddle two chunks

        def read() -> None:
            try:
                for chunk in resp.stream(4096):
                    chunks.put(chunk)
            except Exception:  # noqa: BLE001 - closed below, or the connection dropped: either way, the end
                pass
            chunks.put(None)

        threading.Thread(target=read, daemon=True).start()
        ended_at = None
        while True:
            try:
                chunk = chunks.get(timeout=1.0)
            except queue.Empty:
                if ended_at is None:
                    phase = self._call(
                        "reading the pod", lambda: self.cluster.core.read_namespaced_pod(pod, self.namespace)
                    )
                    if phase.status.phase in ("Succeeded", "Failed"):
                        ended_at = time.monotonic()
                elif time.monotonic() - ended_at > grace:
                    resp.shutdown()  # unblocks the reader (close() would wait for its read to return)
                    return
                continue
            if chunk is None:
                return
            yield decoder.decode(chunk)

    def cancel(self, run: str, timeout: float = 60.0) -> dict[str, int]:
        """Delete the run's Jobs and pods (and its ConfigMap and RBAC); artifacts in the store are kept."""
        import time

        from kubernetes.client import V1DeleteOptions

        self.run_record(run)
        sel = f"{LABEL_RUN}={run}"
        c = self.cluster
        opts = V1DeleteOptions(propagation_policy="Background")
        counts = {}
        for kind, lister, deleter in (
            ("jobs", c.batch.list_namespaced_job, c.batch.delete_namespaced_job),
            ("pods", c.core.list_namespaced_pod, c.core.delete_namespaced_pod),
            ("roles", c.rbac.list_namespaced_role, c.rbac.delete_namespaced_role),
            ("rolebindings", c.rbac.list_namespaced_role_binding, c.rbac.delete_namespaced_role_binding),
            ("serviceaccounts", c.core.list_namespaced_service_account, c.core.delete_namespaced_service_account),
            ("configmaps", c.core.list_namespaced_config_map, c.core.delete_namespaced_config_map),
        ):
            items = self._call(f"listing {kind}", lambda f=lister: f(self.namespace, label_selector=sel)).items
            for item in items:
                self._call(f"deleting {kind} {item.metadata.name}", lambda f=deleter, i=item: _delete(f, i, opts, self))
            counts[kind] = len(items)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self._objects(sel)
            if not left[0] and not left[1]:
                return counts
            time.sleep(0.5)
        raise TunectlError(f"run {run}: Jobs or pods still present {timeout:.0f}s after deletion")

    def wait(self, run: str, poll_seconds: float, echo: Callable[[str], None]) -> dict[str, str]:
        """`submit --wait`: the reconciler's own logic, from this machine, printing each transition."""
        from .reconcile import Reconciler

        r = Reconciler(self.cluster.batch, self.namespace, run, poll_seconds=poll_seconds, echo=echo)
        return self._call(f"following run {run}", r.run_until_done)


def _stages(cm: dict[str, Any]) -> list[str]:
    """The run's stages in order, as its ConfigMap records them."""
    return [s for s in ((cm["metadata"].get("annotations") or {}).get(ANN_STAGES, "")).split(",") if s]


def _delete(fn: Callable[..., Any], item: Any, opts: Any, be: KubernetesBackend) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        fn(item.metadata.name, be.namespace, body=opts)
    except ApiException as e:
        if e.status != 404:
            raise


def echo_stderr(msg: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)
