from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # tunectl renders Kubernetes runs with Helm: the pinned build `make cluster-tools` made, unless set already.
    from cluster.controlplane import helm_path

    os.environ.setdefault("TUNECTL_HELM", str(helm_path()))


def one_line_error(proc: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The one `error: ...` line a refused command prints, checked with its exit code (default: input, 78)."""
    from tunectl.errors import EXIT_CONFIG_ERROR

    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == (EXIT_CONFIG_ERROR if code is None else code), proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def no_runs(store: Path) -> None:
    """Nothing that could look like a run, complete or not, was created."""
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())


def run_stage(stage: str, recipe: Path, store: Path, run: str = "r1") -> subprocess.CompletedProcess[str]:
    """A stage program as a container runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"tunectl_jobs.{stage}", "--recipe", str(recipe), "--store", str(store), "--run", run],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tunectl(store: Path):
    """Run the real `tunectl` command against a store of the test's own."""

    def run(*args: str, check: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TUNECTL_STORE": str(store), "TUNECTL_BACKEND": "local"}
        proc = subprocess.run(
            [sys.executable, "-m", "tunectl.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"tunectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    return run


@pytest.fixture(scope="session")
def minio(tmp_path_factory):
    """One real MinIO for the session (tests take a bucket each)."""
    from minio_server import MinioServer

    server = MinioServer(tmp_path_factory.mktemp("minio") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ollama_server(tmp_path_factory):
    """One real Ollama server for the session; skipped (with the reason) where no build of it exists."""
    from ollama_server import OllamaServer, ollama_binary

    binary = ollama_binary()
    if binary is None:
        pytest.skip("no Ollama here: `make test` builds it (tests/ollama/build.sh), or put `ollama` on PATH")
    server = OllamaServer(binary, tmp_path_factory.mktemp("ollama"))
    server.start()
    yield server
    server.stop()


def new_bucket(minio, hint: str) -> str:
    import re
    import secrets

    name = re.sub(r"[^a-z0-9-]", "-", hint.lower())[:40].strip("-") + "-" + secrets.token_hex(3)
    minio.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(minio, request, monkeypatch) -> str:
    """A fresh bucket, with the standard AWS variables pointing at the test MinIO."""

    name = new_bucket(minio, request.node.name)
    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TUNECTL_S3_CACHE", str(Path(request.getfixturevalue("tmp_path")) / "s3-cache"))
    return name


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One Kubernetes control plane for the session (tests take a namespace each): etcd, kube-apiserver,
    kube-controller-manager and kube-scheduler on 127.0.0.1, kwok as the kubelet of two fake GPU nodes, kwok-gpu-0
    and kwok-gpu-1 (8 nvidia.com/gpu, 64 cpu, 512Gi, 110 pods each). With TUNECTL_TEST_KUBECONFIG set, the cluster
    that kubeconfig points at instead (e.g. kind), with `cluster.kwok` False so kwok-only tests can skip."""
    from cluster.controlplane import ControlPlane, ExternalCluster

    external = os.environ.get("TUNECTL_TEST_KUBECONFIG")
    if external:
        yield ExternalCluster(Path(external))
        return
    cp = ControlPlane(tmp_path_factory.mktemp("k8s"))
    cp.start()
    try:
        cp.add_nodes(2, gpus=8, cpu="64", memory="512Gi", pods=110, prefix="kwok-gpu")
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def namespace(cluster, request) -> str:
    """A fresh namespace named after the test, deleted (without waiting) afterwards."""
    name = cluster.new_namespace(request.node.name)
    yield name
    cluster.delete_namespace(name)


def docker_client() -> str | None:
    """A Docker client that can build with BuildKit: $DOCKER, `docker` with buildx, or Debian's docker.io."""
    import shutil

    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "buildx", "version"], capture_output=True).returncode == 0:
        return docker
    return "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else docker


def docker_engine() -> str | None:
    """The BuildKit-capable client, where a Docker engine answers it."""
    docker = docker_client()
    if docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return docker
    return None


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """The four images, built as `make images-local` builds them (Debian base from debootstrap, CPU); Docker's
    layer cache makes a rebuild with unchanged sources take seconds. Skips where no Docker engine answers."""
    from types import SimpleNamespace

    docker = docker_engine()
    if not docker:
        pytest.skip("no Docker engine answers here (CI starts one with .ci/docker-up)")
    log = tmp_path_factory.mktemp("images") / "build.log"
    env = {**os.environ, "DOCKER": docker}
    with open(log, "w") as out:
        for cmd in (
            ["images/base/build-local-base.sh", "tunectl-base:bookworm"],
            ["images/build.sh", "--base", "tunectl-base:bookworm", "--cpu"],
        ):
            if subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0:
                raise AssertionError(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
    from tunectl import __version__

    return SimpleNamespace(docker=docker, tag=__version__, log=log)
