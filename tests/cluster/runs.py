"""A tunectl run on a test cluster, as its user drives it (the CLI, with a values file and a kubeconfig) and as a
test inspects it (the backend's status, the run's pods). Used by the kwok tests (test_kube_backend.py: pods run by
the stand-in tests/cluster/podrunner.py) and the real-node tests (test_real_node.py: pods run by the kubelet)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunectl.kube import Cluster, KubernetesBackend

from .podrunner import PodRunner


@dataclass
class Kube:
    cluster: Any
    namespace: str
    store: str
    values: Path
    env: dict[str, str]
    workdir: Path
    _backend: KubernetesBackend | None = None

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
        """On kwok's fake nodes: run the pods (or fake their exits) as `modes` say. A real cluster runs its own."""
        if not self.cluster.kwok:
            return contextlib.nullcontext()
        return PodRunner(self.cluster, self.namespace, self.workdir / "pods", modes)

    def status(self, run: str) -> dict[str, Any]:
        return self.backend().status(run).to_dict()

    def stages(self, run: str) -> dict[str, dict[str, Any]]:
        return {s["stage"]: s for s in self.status(run)["stages"]}

    def pods(self, run: str, stage: str | None = None) -> list[Any]:
        sel = f"tunectl.dev/run={run}" + (f",tunectl.dev/stage={stage}" if stage else "")
        return self.backend().cluster.core.list_namespaced_pod(self.namespace, label_selector=sel).items

    def jobs(self, run: str) -> dict[str, Any]:
        """The run's Jobs by stage (the reconciler's under "reconciler")."""
        batch = self.backend().cluster.batch
        items = batch.list_namespaced_job(self.namespace, label_selector=f"tunectl.dev/run={run}")
        return {j.metadata.labels.get("tunectl.dev/stage", "reconciler"): j for j in items.items}

    def diagnose(self) -> str:
        """The namespace's Jobs, pods (state and log tail) and events: what a failed or timed-out test needs to be
        understood (conftest.py adds it to the report of a failed test that used a Kube)."""
        core, batch = self.backend().cluster.core, self.backend().cluster.batch
        jobs = batch.list_namespaced_job(self.namespace).items
        lines = [f"job {j.metadata.name}: {j.status.to_dict()}" for j in jobs]
        for pod in core.list_namespaced_pod(self.namespace).items:
            states = [c.state.to_dict() for c in pod.status.container_statuses or []]
            lines.append(f"pod {pod.metadata.name} {pod.status.phase} on {pod.spec.node_name}: {states}")
            try:
                log = core.read_namespaced_pod_log(pod.metadata.name, self.namespace, tail_lines=15)
                lines += ["  " + line for line in log.splitlines()]
            except Exception as e:  # noqa: BLE001 - a pod without a log yet
                lines.append(f"  (no log: {str(e).splitlines()[0]})")
        events = core.list_namespaced_event(self.namespace).items
        for e in sorted(events, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp):
            lines.append(f"event {e.type} {e.reason} {e.involved_object.kind}/{e.involved_object.name}: {e.message}")
        return "\n".join(lines)


def make_kube(
    cluster: Any, namespace: str, minio: Any, bucket: str, workdir: Path, values: dict[str, Any] | None = None
) -> Kube:
    """A namespace ready for runs: the S3 credentials as a Secret, a values file pointing the chart at the test
    MinIO (plus `values`), and the environment the CLI reads (kubeconfig, namespace, store)."""
    from kubernetes import client

    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_secret(
            namespace,
            {
                "metadata": {"name": "s3-creds"},
                "stringData": {"AWS_ACCESS_KEY_ID": minio.user, "AWS_SECRET_ACCESS_KEY": minio.password},
            },
        )
    path = workdir / "values.yaml"
    base: dict[str, Any] = {
        "s3": {"endpoint": minio.endpoint, "credentialsSecret": "s3-creds"},
        "reconciler": {"pollSeconds": 2},
    }
    path.write_text(yaml.safe_dump(_merge(base, values or {})))
    store = f"s3://{bucket}/tunectl"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "TUNECTL_NAMESPACE": namespace,
        "TUNECTL_STORE": store,
        "TUNECTL_BACKEND": "kubernetes",
    }
    return Kube(cluster, namespace, store, path, env, workdir)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
