"""The container runtime that kwok does not have, named for what it is: a stand-in kubelet executor for the pods of
kwok's fake nodes. Pods that must run as a kubelet runs them (images, cgroups, signals) run on the test cluster's
real node instead (tests/cluster/node.py); this runs what the kwok-only tests need: a pod's command as a local
process from this checkout, or an exit the test chooses.

kwok makes pods look scheduled and running; nothing runs in them. PodRunner watches a namespace and, for each
pod that kwok reports Running, does what a kubelet would: materialises its volumes (ConfigMap files, emptyDirs)
in a temp dir, resolves its env (values, Secret keys, field refs), mints its ServiceAccount token, and runs its
command as a local process. It then reports the exit code to kwok with the `tunectl.test/exit-code` annotation,
and kwok's stages terminate the pod with that code, which the real Job controller then counts.

Like a runtime's log shim it keeps the container's output twice: as is in `<workdir>/<pod>/output.log` (`log()`),
and in the CRI log format in `<workdir>/<pod>/logs/<container>.log`, which a kwok `Logs` object named like the pod
points kwok's kubelet API at, so the apiserver's pods/log (`kubectl logs`, tail, follow) serves it.

Per stage, a test can instead have the pod exit with a chosen code without running anything (fault tests), or
publish a one-file stand-in artifact (the benchmark's hundreds of runs, which cannot all train here).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_ANNOTATION = "tunectl.test/exit-code"
REASON_ANNOTATION = "tunectl.test/reason"
MESSAGE_ANNOTATION = "tunectl.test/message"
RUN = "run"  # mode: execute the pod's real command
KWOK_LOGS = ("kwok.x-k8s.io", "v1alpha1", "logs")  # group, version, plural of kwok's Logs (kwok-logs-crd.yaml)
CRI_MAX_LINE = 16 * 1024  # longer lines go into the CRI log in pieces (tag P), as containerd splits them


class PodRunner:
    def __init__(
        self,
        cluster: Any,
        namespace: str,
        workdir: Path,
        modes: dict[str, Any] | None = None,
    ):
        from kubernetes import client

        self.cluster, self.namespace, self.workdir = cluster, namespace, workdir
        self.core = client.CoreV1Api(cluster.api_client())
        self.custom = client.CustomObjectsApi(self.core.api_client)
        self.modes = modes or {}  # component -> RUN | int exit code | "publish"
        self.started: dict[str, threading.Thread] = {}
        self.exits: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PodRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector="tunectl.dev/run").items
            except Exception:  # noqa: BLE001 - the namespace may be going away at the end of a test
                pods = []
            for pod in pods:
                name = pod.metadata.name
                if name in self.started or pod.status.phase != "Running" or pod.metadata.deletion_timestamp:
                    continue
                if EXIT_ANNOTATION in (pod.metadata.annotations or {}):
                    continue
                t = threading.Thread(target=self._run_pod, args=(pod,), daemon=True)
                self.started[name] = t
                t.start()
            self._stop.wait(0.3)

    def _report(self, pod: Any, code: int) -> None:
        self.exits[pod.metadata.name] = code
        self._annotate(pod, {EXIT_ANNOTATION: str(code)})

    def _annotate(self, pod: Any, annotations: dict[str, str]) -> None:
        try:
            self.core.patch_namespaced_pod(
                pod.metadata.name, self.namespace, {"metadata": {"annotations": annotations}}
            )
        except Exception:  # noqa: BLE001 - deleted meanwhile (cancel)
            pass

    def _run_pod(self, pod: Any) -> None:
        component = pod.metadata.labels.get("app.kubernetes.io/component", "")
        mode = self.modes.get(component, RUN)
        container = pod.spec.containers[0]
        root = self.workdir / pod.metadata.name
        # Before anything runs: a container that exits without running (the modes below) has an empty log.
        cri_log = self._serve_log(pod, container.name, root)
        if mode == "hold":  # stays Running until the test says otherwise
            return
        if isinstance(mode, int):
            self._report(pod, mode)
            return
        if isinstance(mode, tuple):  # (exit code, terminated reason), e.g. (137, "OOMKilled")
            self._annotate(pod, {REASON_ANNOTATION: mode[1]})
            self._report(pod, mode[0])
            return
        if mode == "publish":
            self._report(pod, _publish_standin(pod))
            return
        mounts = self._volumes(pod, container, root)
        # The termination message file, which a kubelet creates, mounts and reads back into the pod's status.
        message_file = root / "termination-log"
        message_file.touch()
        message_file.chmod(0o666)
        message_path = container.termination_message_path or "/dev/termination-log"
        env = self._env(pod, container, {**mounts, message_path: message_file}, root)
        cmd = [_rewrite(a, mounts) for a in _expand(list(container.command or []) + list(container.args or []), env)]
        if cmd[:1] == ["python"]:
            cmd[0] = sys.executable
        elif cmd[:1] == ["tunectl"]:
            cmd[:1] = [sys.executable, "-m", "tunectl.cli"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root)
        shim = threading.Thread(target=_copy_output, args=(proc.stdout, root / "output.log", cri_log), daemon=True)
        shim.start()
        rc = proc.wait()
        # The output is all there before the exit is reported, unless a process left behind holds the pipe open.
        shim.join(timeout=5)
        message = message_file.read_text(errors="replace")[-4096:]  # the kubelet keeps at most 4096 bytes
        if message:
            self._annotate(pod, {MESSAGE_ANNOTATION: message})
        # A runtime reports a process killed by signal N as exit code 128 + N.
        self._report(pod, 128 - rc if rc < 0 else rc)

    def _serve_log(self, pod: Any, container: str, root: Path) -> Path:
        """Create the container's (empty) CRI log file and the kwok Logs object that serves it. The object is owned
        by the pod, so the garbage collector deletes it with the pod."""
        from kubernetes.client.exceptions import ApiException

        path = root / "logs" / f"{container}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # kwok fails a log request for a file that does not exist
        owner = {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}
        body = {
            "apiVersion": f"{KWOK_LOGS[0]}/{KWOK_LOGS[1]}",
            "kind": "Logs",
            "metadata": {"name": pod.metadata.name, "ownerReferences": [owner]},
            "spec": {"logs": [{"containers": [container], "logsFile": str(path.resolve())}]},
        }
        try:
            self.custom.create_namespaced_custom_object(*KWOK_LOGS[:2], self.namespace, KWOK_LOGS[2], body)
        except ApiException:  # the namespace is going away, or a cluster without kwok's Logs CRD: no pods/log
            pass
        return path

    def log(self, pod_name: str) -> str:
        path = self.workdir / pod_name / "output.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def _volumes(self, pod: Any, container: Any, root: Path) -> dict[str, Path]:
        """mountPath -> host directory holding what the kubelet would have mounted there."""
        by_name = {}
        for vol in pod.spec.volumes or []:
            host = root / "volumes" / vol.name
            host.mkdir(parents=True, exist_ok=True)
            if vol.config_map:
                cm = self.core.read_namespaced_config_map(vol.config_map.name, self.namespace)
                items = vol.config_map.items or [type("I", (), {"key": k, "path": k}) for k in cm.data]
                for item in items:
                    (host / item.path).write_text(cm.data[item.key], encoding="utf-8")
            by_name[vol.name] = host
        return {m.mount_path: by_name[m.name] for m in container.volume_mounts or [] if m.mount_path != "/dev/shm"}

    def _env(self, pod: Any, container: Any, mounts: dict[str, Path], root: Path) -> dict[str, str]:
        from tunectl_jobs.llamacpp import tree_dir

        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "PYTHONPATH", "TUNECTL_HELM")}
        # What the stage images' ENV provides: where the pinned llama.cpp converter tree is baked in.
        env["TUNECTL_LLAMA_CPP_DIR"] = str(tree_dir())
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        for e in container.env or []:
            if e.value is not None:
                env[e.name] = _rewrite(e.value, mounts)
            elif e.value_from and e.value_from.secret_key_ref:
                ref = e.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, self.namespace)
                env[e.name] = base64.b64decode(secret.data[ref.key]).decode()
            elif e.value_from and e.value_from.field_ref:
                path = e.value_from.field_ref.field_path
                env[e.name] = {"metadata.namespace": self.namespace, "metadata.name": pod.metadata.name}[path]
        for d in ("HOME", "TMPDIR", "HF_HOME"):
            if d in env:
                Path(env[d]).mkdir(parents=True, exist_ok=True)
        if pod.spec.automount_service_account_token and pod.spec.service_account_name:
            kubeconfig = root / "kubeconfig"
            self.cluster.service_account_kubeconfig(self.namespace, pod.spec.service_account_name, kubeconfig)
            env["KUBECONFIG"] = str(kubeconfig)
        return env


def _copy_output(pipe: Any, raw: Path, cri: Path) -> None:
    """Copy a process's output to `raw` byte for byte and to `cri` as CRI log records, each written as it comes:
    `<RFC3339Nano UTC> stdout F <line>\n` per line, `... stdout P <piece>\n` for a piece of a line without its
    newline (one over CRI_MAX_LINE, or the output's unterminated end). stderr is already merged into stdout."""
    pending = b""
    with pipe, open(raw, "wb", buffering=0) as raw_f, open(cri, "ab", buffering=0) as cri_f:
        while True:
            chunk = os.read(pipe.fileno(), 65536)
            raw_f.write(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            records = [(b"F", line + b"\n") for line in lines]
            while len(pending) > CRI_MAX_LINE or (pending and not chunk):
                records.append((b"P", pending[:CRI_MAX_LINE] + b"\n"))
                pending = pending[CRI_MAX_LINE:]
            if records:
                s, ns = divmod(time.time_ns(), 10**9)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)).encode() + b".%09dZ" % ns
                cri_f.write(b"".join(b"%s stdout %s %s" % (stamp, tag, text) for tag, text in records))
            if not chunk:
                return


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return str(mounts[mount]) + value[len(mount) :]
    return value


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in command and args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def _publish_standin(pod: Any) -> int:
    """A stage that cannot run here hands over a one-file artifact through the real store and manifest path
    (with this process's store credentials: the test's MinIO)."""
    import tempfile

    from tunectl.stores import open_store

    args = list(pod.spec.containers[0].args or [])
    store_uri, run = args[args.index("--store") + 1], args[args.index("--run") + 1]
    stage = pod.metadata.labels["tunectl.dev/stage"]
    out = Path(tempfile.mkdtemp(prefix=f"standin-{stage}-"))
    try:
        (out / "STAND-IN.txt").write_text(f"stand-in output of {stage} for {run}\n")
        open_store(store_uri).publish(run, stage, out, {"notes": ["stand-in artifact (benchmark)"]})
        return 0
    finally:
        shutil.rmtree(out, ignore_errors=True)
