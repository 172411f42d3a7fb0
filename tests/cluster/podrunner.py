"""The container runtime that kwok does not have, named for what it is: a stand-in kubelet executor.

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

import yaml

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
        docker: str | None = None,
    ):
        """`docker`: a Docker client; pods then run as containers of their images (as the kubelet would run
        them: same user, read-only root, no capabilities, volumes at their mount paths, in-cluster API access),
        on the host network so they reach the test's MinIO and API server on 127.0.0.1."""
        from kubernetes import client

        self.cluster, self.namespace, self.workdir, self.docker = cluster, namespace, workdir, docker
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
        if self.docker:
            cmd = self._docker_command(pod, container, mounts, root, files={message_path: message_file})
            env = dict(os.environ)
        else:
            env = self._env(pod, container, {**mounts, message_path: message_file}, root)
            cmd = [
                _rewrite(a, mounts) for a in _expand(list(container.command or []) + list(container.args or []), env)
            ]
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
        # A runtime reports a process killed by signal N as exit code 128 + N (`docker run` does so itself).
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

    def _docker_command(
        self, pod: Any, container: Any, mounts: dict[str, Path], root: Path, files: dict[str, Path]
    ) -> list[str]:
        """`docker run` for the pod's container: `mounts` are volume directories, `files` single files (the
        termination message), each bind-mounted at its path in the container."""
        sc = pod.spec.security_context
        csc = container.security_context
        cmd = [self.docker, "run", "--rm", "--name", f"{self.namespace}-{pod.metadata.name}"[:120], "--network", "host"]
        if sc and sc.run_as_user is not None:
            cmd += ["--user", f"{sc.run_as_user}:{sc.run_as_group if sc.run_as_group is not None else 0}"]
        if csc and csc.read_only_root_filesystem:
            cmd.append("--read-only")
        if csc and csc.capabilities and "ALL" in (csc.capabilities.drop or []):
            cmd += ["--cap-drop", "ALL"]
        if csc and csc.allow_privilege_escalation is False:
            cmd += ["--security-opt", "no-new-privileges"]
        shm = next((v.empty_dir.size_limit for v in pod.spec.volumes or [] if v.name == "dshm" and v.empty_dir), None)
        if shm:
            cmd += ["--shm-size", shm.replace("Gi", "g").replace("Mi", "m")]
        sa_path = "/var/run/secrets/kubernetes.io/serviceaccount"  # the API's projected volume: filled below
        for mount_path, host in mounts.items():
            if mount_path == sa_path:
                continue
            for d in [host, *host.rglob("*")]:
                d.chmod(0o777 if d.is_dir() else 0o644)  # an emptyDir is writable by the pod's user
            cmd += ["-v", f"{host}:{mount_path}"]
        env = self._env(pod, container, {}, root, for_container=True)
        if pod.spec.automount_service_account_token and pod.spec.service_account_name:
            # What the kubelet mounts, so the container finds the API with its in-cluster configuration.
            sa = root / "serviceaccount"
            sa.mkdir(exist_ok=True)
            kubeconfig = yaml.safe_load(Path(env.pop("KUBECONFIG")).read_text())
            (sa / "token").write_text(kubeconfig["users"][0]["user"]["token"])
            (sa / "namespace").write_text(self.namespace)
            (sa / "ca.crt").write_bytes(
                base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"])
            )
            for f in sa.iterdir():
                f.chmod(0o644)
            cmd += ["-v", f"{sa}:{sa_path}:ro"]
            host, port = self.cluster.server.removeprefix("https://").rsplit(":", 1)
            env |= {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        for path, host in files.items():
            cmd += ["-v", f"{host}:{path}"]
        for k, v in env.items():
            cmd += ["-e", f"{k}={v}"]
        argv = _expand(list(container.command or []) + list(container.args or []), env)
        return cmd + ["--entrypoint", argv[0], container.image, *argv[1:]]

    def _env(
        self, pod: Any, container: Any, mounts: dict[str, Path], root: Path, for_container: bool = False
    ) -> dict[str, str]:
        from tunectl_jobs.llamacpp import tree_dir

        if for_container:
            env = {"AWS_EC2_METADATA_DISABLED": "true"}  # the rest comes from the pod spec and the image
        else:
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
            if d in env and not for_container:
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
