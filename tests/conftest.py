from __future__ import annotations

import ast
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What a test needs, as its markers say (registered in pyproject.toml; `make test-fast` runs the tests with none of
# them, `make test-slow` the rest). A test whose tool is missing is skipped with the reason, except under
# TUNECTL_CI=1 (.ci/run), where every tool must be there and a missing one fails the test. `gpu` and `e2e` are not
# checked here: no CI machine has a GPU (test_gpu_unsloth.py skips by itself), and e2e needs what `ml` needs.
CI = os.environ.get("TUNECTL_CI") == "1"
ML_MODULES = ("torch", "transformers", "datasets", "peft", "trl", "llama_cpp")
NEEDS = ("helm", "minio", "cluster", "node", "docker", "ollama", "browser", "ml", "train", "e2e")
# Fixtures that start a tool mark the tests that use them, so a new test is placed in its tier by what it uses.
FIXTURE_MARKS = {
    "minio": "minio",
    "bucket": "minio",
    "cluster": "cluster",
    "namespace": "cluster",
    "node": "node",
    "node_images": "node",
    "images": "docker",
    "ollama_server": "ollama",
}


@functools.cache
def missing(need: str) -> str | None:
    """Why `need` is not available here, or None where it is."""
    if need == "helm":
        helm = os.environ.get("TUNECTL_HELM") or shutil.which("helm")
        ok = bool(helm) and os.access(helm, os.X_OK) and Path(helm).is_file()
        return None if ok else f"no Helm at {helm or 'TUNECTL_HELM or on PATH'}: `make cluster-tools` builds it"
    if need == "minio":
        from minio_server import MINIO_VERSION, tool_path

        path = tool_path("minio", MINIO_VERSION)
        return None if path.is_file() else f"no MinIO at {path}: `make tools` builds it"
    if need == "cluster":  # and Helm, which tunectl renders every Kubernetes run with
        if os.environ.get("TUNECTL_TEST_KUBECONFIG"):
            return missing("helm")
        from cluster.controlplane import COMPONENTS, binaries

        absent = [str(p) for name, p in binaries().items() if name in COMPONENTS and not p.is_file()]
        return f"no {', '.join(absent)}: `make cluster-tools` builds them" if absent else missing("helm")
    if need == "node":  # the test cluster's real node (kubelet + containerd), or an external cluster's nodes
        if os.environ.get("TUNECTL_TEST_KUBECONFIG"):
            return None
        from cluster.node import missing_host_tools

        absent = missing_host_tools()
        return f"the test node cannot run here: no {', '.join(absent)}" if absent else None
    if need == "docker":
        return None if docker_engine() else "no Docker engine answers here (CI starts one with .ci/docker-up)"
    if need == "ollama":
        from ollama_server import ollama_binary

        return None if ollama_binary() else "no Ollama: `make test-slow` builds it (tests/ollama/build.sh)"
    if need == "browser":  # Debian's chromium, driven by Playwright (the ML venv has it)
        exe = chromium()
        if exe is None:
            return "no Chromium (/usr/bin/chromium or TUNECTL_CHROMIUM): .ci/docker-up installs Debian's chromium"
        return None if importlib.util.find_spec("playwright") else "no playwright in this venv: `make setup`"
    if need in ("ml", "train", "e2e"):
        absent = [m for m in ML_MODULES if importlib.util.find_spec(m) is None]
        return f"no {', '.join(absent)} in this venv: the ML venv (`make setup`) has them" if absent else None
    raise ValueError(f"unknown need {need!r}")


def chromium() -> str | None:
    exe = os.environ.get("TUNECTL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return exe if os.access(exe, os.X_OK) else None


def requires(*needs: str) -> None:
    """Skip the calling test (fail it under TUNECTL_CI=1) unless everything it needs is here."""
    for need in needs:
        why = missing(need)
        if why and CI:
            pytest.fail(f"needs {need} and TUNECTL_CI=1: {why}", pytrace=False)
        if why:
            pytest.skip(f"needs {need}: {why}")


def pytest_configure(config):
    # tunectl renders Kubernetes runs with Helm: the pinned build `make cluster-tools` made, unless set already
    # (where there is none, tunectl looks for `helm` on PATH).
    from cluster.controlplane import helm_path

    if helm_path().is_file() or CI:
        os.environ.setdefault("TUNECTL_HELM", str(helm_path()))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Before `-m` selects: the marks of the fixtures a test uses count as its own.
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & FIXTURE_MARKS.keys():
            item.add_marker(FIXTURE_MARKS[fixture])


def pytest_runtest_setup(item):
    requires(*dict.fromkeys(m.name for m in item.iter_markers() if m.name in NEEDS))


def _module_marks(path: Path) -> set[str]:
    """The marks of a test module's `pytestmark = ...`, read from its source (for a module that could not import)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return set()
    return {
        node.attr
        for stmt in tree.body
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in stmt.targets)
        for node in ast.walk(stmt.value)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
    }


def _import_skip(report) -> str | None:
    """The reason of a skip by pytest.importorskip, else None."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
    return reason if "could not import" in reason else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Under TUNECTL_CI=1 a test must not skip for a module its tier's venv lacks: mark it `ml` (the ML venv's tier).
    report = (yield).get_result()
    if CI and report.skipped and _import_skip(report):
        report.outcome = "failed"
        report.longrepr = f"{_import_skip(report)} (TUNECTL_CI=1: mark a test that needs the ML venv `ml`)"
    # A failed cluster test shows what the cluster saw (pods, events, the node's disk), not only its last wait.
    if report.when == "call" and report.failed:
        args = getattr(item, "funcargs", {})
        readers = {"kube": lambda kube: kube.diagnose(), "node": lambda node: node.disk_problem() or "disk ok"}
        for name in [n for n in readers if n in args]:
            try:
                report.sections.append((f"test cluster ({name})", readers[name](args[name])))
            except Exception as e:  # noqa: BLE001 - the cluster itself may be what failed
                report.sections.append((f"test cluster ({name})", f"could not be read: {e}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # The same for a module that skips itself at import: fine where its pytestmark sends it to the ML venv's tier.
    report = (yield).get_result()
    path = getattr(collector, "path", None)
    if CI and report.skipped and _import_skip(report) and path and not _module_marks(path) & {"ml", "train", "e2e"}:
        report.outcome = "failed"
        report.longrepr = f"{path}: {_import_skip(report)} (TUNECTL_CI=1: give it `pytestmark = pytest.mark.ml`)"


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

    requires("minio")
    server = MinioServer(tmp_path_factory.mktemp("minio") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ollama_server(tmp_path_factory):
    """One real Ollama server for the session; skipped (with the reason) where no build of it exists."""
    from ollama_server import OllamaServer, ollama_binary

    requires("ollama")
    server = OllamaServer(ollama_binary(), tmp_path_factory.mktemp("ollama"))
    server.start()
    yield server
    server.stop()


def cli_on_store(store: str, env: dict[str, str]):
    """`tunectl --store STORE ...` in a child process with `env`, asserted to succeed (the e2e tests' runs)."""

    def tunectl(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "tunectl.cli", "--store", store, *args],
            capture_output=True,
            text=True,
            env={**env, **(extra_env or {})},
            timeout=3600,
        )
        assert proc.returncode == 0, f"tunectl {' '.join(args)}:\n{proc.stderr[-4000:]}"
        return proc

    return tunectl


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

    requires("cluster")
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


@pytest.fixture(scope="session")
def node(cluster, tmp_path_factory):
    """Where pods really run: the test control plane's real node, `localhost` (kubelet + containerd on this host,
    tests/cluster/node.py; fake nvidia.com/gpu capacity), which must leave nothing behind when it stops. For an
    external cluster, its own nodes: `values()` adds nothing and images are yours to load (`kind load`)."""
    requires("node")
    if not cluster.kwok:
        from cluster.node import ExternalNodes

        yield ExternalNodes()
        return
    from cluster.node import RealNode

    real = RealNode(cluster, tmp_path_factory.mktemp("node"))
    real.start()
    try:
        yield real
    finally:
        real.stop()
    left = real.leftovers()
    assert not left, f"the test node left behind: {left}"


@pytest.fixture(scope="session")
def node_images(node, images) -> list[str]:
    """The four images, built as `make images-local` builds them, imported into the node's containerd."""
    refs = [f"tunectl-{name}:{images.tag}" for name in ("train", "export", "gguf", "controller")]
    node.import_images(images.docker, refs)
    return refs


@pytest.fixture
def namespace(cluster, request) -> str:
    """A fresh namespace named after the test, deleted (without waiting) afterwards."""
    name = cluster.new_namespace(request.node.name)
    yield name
    cluster.delete_namespace(name)


def docker_client() -> str | None:
    """A Docker client that can build with BuildKit: $DOCKER, `docker` with buildx, or Debian's docker.io."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "buildx", "version"], capture_output=True).returncode == 0:
        return docker
    return "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else docker


@functools.cache
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

    requires("docker")
    docker = docker_engine()
    log = tmp_path_factory.mktemp("images") / "build.log"
    _build_images(docker, log, ["images/base/build-local-base.sh", "tunectl-base:bookworm"])
    _build_images(docker, log, ["images/build.sh", "--base", "tunectl-base:bookworm", "--cpu"])
    from tunectl import __version__

    return SimpleNamespace(docker=docker, tag=__version__, log=log)


@pytest.fixture(scope="session")
def gpu_images(images):
    """The train and export images as a GPU cluster runs them (Unsloth, bitsandbytes and PyPI's CUDA torch, which
    carries the CUDA runtime; the driver comes from the node), on the same local Debian base, tagged VERSION-gpu.
    No GPU here: what can be checked is what they install and the libraries they would load."""
    from types import SimpleNamespace

    tag = f"{images.tag}-gpu"
    _build_images(images.docker, images.log, ["images/build.sh", "--tag", tag, "--base", "tunectl-base:bookworm",
                                              "train", "export"])  # fmt: skip
    return SimpleNamespace(docker=images.docker, tag=tag)


def _build_images(docker: str, log: Path, cmd: list[str]) -> None:
    """Run an image build script from the repository root, its output appended to `log`; a failure shows the tail."""
    with open(log, "a") as out:
        if subprocess.run(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "DOCKER": docker}
        ).returncode:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
