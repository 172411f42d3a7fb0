"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and kube-scheduler built
from source at pinned versions (`make cluster-tools`), plus kwok standing in for the kubelets of fake nodes.
Everything listens on 127.0.0.1 with free ports, with a fresh CA, keys and a random admin token per start.

    cp = ControlPlane(tmp_dir); cp.start()
    cp.add_nodes(2, gpus=8)                    # kwok-managed Nodes, Ready
    ns = cp.new_namespace("my-test")
    with cp.api_client() as api: ...           # kubernetes.client.ApiClient as cluster admin
    cp.stop()

How fake pods behave (Running, exit codes, image pull errors, deletion) is set by kwok-stages.yaml next to this file.
kwok also serves as the nodes' kubelet API (HTTPS on 127.0.0.1, which every fake node advertises), so pods/log works
through the apiserver: for a pod with a kwok `Logs` object (kwok-logs-crd.yaml; PodRunner makes them) it serves the
container log file that object names.
`ExternalCluster` offers the same client-side API for a cluster you bring (e.g. kind), without kwok.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from minio_server import pinned

from .wait import wait_for

# The versions the Makefile builds (versions.env): the binaries live in a directory per version.
K8S_VERSION = pinned("K8S_VERSION")
KWOK_VERSION = pinned("KWOK_VERSION")
HELM_VERSION = pinned("HELM_VERSION")

STAGES = Path(__file__).with_name("kwok-stages.yaml")
LOGS_CRD = Path(__file__).with_name("kwok-logs-crd.yaml")

# Nodes with this annotation are the ones kwok manages (--manage-nodes-with-annotation-selector).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU = "nvidia.com/gpu"

# Pod annotations the kwok stages act on (see kwok-stages.yaml).
EXIT_CODE = "tunectl.test/exit-code"  # "N": a Running pod's containers exit with N
REASON = "tunectl.test/reason"  # terminated reason instead of Completed / Error, e.g. OOMKilled
MESSAGE = "tunectl.test/message"  # optional terminated / waiting message
WAITING_REASON = "tunectl.test/waiting-reason"  # e.g. ImagePullBackOff: stays Pending, containers waiting

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"  # kwok hands out pod IPs from here (its default /24 runs out at 254 live pods)

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(RuntimeError):
    pass


def tools_dir() -> Path:
    return Path(os.environ.get("TUNECTL_TOOLS") or Path.home() / ".cache" / "tunectl" / "bin")


def helm_path() -> Path:
    return tools_dir() / f"helm-{HELM_VERSION}" / "helm"


def binaries() -> dict[str, Path]:
    """Where `make cluster-tools` puts each component, and the real node's kubelet and pause (tests/cluster/node.py)."""
    k8s = tools_dir() / f"k8s-{K8S_VERSION}"
    bins = {name: k8s / name for name in (*COMPONENTS, "kubelet", "pause") if name != "kwok"}
    bins["kwok"] = tools_dir() / f"kwok-{KWOK_VERSION}" / "kwok"
    return bins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dns_label(hint: str, random_suffix: bool = True) -> str:
    """A valid namespace / object name (DNS-1123 label, at most 63 characters) from free text such as a test id."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-") or "t"
    if not random_suffix:
        return slug[:63].rstrip("-")
    return f"{slug[:54].rstrip('-')}-{secrets.token_hex(4)}"


def service_account_user(namespace: str, name: str) -> str:
    """The username a ServiceAccount's requests carry (in the audit log, in RBAC subjects)."""
    return f"system:serviceaccount:{namespace}:{name}"


