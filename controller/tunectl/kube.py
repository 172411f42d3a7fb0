"""The Kubernetes backend: a run is a set of objects rendered from the chart and created with the official
client. The cluster is the record: the run's ConfigMap (`<run>-recipe`) says what was submitted, its Jobs and
pods say where each stage is. Artifacts live in the S3 store and outlive every object here.

Every API request goes through `api_call`: a request timeout (TUNECTL_KUBE_TIMEOUT seconds, default 10) on each,
retries with backoff on 429/500/503/504 and broken connections, and `Cluster.create` takes a 409 as "already
there", so every create is safe to repeat.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .backend import KUBERNETES, Backend, Echo, Submission, SubmitRequest
from .errors import ConfigError, TunectlError
from .kubestatus import (
    ANN_STAGES,
    ANN_STORE,
    JOB_INDEX_LABEL,
    LABEL_COMPONENT,
    LABEL_RECIPE,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGED,
    stage_status,
    termination_error,
)
from .recipe import Recipe
from .render import check_namespace, render_run
from .runmodel import (
    RunStatus,
    StageState,
    StageStatus,
    duration,
    error_line,
    manifest_phases,
    run_state,
    stages_for,
)

TIMEOUT_ENV = "TUNECTL_KUBE_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
RETRY_STATUSES = frozenset({429, 500, 503, 504})
RETRIES = 3  # after the first attempt
BACKOFF_S = 0.5  # before the first retry; doubled for each next one
MAX_RETRY_AFTER_S = 10.0  # the most a 429's Retry-After is honoured


def kubeconfig_present() -> bool:
    """Whether a cluster is configured here: KUBECONFIG, ~/.kube/config, or running inside a pod."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return any(Path(p).expanduser().is_file() for p in env.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config").is_file() or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def request_timeout() -> float:
    """Seconds one API request may take (connect and each read): TUNECTL_KUBE_TIMEOUT, default 10."""
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds above 0 (and below 3600)")
    return value


