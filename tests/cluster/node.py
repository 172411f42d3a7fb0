"""A real node for the test control plane: a kubelet built from the pinned Kubernetes modules and a containerd of
its own (Debian's, as a second instance beside Docker's), on this host, registered as node `localhost`.

    node = RealNode(cp, workdir, gpus=2); node.start()
    node.import_images(docker, ["tunectl-train:0.1.0", ...])   # docker save | ctr import; pods use pullPolicy Never
    node.stop()                                                  # kills, unmounts and removes what it made

What it is: the kubelet runs pods as Kubernetes runs them (volumes, env from Secrets, projected ServiceAccount
tokens, security contexts, memory limits in cgroups, termination messages, logs served to the apiserver, SIGTERM
and grace periods on deletion). What it is not, because this machine withholds it: a pod network (hostNetwork
pods only: no bridge may be made here, so every pod shares the host's 127.0.0.1), kube-proxy and cluster DNS (a pod
reaches the API server at 127.0.0.1, told so by KUBERNETES_SERVICE_HOST/PORT), GPUs (`nvidia.com/gpu` capacity is
patched into the node status, as for any extended resource no device plugin manages) and a registry (images are
imported from the local Docker engine).

The node carries the taint `tunectl.test/real-node=true:NoSchedule` so pods meant for kwok's fake nodes never land
on it; `RealNode.values()` gives the chart values a run needs to be placed here instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

from .controlplane import (
    GPU,
    ClusterError,
    ControlPlane,
    _die_with_parent,
    _serving_cert,
    _write_private,
    binaries,
    free_port,
)
from .wait import wait_for

# What the pods of a test need on the node's filesystem beyond the images (outputs of the tiny model, logs).
MIN_FREE_DISK = 4 * 2**30
NODE_NAME = "localhost"  # the kubelet refuses a loopback node IP, so the apiserver reaches it by this Hostname
TAINT = {"key": "tunectl.test/real-node", "value": "true", "effect": "NoSchedule"}
LABEL = ("tunectl.test/node", "real")
PAUSE_IMAGE = "docker.io/tunectl-test/pause:1"
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CGROUP_FS = Path("/sys/fs/cgroup")
# Kernel settings the kubelet changes when it starts (protectKernelDefaults: false); put back on stop.
KERNEL_TUNABLES = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")  # fmt: skip


def missing_host_tools() -> list[str]:
    """What this host lacks to run the node (empty when it can): root, containerd, runc, the loopback CNI plugin,
    the kubelet and pause binaries (`make cluster-tools`)."""
    missing = [] if os.geteuid() == 0 else ["root (the kubelet manages cgroups and mounts)"]
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if not any((Path(d) / tool).is_file() for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin")):
            missing.append(f"{tool} (apt-get install containerd runc)")
    if not (CNI_BIN / "loopback").is_file():
        missing.append(f"{CNI_BIN}/loopback (apt-get install containernetworking-plugins)")
    bins = binaries()
    for name in ("kubelet", "pause"):
        if not bins[name].is_file():
            missing.append(f"{bins[name]} (make cluster-tools)")
    return missing


class RealNode:
    def __init__(self, cp: ControlPlane, workdir: Path, gpus: int = 2):
        self.cp, self.gpus = cp, gpus
        self.workdir = Path(workdir)
        self.bins = binaries()
        self.id = secrets.token_hex(4)
        # Its own cgroup parent in every hierarchy, so stop() can find and kill everything the node started.
        self.cgroup_root = f"/tunectl-node-{self.id}"
        # Unix socket paths are limited to 107 bytes: containerd's state (sockets, task bundles) goes in a short dir.
        self.state = Path(f"/run/tunectl-node-{self.id}")
        self.root = self.workdir / "containerd"
        self.socket = self.state / "containerd.sock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._tunables: dict[str, str] = {}
        self.port = self._healthz_port = 0

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        missing = missing_host_tools()
        if missing:
            raise ClusterError(f"the test node cannot run here: missing {', '.join(missing)}")
        deadline = time.monotonic() + timeout
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.state.mkdir(mode=0o700)
            self._tunables = {t: (Path("/proc/sys") / t).read_text() for t in KERNEL_TUNABLES}
            self._make_cgroups()
            self._spawn("containerd", ["containerd", "--config", str(self._containerd_config())])
            self._wait("containerd", lambda: self.ctr("version").returncode == 0, deadline)
            self._import(self._pause_image_archive())
            self.port, self._healthz_port = free_port(), free_port()
            args = self._kubelet_files()
            # No /usr/sbin: without iptables in its PATH the kubelet leaves the host's firewall tables alone.
            self._spawn("kubelet", [str(self.bins["kubelet"]), *args], path="/usr/local/bin:/usr/bin:/bin")
            self._wait("the node to register", self._registered, deadline)
            self._advertise_gpus()
            self._wait("the node to be Ready", self._ready, deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the kubelet, containerd, every container (by its cgroups) and containerd's shims; unmount what is
        mounted under the node's dirs; remove its cgroups; put the kernel settings back."""
        # containerd before the containers: once it is gone nothing starts a shim or a container (it would, to clean
        # up after the shims killed below); the shims keep the containers running until their cgroups are emptied.
        self._kill("kubelet")
        self._kill("containerd")
        for _ in range(3):  # a process may fork while the first pass runs
            self._kill_cgroup_members()
        self._kill_shims()
        self._unmount_all()
        self._remove_cgroups()
        for tunable, value in self._tunables.items():
            try:
                (Path("/proc/sys") / tunable).write_text(value)
            except OSError:
                pass
        # The image store (GBs: every imported image twice, as blobs and unpacked) and the pods' volumes; the logs stay.
        for path in (self.state, self.root, self.workdir / "kubelet"):
            if path.exists():
                subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, name: str, chars: int = 4000) -> str:
        log = self.workdir / f"{name}.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"

    # -- for tests --------------------------------------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """Chart values that place a run on this node and let its pods work without a pod network: the host's
        network, the API server's real address for the reconciler, images from the node only."""
        host, port = self.cp.server.removeprefix("https://").rsplit(":", 1)
        here = {
            "nodeSelector": {LABEL[0]: LABEL[1]},
            "tolerations": [{"key": TAINT["key"], "operator": "Exists", "effect": TAINT["effect"]}],
        }
        return {
            "hostNetwork": True,
            "reconciler": {"apiServer": {"host": host, "port": int(port)}, **here},
            "image": {"pullPolicy": "Never"},
            "scheduling": here,
        }

    def ctr(self, *args: str, stdin: Any = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            stdin=stdin,
            capture_output=True,
            timeout=timeout,
        )

    def import_images(self, docker: str, refs: list[str], timeout: float = 1200) -> None:
        """`docker save` the images in one archive (shared layers once) straight into this node's containerd. The
        store keeps each layer twice (the archive's blob and its unpacked snapshot), so the host needs twice the
        images' size free, and room for the pods after that."""
        need = 2 * _images_size(docker, refs) + MIN_FREE_DISK
        if shutil.disk_usage(self.workdir).free < need:
            raise ClusterError(self.disk_problem(need) or "not enough disk")
        save = subprocess.Popen([docker, "save", *refs], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            imported = self.ctr("images", "import", "-", stdin=save.stdout, timeout=timeout)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save_err = save.stderr.read().decode(errors="replace") if save.stderr else ""
            save.wait()
        if save.returncode != 0 or imported.returncode != 0:
            raise ClusterError(
                f"importing {', '.join(refs)} into the test node failed: {save_err.strip()} "
                f"{imported.stderr.decode(errors='replace').strip()}"
            )

    def disk_problem(self, need: int = MIN_FREE_DISK) -> str | None:
        """One line when the filesystem holding the node's images and volumes has less than `need` bytes free, or
        the kubelet reports disk pressure; None when pods can run."""
        from kubernetes import client

        free = shutil.disk_usage(self.workdir).free
        if free < need:
            return (
                f"the test node has {free / 2**30:.1f} GiB free on {self.workdir} and needs {need / 2**30:.0f}: "
                "free disk space (old pytest temp dirs under /tmp/pytest-of-*, `docker image prune`) and run again"
            )
        with self.cp.api_client() as api:
            node = client.CoreV1Api(api).read_node(NODE_NAME)
        for c in node.status.conditions or []:
            if c.type == "DiskPressure" and c.status == "True":
                return f"the test node reports disk pressure ({c.message}); {free / 2**30:.1f} GiB free here"
        return None

    def image_refs(self) -> list[str]:
        out = self.ctr("images", "list", "--quiet").stdout.decode()
        return [line for line in out.splitlines() if line and not line.startswith("sha256:")]

    def leftovers(self) -> list[str]:
        """What a stopped node left behind (empty after a clean stop): processes, mounts, cgroups, its dirs."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if str(self.socket) in cmdline or str(self.workdir) in cmdline:
                    found.append(f"process {proc.name}: {cmdline[:200]}")
        found += [f"mount {m}" for m in self._mounts()]
        found += [f"cgroup {d}" for d in self._cgroup_dirs() if d.exists()]
        found += [f"dir {d}" for d in (self.state, self.root, self.workdir / "kubelet") if d.exists()]
        return found

    # -- containerd -------------------------------------------------------------------------------------------------

    def _containerd_config(self) -> Path:
        cni = self.workdir / "cni"
        cni.mkdir(exist_ok=True)
        # Only the loopback plugin: hostNetwork pods need no more, and a pod network would need a bridge.
        (cni / "10-loopback.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": "loopback", "plugins": [{"type": "loopback"}]})
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.root}"
state = "{self.state}"
# Plugins that would look for other machinery or share paths with a system containerd.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[metrics]
  address = ""

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM withholds CAP_SYS_RESOURCE: never lower a container's oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni}"
"""
        path = self.workdir / "containerd.toml"
        path.write_text(config)
        return path

    def _pause_image_archive(self) -> bytes:
        """An OCI image archive holding only the static pause binary, named PAUSE_IMAGE (no registry here)."""
        blobs: dict[str, bytes] = {}

        def blob(data: bytes) -> dict[str, Any]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            blobs[digest] = data
            return {"digest": digest, "size": len(data)}

        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            data = self.bins["pause"].read_bytes()
            info = tarfile.TarInfo("pause")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        layer_desc = blob(layer.getvalue())
        platform = {"architecture": "amd64", "os": "linux"}
        config = {**platform, "config": {"Entrypoint": ["/pause"]},
                  "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}  # fmt: skip
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode())},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
        }
        index = {
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": manifest["mediaType"], **blob(json.dumps(manifest).encode()), "platform": platform,
                "annotations": {"io.containerd.image.name": PAUSE_IMAGE},
            }],
        }  # fmt: skip
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": json.dumps(index).encode()}
            files |= {f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in blobs.items()}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()

    def _import(self, archive: bytes) -> None:
        proc = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", "images", "import", "-"],
            input=archive,
            capture_output=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise ClusterError(f"ctr images import failed: {proc.stderr.decode(errors='replace')}")

    # -- kubelet ----------------------------------------------------------------------------------------------------

    def _kubelet_files(self) -> list[str]:
        w = self.workdir
        ca = self.cp.ca_file
        _serving_cert_from(self.cp.workdir, w, "kubelet-serving", f"DNS:{NODE_NAME},IP:127.0.0.1")
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.cp.server, "certificate-authority": str(ca)}}],
            "users": [{"name": "node", "user": {"token": self.cp.node_token}}],
            "contexts": [{"name": "node", "context": {"cluster": "test", "user": "node"}}],
            "current-context": "node",
        }
        _write_private(w / "kubelet.kubeconfig", yaml.safe_dump(kubeconfig))
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self._healthz_port,
            "tlsCertFile": str(w / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(w / "kubelet-serving.key"),
            # The apiserver calls in (logs, exec) with a client certificate from the test CA; what it may do is
            # asked of the apiserver (SubjectAccessReview), as on a real node.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,  # this VM mounts cgroup v1 (plus a v2 `unified` hierarchy)
            "failSwapOn": False,
            "registerWithTaints": [TAINT],
            "maxPods": 30,
            # Images come only from an import here: never collect them. Evict only when the disk is truly full:
            # under disk pressure the kubelet first deletes unused images, the pause image among them (containerd
            # 1.6 does not pin it), and every later pod then waits in ContainerCreating for a pull that cannot be.
            # A host short of disk is named by RealNode.disk_problem() instead.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "64Mi",
                "imagefs.available": "64Mi",
                "nodefs.inodesFree": "1%",
            },  # fmt: skip
            "resolvConf": "",
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "5s",
            "shutdownGracePeriod": "0s",
            "logging": {"format": "text"},
        }
        (w / "kubelet.yaml").write_text(yaml.safe_dump(config))
        return [
            f"--config={w / 'kubelet.yaml'}",
            f"--kubeconfig={w / 'kubelet.kubeconfig'}",
            f"--root-dir={w / 'kubelet'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-labels={LABEL[0]}={LABEL[1]}",
        ]

    def _registered(self) -> bool:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.cp.api_client() as api:
            try:
                client.CoreV1Api(api).read_node(NODE_NAME)
                return True
            except ApiException:
                return False

    def _advertise_gpus(self) -> None:
        """Fake `nvidia.com/gpu` capacity, as the docs' "advertise extended resources for a node" does: the kubelet
        keeps an extended resource it does not manage, and admits pods that request it."""
        from kubernetes import client

        if not self.gpus:
            return
        with self.cp.api_client() as api:
            core = client.CoreV1Api(api)
            patch = [{"op": "add", "path": f"/status/capacity/{GPU.replace('/', '~1')}", "value": str(self.gpus)}]
            wait_for(
                lambda: core.patch_node_status(NODE_NAME, patch) and True,
                30,
                "the GPU capacity patch",
                ignore=(client.exceptions.ApiException,),
            )

    def _ready(self) -> bool:
        from kubernetes import client

        with self.cp.api_client() as api:
            node = client.CoreV1Api(api).read_node(NODE_NAME)
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        gpus = (node.status.allocatable or {}).get(GPU) == str(self.gpus) if self.gpus else True
        tainted = any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints or [])
        return ready and gpus and not tainted

    # -- processes --------------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], path: str | None = None) -> None:
        env = dict(os.environ)
        if path:
            env["PATH"] = path
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    def _wait(self, what: str, ready: Any, deadline: float) -> None:
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with {proc.returncode} waiting for {what}:\n{self.log_tail(name)}"
                    )
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}:\n{self.log_tail('kubelet')}")
            time.sleep(0.2)

    def _kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _kill_shims(self) -> None:
        # containerd's shims outlive it by design (they re-parent to init); ours name our socket on their command line.
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_for(lambda: not any(self._shim_pids()), 10, "the shims to exit", interval=0.1)

    def _shim_pids(self) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if str(self.socket).encode() in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
                except OSError:
                    pass
        return pids

    # -- cgroups and mounts -----------------------------------------------------------------------------------------

    def _hierarchies(self) -> list[Path]:
        return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink())

    def _cgroup_dirs(self) -> list[Path]:
        return [h / self.cgroup_root.lstrip("/") for h in self._hierarchies()]

    def _make_cgroups(self) -> None:
        for d in self._cgroup_dirs():
            d.mkdir()
            if d.parent.name == "cpuset":  # a v1 cpuset cgroup takes no task until it has CPUs and memory nodes
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((d.parent / f).read_text())

    def _kill_cgroup_members(self) -> None:
        for top in self._cgroup_dirs():
            if not top.exists():
                continue
            for procs in top.rglob("cgroup.procs"):
                try:
                    pids = procs.read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def _remove_cgroups(self) -> None:
        for top in self._cgroup_dirs():
            if not top.exists():
                continue
            # Deepest first; a cgroup whose last process is still exiting refuses rmdir for a moment.
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)

    def _mounts(self) -> list[str]:
        roots = (str(self.workdir) + "/", str(self.state) + "/")
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(roots):
                found.append(point)
        return found

    def _unmount_all(self) -> None:
        for point in sorted(self._mounts(), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True)