class _ClientSide:
    """What tests use, the same for our control plane and for an external cluster."""

    kwok: bool
    kubeconfig: Path
    audit_log: Path | None
    _scratch: Path

    def _kube_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.kubeconfig.read_text())

    def _current(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cluster and user stanzas of the kubeconfig's current context."""
        conf = self._kube_config()
        ctx = next(c["context"] for c in conf["contexts"] if c["name"] == conf["current-context"])
        cluster = next(c["cluster"] for c in conf["clusters"] if c["name"] == ctx["cluster"])
        user = next(u.get("user") or {} for u in conf["users"] if u["name"] == ctx["user"])
        return cluster, user

    @property
    def server(self) -> str:
        return self._current()[0]["server"]

    def api_client(self):
        """A new kubernetes.client.ApiClient as cluster admin; close it (or use `with`)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig acting as ServiceAccount `namespace/name`, with a token from the TokenRequest API."""
        from kubernetes import client

        with self.api_client() as api:
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            token = client.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, request)
        cluster, _ = self._current()
        path = path or self._scratch / f"sa-{namespace}-{name}.kubeconfig"
        conf = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": f"{namespace}-{name}", "user": {"token": token.status.token}}],
            "contexts": [
                {"name": "sa", "context": {"cluster": "cluster", "user": f"{namespace}-{name}", "namespace": namespace}}
            ],
            "current-context": "sa",
        }
        _write_private(path, yaml.safe_dump(conf))
        return path

    def new_namespace(self, prefix: str = "t", timeout: float = 30) -> str:
        """Create a namespace named from `prefix` plus a random suffix; returns once its `default` ServiceAccount
        exists, since pods (and so Jobs) are refused until then."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        name = dns_label(prefix)
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
            wait_for(
                lambda: core.read_namespaced_service_account("default", name),
                timeout,
                f"ServiceAccount {name}/default",
                ignore=(ApiException,),
            )
        return name

    def delete_namespace(self, name: str) -> None:
        """Start deleting a namespace (and everything in it); does not wait."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            try:
                client.CoreV1Api(api).delete_namespace(name, propagation_policy="Background")
            except ApiException as e:
                if e.status != 404:
                    raise

    def add_nodes(self, *args: Any, **kwargs: Any) -> list[str]:
        raise ClusterError("fake (kwok) nodes need the test control plane; this cluster has no kwok")