def api_call(
    fn: Callable[..., Any],
    *args: Any,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> Any:
    """`fn(*args, **kwargs)`, one Kubernetes API request, with a request timeout (unless `_request_timeout` is
    given) and up to `retries` retries, `backoff` seconds doubling, when the API server is throttling or
    unavailable (429, 500, 503, 504; a 429's Retry-After is honoured) or the connection was refused, reset or
    broken. A timeout is not retried: the timeout is the bound the user set. Anything else is raised at once."""
    kwargs.setdefault("_request_timeout", request_timeout())
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            delay = retry_delay(e, backoff * 2**attempt)
            if delay is None or attempt == retries:
                raise
            sleep(delay)
        attempt += 1


def retry_delay(e: BaseException, backoff: float) -> float | None:
    """How long to wait before retrying after `e`; None if `e` is not worth a retry."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        if e.status not in RETRY_STATUSES:
            return None
        after = (e.headers or {}).get("Retry-After") if e.status == 429 else None
        try:
            return min(float(after), MAX_RETRY_AFTER_S) if after else backoff
        except ValueError:
            return backoff
    return backoff if _network_problem(e) == "broken" else None


def _network_problem(e: BaseException) -> str | None:
    """ "timeout", "broken" (refused, reset, cut: worth a retry), "other" for another network failure, or None
    when `e` is not one."""
    from urllib3.exceptions import (
        MaxRetryError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        SSLError,
    )
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    if isinstance(e, MaxRetryError) and e.reason is not None:
        return _network_problem(e.reason)
    if isinstance(e, NameResolutionError):
        return "other"
    if isinstance(e, (NewConnectionError, ProtocolError, ConnectionError)):
        return "broken"
    if isinstance(e, SSLError):
        # Cut in the middle of a TLS record: the connection broke. A certificate that fails is not a retry.
        return "broken" if "EOF" in str(e) or "eof" in str(e) else "other"
    if isinstance(e, (Urllib3Timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, OSError):
        return "other"
    return None


class Unreachable(TunectlError):
    """The API server could not be asked; `why` says so without what was being done."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


class Cluster:
    """The one place the API client is built: in-cluster configuration, else the kubeconfig (and context);
    the namespace to use; the typed APIs the backend needs; one line for every failure."""

    def __init__(self, context: str | None = None, namespace: str | None = None):
        from kubernetes import client, config

        # One line here, not the API server's 404 or 422 later (a kubeconfig's own namespace is checked below).
        check_namespace(namespace or "default")
        self.timeout = request_timeout()
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
        cfg.retries = False  # urllib3's own retries off: api_call retries, within its timeout
        self.api = client.ApiClient(cfg)
        self.host = cfg.host
        self.namespace = namespace or default_ns
        check_namespace(self.namespace)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)

    def where(self) -> str:
        return f"namespace {self.namespace} (context {self.context})"

    def to_dict(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    def call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """api_call, with any failure as one line (TunectlError) that says what was being done."""
        with self.failures(doing):
            return api_call(fn, *args, **kwargs)

    @contextlib.contextmanager
    def failures(self, doing: str, ok: tuple[int, ...] = ()) -> Iterator[None]:
        """API and network failures inside as one line (TunectlError) saying what was being done; an
        ApiException whose status is in `ok` passes through for the caller to handle."""
        from kubernetes.client.exceptions import ApiException

        try:
            yield
        except ApiException as e:
            if e.status in ok:
                raise
            raise self.explain(e, doing) from None
        except Exception as e:
            if _network_problem(e) is None:
                raise
            raise self.explain(e, doing) from None

    def explain(self, e: Exception, doing: str) -> TunectlError:
        """One line for an API failure."""
        from kubernetes.client.exceptions import ApiException

        if isinstance(e, ApiException):
            try:
                message = json.loads(e.body or "{}").get("message") or e.reason
            except ValueError:
                message = e.reason
            if e.status == 403:
                return TunectlError(f"{doing}: forbidden by the cluster's RBAC: {message}")
            if e.status == 401:
                return TunectlError(f"{doing}: the cluster rejected the credentials of context {self.context}")
            return TunectlError(f"{doing}: {message} (HTTP {e.status})")
        return Unreachable(f"{doing}: {self.unreachable(e)}", self.unreachable(e))

    def unreachable(self, e: BaseException) -> str:
        """What went wrong reaching the API server, and what to check."""
        problem = _network_problem(e)
        if problem == "timeout":
            why = f"did not answer within {self.timeout:g}s ({TIMEOUT_ENV})"
        elif problem == "broken":
            why = "refused or dropped the connection"
        else:
            detail = (str(e).splitlines() or [""])[0][:200]
            why = f"cannot be reached ({type(e).__name__}: {detail})"
        return f"the Kubernetes API at {self.host} {why}: is the cluster up? (context {self.context}; KUBECONFIG)"

    # -- generic create/read for the kinds the chart renders
    def _ops(self, kind: str) -> tuple[Any, str]:
        table = {
            "ConfigMap": (self.core, "config_map"),
            "ServiceAccount": (self.core, "service_account"),
            "Service": (self.core, "service"),
            "Role": (self.rbac, "role"),
            "RoleBinding": (self.rbac, "role_binding"),
            "Job": (self.batch, "job"),
        }
        if kind not in table:
            raise TunectlError(f"the chart rendered a {kind}, which tunectl does not know how to create")
        return table[kind]

    def create(self, doc: dict[str, Any], dry_run: bool = False) -> bool:
        """Create one object; False if it already exists (a 409, also when an earlier attempt of this very call
        created it before its answer was lost). `dry_run` asks the server to validate strictly."""
        from kubernetes.client.exceptions import ApiException

        api, suffix = self._ops(doc["kind"])
        extra: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        what = f"creating {doc['kind']} {doc['metadata']['name']} in namespace {self.namespace}"
        try:
            with self.failures(what, ok=(409,)):
                api_call(
                    getattr(api, f"create_namespaced_{suffix}"),
                    doc["metadata"].get("namespace", self.namespace),
                    doc,
                    field_validation="Strict",
                    **extra,
                )
            return True
        except ApiException:  # 409 Conflict: it is there
            return False

    def read(self, kind: str, name: str, doing: str | None = None) -> dict[str, Any] | None:
        """The object, or None where there is none."""
        from kubernetes.client.exceptions import ApiException

        api, suffix = self._ops(kind)
        try:
            with self.failures(doing or f"reading {kind} {name} in namespace {self.namespace}", ok=(404,)):
                return self.to_dict(api_call(getattr(api, f"read_namespaced_{suffix}"), name, self.namespace))
        except ApiException:  # 404: there is none
            return None


class KubernetesBackend(Backend):
    name = KUBERNETES
    runs_here = False

    def __init__(self, cluster: Cluster, store_uri: str | None = None):
        self.cluster = cluster
        self.store_uri = store_uri

    @property
    def namespace(self) -> str:
        return self.cluster.namespace

    def describe(self) -> str:
        return self.cluster.where()

    # -- submit
    def render(
        self, recipe: Recipe, run: str | None = None, values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()
    ) -> tuple[str, list[dict[str, Any]]]:
        return render_run(recipe, self.store_uri, self.namespace, run, values, sets)

    def submit(self, request: SubmitRequest, echo: Echo) -> Submission:
        run, docs = self.render(request.recipe, request.run_id, request.values, request.helm_sets)
        created = self.create_objects(run, docs, echo)
        return Submission(run, stages_for(request.recipe), created)

    def create_objects(self, run: str, docs: list[dict[str, Any]], echo: Echo | None = None) -> bool:
        """Create the run's objects; safe to repeat (existing objects are kept). False if it all existed."""
        existing = self.cluster.read("ConfigMap", f"{run}-recipe")
        wanted = next(d for d in docs if d["kind"] == "ConfigMap")
        if existing is not None and existing.get("data") != wanted.get("data"):
            raise ConfigError(
                f"run {run} already exists in namespace {self.namespace} with a different recipe: choose another --run"
            )
        created = sum(self.cluster.create(doc) for doc in docs)
        if created and created < len(docs) and echo is not None:
            echo(f"run {run}: created the {created} missing of {len(docs)} objects\n")
        return created > 0

    def wait(self, run: str, echo: Echo | None, poll_seconds: float) -> RunStatus:
        """`submit --wait`: the reconciler's own logic, from this machine, printing each transition."""
        from .reconcile import Reconciler

        self.run_record(run)
        r = Reconciler(
            self.cluster.batch,
            self.namespace,
            run,
            poll_seconds=poll_seconds,
            echo=timestamped(echo) if echo else None,
            call=api_call,
        )
        with self.cluster.failures(f"following run {run}"):
            r.run_until_done()
        return self.status(run)

    # -- inspect
    def has(self, run: str) -> bool:
        return self._record(run) is not None

    def run_record(self, run: str) -> dict[str, Any]:
        """The run's ConfigMap (what was submitted)."""
        cm = self._record(run)
        if cm is None:
            raise TunectlError(f"no run '{run}' in {self.describe()}")
        return cm

    def _record(self, run: str) -> dict[str, Any] | None:
        return self.cluster.read("ConfigMap", f"{run}-recipe", f"looking for run {run} in {self.describe()}")

    def _objects(self, selector: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        c = self.cluster
        jobs = c.call("listing Jobs", c.batch.list_namespaced_job, self.namespace, label_selector=selector)
        pods = c.call("listing pods", c.core.list_namespaced_pod, self.namespace, label_selector=selector)
        return [c.to_dict(j) for j in jobs.items], [c.to_dict(p) for p in pods.items]

    @staticmethod
    def _newest_checkpoint(store: str, run: str) -> dict[str, Any] | None:
        """Read from here, with this machine's credentials: a status without it where the store cannot be read."""
        from . import checkpoints
        from .stores import open_store

        try:
            return checkpoints.newest(open_store(store), run)
        except (TunectlError, OSError):
            return None

    @staticmethod
    def _add_manifest(row: StageStatus, store: str, run: str) -> None:
        """A finished stage's metrics and notes from its manifest, as the local backend shows them; nothing where
        the store cannot be read from here."""
        from .stores import open_store

        try:
            manifest = open_store(store).manifest(run, row.stage)
        except (TunectlError, OSError):
            return
        if manifest:
            row.metrics = manifest.get("metrics", {})
            row.notes = manifest.get("notes", [])
            row.files = len(manifest["files"])
            row.phases = manifest_phases(manifest)

    def status(self, run: str) -> RunStatus:
        cm = self.run_record(run)
        jobs, pods = self._objects(f"{LABEL_RUN}={run}")
        return self._status(cm, jobs, pods, with_errors=True)

    def _status(
        self, cm: dict[str, Any], jobs: list[dict[str, Any]], pods: list[dict[str, Any]], with_errors: bool
    ) -> RunStatus:
        run = cm["metadata"]["labels"][LABEL_RUN]
        store = (cm["metadata"].get("annotations") or {}).get(ANN_STORE, "")
        by_stage = {j["metadata"]["labels"].get(LABEL_STAGE): j for j in jobs}
        now = datetime.now(UTC)
        rows: list[StageStatus] = []
        for stage in _stages(cm):
            owned = [p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == stage]
            row = stage_status(stage, by_stage.get(stage), owned)
            row.seconds = duration(row.started, row.finished, now)
            if with_errors and row.state == StageState.FAILED:
                row.error = termination_error(owned) or self._error_line(owned)
            if with_errors and stage == "train" and row.state != StageState.SUCCEEDED and store:
                row.checkpoint = self._newest_checkpoint(store, run)
            if with_errors and row.state == StageState.SUCCEEDED and store:
                self._add_manifest(row, store, run)
            rows.append(row)
        reconciler = by_stage.get(None)
        return RunStatus(
            run=run,
            recipe=cm["metadata"]["labels"].get(LABEL_RECIPE, ""),
            backend=KUBERNETES,
            state=run_state(r.state for r in rows),
            created=cm["metadata"]["creationTimestamp"],
            stages=rows,
            path=f"{store}/runs/{run}",
            store=store,
            namespace=self.namespace,
            context=self.cluster.context,
            reconciler=str(stage_status("reconciler", reconciler, []).state) if reconciler else "none",
        )

    def _log_text(self, pod: str, tail_lines: int | None = None) -> str:
        # The raw body: the client's own decoding turns some logs into "b'...'" text or parses them as JSON.
        kw = {"tail_lines": tail_lines} if tail_lines else {}
        c = self.cluster
        resp = c.call(
            f"reading logs of {pod}", c.core.read_namespaced_pod_log, pod, self.namespace, _preload_content=False, **kw
        )
        return resp.data.decode("utf-8", "replace")

    def _error_line(self, pods: list[dict[str, Any]]) -> str | None:
        """The error line a stage program prints before a non-zero exit, from its newest failed pod's log."""
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        for pod in sorted(failed, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)[:1]:
            try:
                return error_line(self._log_text(pod["metadata"]["name"], tail_lines=50))
            except TunectlError:  # logs are a courtesy here; the node may be gone
                return None
        return None

    def list_runs(self) -> list[RunStatus]:
        """Every run in the namespace, oldest first, from three list requests however many runs there are."""
        c = self.cluster
        sel = f"{MANAGED},{LABEL_COMPONENT}=recipe"
        cms = c.call("listing runs", c.core.list_namespaced_config_map, self.namespace, label_selector=sel)
        jobs, pods = self._objects(MANAGED)
        by_run: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = defaultdict(lambda: ([], []))
        for i, objs in enumerate((jobs, pods)):
            for obj in objs:
                by_run[obj["metadata"]["labels"].get(LABEL_RUN, "")][i].append(obj)
        records = sorted((c.to_dict(x) for x in cms.items), key=lambda x: x["metadata"]["creationTimestamp"])
        return [self._status(cm, *by_run[cm["metadata"]["labels"][LABEL_RUN]], False) for cm in records]

    def logs(self, run: str, stage: str | None, follow: bool) -> Iterator[tuple[str, str]]:
        """(stage, text) chunks from each stage's newest pod; with `follow`, stream one stage until it ends."""
        stages = _stages(self.run_record(run))  # the record is enough: no status (and its log reads) here
        if stage is not None and stage not in stages:
            raise TunectlError(f"run {run} has no stage '{stage}' (stages: {', '.join(stages)})")
        if follow and stage is None:
            raise ConfigError("--follow needs --stage (one stream at a time)")
        return self._logs(run, [stage] if stage else stages, follow)

    def _logs(self, run: str, stages: list[str], follow: bool) -> Iterator[tuple[str, str]]:
        _, pods = self._objects(f"{LABEL_RUN}={run}")
        for s in stages:
            owned = [p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == s]
            if not owned:
                continue
            # The newest pod of each index: one for most stages, one per node for training across nodes.
            newest: dict[int, str] = {}
            for p in sorted(owned, key=lambda p: p["metadata"]["creationTimestamp"]):
                newest[int(p["metadata"]["labels"].get(JOB_INDEX_LABEL, "0"))] = p["metadata"]["name"]
            if len(newest) == 1:
                [name] = newest.values()
                yield from ((s, t) for t in self._follow(name)) if follow else [(s, self._log_text(name))]
            elif follow:
                yield from ((s, t) for t in self._follow_group(newest))
            else:
                for i, name in sorted(newest.items()):
                    yield s, "".join(f"[pod {i}] {line}" for line in self._log_text(name).splitlines(keepends=True))

    def _follow_group(self, pods: dict[int, str]) -> Iterator[str]:
        """Several pods' logs as they come, whole lines each prefixed with its pod's index, until every pod ends."""
        import queue
        import threading

        lines: queue.Queue[str | None] = queue.Queue()

        def read(index: int, pod: str) -> None:
            partial = ""
            try:
                for text in self._follow(pod):
                    *done, partial = (partial + text).split("\n")
                    for line in done:
                        lines.put(f"[pod {index}] {line}\n")
            except TunectlError as e:
                lines.put(f"[pod {index}] (log stream ended: {e})\n")
            if partial:
                lines.put(f"[pod {index}] {partial}\n")
            lines.put(None)

        for index, pod in pods.items():
            threading.Thread(target=read, args=(index, pod), daemon=True).start()
        open_streams = len(pods)
        while open_streams:
            line = lines.get()
            if line is None:
                open_streams -= 1
            else:
                yield line

    def _follow(self, pod: str, grace: float = 2.0) -> Iterator[str]:
        """Stream a pod's log until the pod is finished. A kubelet ends the stream when the container exits;
        this also ends it `grace` seconds after the pod turns terminal, in case the node never does."""
        import queue
        import threading

        c = self.cluster
        resp = c.call(
            f"reading logs of {pod}",
            c.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            follow=True,
            _preload_content=False,
            _request_timeout=(c.timeout, None),  # a quiet stage may print nothing for a long time
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
                    phase = c.call("reading the pod", c.core.read_namespaced_pod, pod, self.namespace)
                    if phase.status.phase in ("Succeeded", "Failed"):
                        ended_at = time.monotonic()
                elif time.monotonic() - ended_at > grace:
                    resp.shutdown()  # unblocks the reader (close() would wait for its read to return)
                    return
                continue
            if chunk is None:
                return
            yield decoder.decode(chunk)

    def cancel(self, run: str, echo: Echo | None = None) -> dict[str, int]:
        """Delete the run's Jobs and pods (and its ConfigMap and RBAC); artifacts in the store are kept. Returns once
        the pods are gone: each gets SIGTERM and its grace period, in which a train stage saves a checkpoint."""
        from kubernetes.client import V1DeleteOptions

        self.run_record(run)
        sel = f"{LABEL_RUN}={run}"
        c = self.cluster
        opts = V1DeleteOptions(propagation_policy="Background")
        counts = {}
        grace = 0
        for kind, lister, deleter in (
            ("jobs", c.batch.list_namespaced_job, c.batch.delete_namespaced_job),
            ("pods", c.core.list_namespaced_pod, c.core.delete_namespaced_pod),
            ("roles", c.rbac.list_namespaced_role, c.rbac.delete_namespaced_role),
            ("rolebindings", c.rbac.list_namespaced_role_binding, c.rbac.delete_namespaced_role_binding),
            ("serviceaccounts", c.core.list_namespaced_service_account, c.core.delete_namespaced_service_account),
            ("services", c.core.list_namespaced_service, c.core.delete_namespaced_service),
            ("configmaps", c.core.list_namespaced_config_map, c.core.delete_namespaced_config_map),
        ):
            items = c.call(f"listing {kind}", lister, self.namespace, label_selector=sel).items
            for item in items:
                name = item.metadata.name
                c.call(f"deleting {kind} {name}", _delete, deleter, name, self.namespace, opts)
                if kind == "pods" and item.status.phase in ("Pending", "Running"):
                    grace = max(grace, item.spec.termination_grace_period_seconds or 30)
            counts[kind] = len(items)
        # The longest grace period of a running pod, and time for the kubelet and the API server to catch up.
        timeout = grace + 30
        told = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs, pods = self._objects(sel)
            if not jobs and not pods:
                return counts
            if pods and echo and not told:
                echo(f"waiting for {len(pods)} pods to stop (up to {grace}s: a train stage saves a checkpoint first)")
                told = True
            time.sleep(0.5)
        raise TunectlError(
            f"run {run}: Jobs or pods still present {timeout}s after deletion "
            f"(`kubectl get pods -l {sel} -n {self.namespace}` shows which, and their node)"
        )


def _stages(cm: dict[str, Any]) -> list[str]:
    """The run's stages in order, as its ConfigMap records them."""
    return [s for s in ((cm["metadata"].get("annotations") or {}).get(ANN_STAGES, "")).split(",") if s]


def _delete(fn: Callable[..., Any], name: str, namespace: str, opts: Any, _request_timeout: Any = None) -> None:
    """Delete one object; one already gone is fine (a retried delete finds it gone)."""
    from kubernetes.client.exceptions import ApiException

    try:
        fn(name, namespace, body=opts, _request_timeout=_request_timeout)
    except ApiException as e:
        if e.status != 404:
            raise


def timestamped(echo: Echo) -> Echo:
    """`echo` for one event a line, each line with the time of day (what the reconciler prints)."""
    return lambda msg: echo(f"{datetime.now():%H:%M:%S} {msg}\n")