def _serving_cert_from(ca_dir: Path, out_dir: Path, name: str, san: str) -> None:
    """A serving certificate signed by the control plane's CA (in ca_dir), written to out_dir."""
    _serving_cert(ca_dir, name, san)
    for ext in ("crt", "key"):
        (out_dir / f"{name}.{ext}").write_bytes((ca_dir / f"{name}.{ext}").read_bytes())
        (out_dir / f"{name}.{ext}").chmod(0o600)


class ExternalNodes:
    """The nodes of a cluster you bring (TUNECTL_TEST_KUBECONFIG, e.g. kind): they have a pod network, kube-proxy
    and DNS, so a run needs no extra values; load the images yourself (`kind load docker-image tunectl-train:TAG
    ...`, docs/kubernetes.md)."""

    def values(self) -> dict[str, Any]:
        return {}

    def import_images(self, docker: str, refs: list[str]) -> None:
        pass

    def disk_problem(self) -> str | None:
        return None  # the cluster's own kubelets report theirs as events


def _images_size(docker: str, refs: list[str]) -> int:
    """The bytes of the images' layers, each layer once however many of the images share it (docker reports each
    image's size with its shared layers counted again): about the size of their `docker save` archive."""
    layers: set[tuple[str, int]] = set()
    for ref in refs:
        history = subprocess.run(
            [docker, "history", "--no-trunc", "--human=false", "--format", "{{.CreatedBy}}\t{{.Size}}", ref],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        # A shared layer has the same instruction and size in every image built on it.
        layers |= {(line.rsplit("\t", 1)[0], int(line.rsplit("\t", 1)[1])) for line in history.stdout.splitlines()}
    return sum(size for _, size in layers)