class ControlPlane(_ClientSide):
    kwok = True

    def __init__(self, workdir: Path):
        self.bins = binaries()
        missing = [str(self.bins[c]) for c in COMPONENTS if not self.bins[c].is_file()]
        if missing:
            raise ClusterError(f"Kubernetes test binaries missing ({', '.join(missing)}): run `make cluster-tools`")
        self.workdir = Path(workdir)
        self._scratch = self.workdir
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.audit_log = self.workdir / "audit.log"
        self.ca_file = self.workdir / "ca.crt"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}  # seconds from start() until each step was done
        self._token = ""
        self.node_token = ""  # the real node's kubelet credentials (tests/cluster/node.py): system:node:localhost
        self._node_seq: dict[str, int] = {}
        self.port = self._etcd_port = self._kwok_port = 0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.port, self._etcd_port, etcd_peer, self._kwok_port = (free_port() for _ in range(4))
            self._write_files()
            self.timings["files"] = time.monotonic() - t0
            self._spawn("etcd", self._etcd_args(etcd_peer))
            self._spawn("kube-apiserver", self._apiserver_args())
            self._wait("kube-apiserver", self._apiserver_ready, deadline)
            self.timings["kube-apiserver"] = time.monotonic() - t0
            self._request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", self._logs_crd())
            # Started together once the apiserver answers: the controller-manager gives up if it is not healthy
            # within 10s of its own start, and all three only need the API.
            self._spawn("kube-controller-manager", self._controller_manager_args())
            self._spawn("kube-scheduler", self._scheduler_args())
            # kwok watches Logs objects from its start: a CRD not served yet would fail its first list (retry later).
            self._wait("the kwok Logs CRD", self._logs_crd_established, deadline)
            self.timings["logs-crd"] = time.monotonic() - t0
            self._spawn("kwok", self._kwok_args())
            self._wait("kube-controller-manager", self._default_service_account, deadline)
            self.timings["kube-controller-manager"] = time.monotonic() - t0
            self._wait("kube-scheduler", self._scheduler_works, deadline)
            self.timings["kube-scheduler"] = time.monotonic() - t0
            self._wait("kwok", self._kwok_healthy, deadline)
            self.timings["kwok"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - t0

    def stop(self) -> None:
        # The data is throwaway and the audit log is written synchronously, so nothing needs a graceful shutdown
        # (kube-apiserver's takes seconds).
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait()
        self.procs.clear()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, name: str, chars: int = 4000) -> str:
        log = self.workdir / f"{name}.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"

    # -- client side ------------------------------------------------------------------------------------------------

    def api_client(self):
        from kubernetes import client, config

        conf = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=conf)
        conf.proxy = None  # a proxy from the environment must not capture 127.0.0.1
        return client.ApiClient(conf)

    def add_nodes(
        self,
        count: int = 1,
        gpus: int = 8,
        cpu: str | int = "64",
        memory: str = "512Gi",
        pods: int = 110,
        prefix: str = "kwok-node",
        labels: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> list[str]:
        """Create `count` Nodes that kwok manages and wait until they are Ready and schedulable. Names are
        `<prefix>-<n>`; labels type=kwok plus `labels`; capacity = allocatable = the given resources."""
        from kubernetes import client

        resources = {"cpu": str(cpu), "memory": str(memory), "pods": str(pods), "ephemeral-storage": "1Ti"}
        if gpus:
            resources[GPU] = str(gpus)
        names = []
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            for _ in range(count):
                n = self._node_seq.get(prefix, 0)
                self._node_seq[prefix] = n + 1
                name = f"{prefix}-{n}"
                body = {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            "type": "kwok",
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            **(labels or {}),
                        },
                    },
                    # A kubelet registers with its status; the apiserver keeps status on Node create.
                    "status": {"capacity": resources, "allocatable": resources},
                }
                core.create_node(body)
                names.append(name)

            def schedulable(name: str) -> bool:
                node = core.read_node(name)
                ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
                # The node lifecycle controller lifts the not-ready taint shortly after Ready.
                tainted = any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints or [])
                return ready and not tainted

            for name in names:
                wait_for(lambda name=name: schedulable(name), timeout, f"node {name} Ready and untainted")
        return names

    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        """Audit events (one per request, its last stage), optionally only those of `user`, e.g.
        service_account_user(ns, name). Only ServiceAccount requests are logged (level Metadata)."""
        events: dict[str, dict[str, Any]] = {}
        if self.audit_log.exists():
            for line in self.audit_log.read_text().splitlines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if user is None or event.get("user", {}).get("username") == user:
                    events[event["auditID"]] = event
        return list(events.values())

    # -- startup ----------------------------------------------------------------------------------------------------

    def _write_files(self) -> None:
        w = self.workdir
        # The service account key pair (RSA, as kube-apiserver and the controller-manager expect) in the background.
        sa_key = subprocess.Popen(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"],
            cwd=w,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Our own CA and a serving certificate for 127.0.0.1, so clients verify TLS instead of skipping it.
        (w / "ca.cnf").write_text(
            "[req]\ndistinguished_name = dn\nx509_extensions = v3_ca\nprompt = no\n"
            "[dn]\nCN = tunectl-test-ca\n"
            "[v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign,digitalSignature\n"
            "subjectKeyIdentifier = hash\n"
        )
        _openssl(w, "req", "-x509", "-config", "ca.cnf", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7")
        apiserver_names = (
            "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1"
        )
        _serving_cert(w, "apiserver", apiserver_names)
        # kwok's kubelet API, which the apiserver calls for pods/log and verifies (--kubelet-certificate-authority).
        _serving_cert(w, "kubelet", "IP:127.0.0.1")
        # The apiserver's client certificate for kubelets: a real kubelet authenticates it (x509) and asks the
        # apiserver whether it may (system:masters may).
        _client_cert(w, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        if sa_key.wait() != 0:
            raise ClusterError(f"openssl genpkey failed: {sa_key.stderr.read().decode() if sa_key.stderr else ''}")
        _openssl(w, "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")

        self._token = secrets.token_urlsafe(32)
        self.node_token = secrets.token_urlsafe(32)
        # The real node's identity is a node's: the Node authorizer and NodeRestriction limit it to its own pods.
        _write_private(
            w / "tokens.csv",
            f"{self._token},admin,admin-uid,system:masters\n"
            f"{self.node_token},system:node:localhost,node-localhost-uid,system:nodes\n",
        )
        # Only ServiceAccount requests: what the tunectl controller does, countable per identity; the control plane
        # components and tests act as admin and stay out of the log. RequestReceived would double every request.
        (w / "audit-policy.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}],
                }
            )
        )
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        conf = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority-data": ca_data}}],
            "users": [{"name": "admin", "user": {"token": self._token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin", "namespace": "default"}}],
            "current-context": "test",
        }
        _write_private(self.kubeconfig, yaml.safe_dump(conf))

    def _etcd_args(self, peer_port: int) -> list[str]:
        client_url = f"http://127.0.0.1:{self._etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        return [
            "--name=test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            # Throwaway data: fsync only costs time (seconds per test session on a slow disk).
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        w = self.workdir
        return [
            f"--etcd-servers=http://127.0.0.1:{self._etcd_port}",
            "--bind-address=127.0.0.1",
            # A loopback advertise address is refused unless nothing maintains the `kubernetes` Service endpoints;
            # fake pods never call the API, so none is fine.
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.port}",
            f"--cert-dir={w / 'apiserver-certs'}",
            f"--tls-cert-file={w / 'apiserver.crt'}",
            f"--tls-private-key-file={w / 'apiserver.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--audit-policy-file={w / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--profiling=false",
            # pods/log goes to the node's kubelet: the real node's at its Hostname, `localhost` (a kubelet refuses a
            # loopback InternalIP); kwok's at the InternalIP and port each fake node reports (they have no Hostname).
            "--kubelet-preferred-address-types=Hostname,InternalIP",
            f"--kubelet-certificate-authority={self.ca_file}",
            f"--kubelet-client-certificate={w / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={w / 'apiserver-kubelet-client.key'}",
        ]

    def _controller_manager_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            # Publishes kube-root-ca.crt into every namespace, as pods of a real cluster expect.
            f"--root-ca-file={self.ca_file}",
            f"--service-account-private-key-file={self.workdir / 'sa.key'}",
            # Controllers act as admin, so the audit log holds only the ServiceAccounts under test.
            "--use-service-account-credentials=false",
            "--concurrent-job-syncs=10",
        ]

    def _scheduler_args(self) -> list[str]:
        return [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0"]

    def _kwok_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            # Its kubelet API (pods/log) and /healthz: HTTPS with our CA's certificate, plain HTTP on the same port.
            f"--server-address=127.0.0.1:{self._kwok_port}",
            f"--tls-cert-file={self.workdir / 'kubelet.crt'}",
            f"--tls-private-key-file={self.workdir / 'kubelet.key'}",
            # What each fake node reports as its InternalIP and kubelet port (the node stage), so the apiserver
            # reaches that server.
            "--node-ip=127.0.0.1",
            f"--node-port={self._kwok_port}",
            # Which file holds a pod's container log comes from Logs objects (PodRunner creates one per pod).
            "--enable-crds=Logs",
            # Node leases are what keep the node lifecycle controller from marking fake nodes unreachable.
            "--node-lease-duration-seconds=40",
            f"--cidr={POD_CIDR}",
        ]

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [str(self.bins[name]), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )

    def _wait(self, name: str, ready: Callable[[], bool], deadline: float) -> None:
        """Poll `ready` until it holds; fail with the log of whichever component died, or of `name` on timeout."""
        while True:
            for proc_name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{proc_name} exited with {proc.returncode} while waiting for {name}:\n"
                        f"{self.log_tail(proc_name)}"
                    )
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready in time:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        req = urllib.request.Request(
            self.server + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        with opener.open(req, timeout=5) as r:
            data = r.read()
        return json.loads(data) if data.startswith(b"{") else {"body": data.decode()}

    def _apiserver_ready(self) -> bool:
        try:
            return self._request("GET", "/readyz").get("body") == "ok"
        except urllib.error.HTTPError:
            return False

    def _default_service_account(self) -> bool:
        # Created by the controller-manager's serviceaccount controller: proof that it runs.
        try:
            return bool(self._request("GET", "/api/v1/namespaces/default/serviceaccounts/default"))
        except urllib.error.HTTPError:
            return False

    def _scheduler_works(self) -> bool:
        # There are no nodes yet, so a working scheduler marks a pod unschedulable; nothing else writes that.
        name = "scheduler-probe"
        pods = "/api/v1/namespaces/default/pods"
        try:
            pod = self._request("GET", f"{pods}/{name}")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                return False
            spec = {"containers": [{"name": "probe", "image": "probe"}], "automountServiceAccountToken": False}
            pod = self._request("POST", pods, {"metadata": {"name": name}, "spec": spec})
        scheduled = [c for c in pod.get("status", {}).get("conditions", []) if c["type"] == "PodScheduled"]
        if not scheduled:
            return False
        self._request("DELETE", f"{pods}/{name}", {"gracePeriodSeconds": 0})
        return True

    def _logs_crd(self) -> dict[str, Any]:
        return yaml.safe_load(LOGS_CRD.read_text())

    def _logs_crd_established(self) -> bool:
        name = self._logs_crd()["metadata"]["name"]
        crd = self._request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        return any(
            c["type"] == "Established" and c["status"] == "True" for c in crd.get("status", {}).get("conditions", [])
        )

    def _kwok_healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self._kwok_port}/healthz", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False


class ExternalCluster(_ClientSide):
    """A cluster you run (e.g. `kind create cluster`), from its admin kubeconfig: the same client-side API, no
    kwok (so no fake nodes and no tunectl.test/* pod annotations), no audit log. start()/stop() do nothing."""

    kwok = False
    audit_log = None

    def __init__(self, kubeconfig: Path):
        self.kubeconfig = Path(kubeconfig)
        self._scratch = Path(tempfile.mkdtemp(prefix="tunectl-cluster-"))
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        raise ClusterError("no audit log for an external cluster")


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _serving_cert(cwd: Path, name: str, san: str) -> None:
    """`name`.key and `name`.crt: a TLS server certificate for `san` signed by the CA in cwd (ca.crt, ca.key)."""
    (cwd / f"{name}.cnf").write_text(
        "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n"
        f"subjectAltName = {san}\n"
    )
    _openssl(cwd, "req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(
        cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "7",
        "-set_serial", "0x" + secrets.token_hex(8), "-extfile", f"{name}.cnf", "-out", f"{name}.crt",
    )  # fmt: skip


def _client_cert(cwd: Path, name: str, subject: str) -> None:
    """`name`.key and `name`.crt: a TLS client certificate for `subject` (O= groups, CN= user) signed by the CA."""
    (cwd / f"{name}.cnf").write_text(
        "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage = clientAuth\n"
    )
    _openssl(cwd, "req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    _openssl(
        cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "7",
        "-set_serial", "0x" + secrets.token_hex(8), "-extfile", f"{name}.cnf", "-out", f"{name}.crt",
    )  # fmt: skip


def _openssl(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {proc.stderr}")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


_prctl = None
if sys.platform == "linux":
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        pass


def _die_with_parent() -> None:
    # Runs in the child before exec: if pytest is killed outright, the kernel kills the component too, so no
    # orphaned control plane keeps ports and CPU. (Tied to the thread that started it: start from a long-lived one.)
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
