"""Which backend a command uses (`--backend auto`), the options every run command takes before or after its name,
and what the CLI says when the configured cluster cannot be reached: a kubeconfig pointing at a closed port, and
at a port that accepts TCP and then never answers, so the client's timeouts are really exercised. The last tests
run against the real control plane: a run only the cluster holds, a repeated create, a cut connection."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

from tunectl.backend import auto_order, order
from tunectl.errors import EXIT_CONFIG_ERROR
from tunectl.stores import LocalStore

LOCAL_RUN = "tiny-20261201-100000-abcd"
CLUSTER_RUN = "tiny-20261201-110000-beef"
TIMEOUT = 2  # TUNECTL_KUBE_TIMEOUT for these tests


# -- the rule, as a table ------------------------------------------------------------------------------------


def test_the_auto_rule():
    assert auto_order("submit", kubeconfig=False, store_uri="s3://b/p") == ("local",)
    assert auto_order("submit", kubeconfig=True, store_uri="/home/me/store") == ("local",)  # pods cannot read it
    assert auto_order("submit", kubeconfig=True, store_uri="s3://b/p") == ("kubernetes",)
    for command in ("run", "list"):
        assert auto_order(command, kubeconfig=True, store_uri="/s") == ("local", "kubernetes")
        assert auto_order(command, kubeconfig=False, store_uri="s3://b") == ("local",)
    assert order("kubernetes", "run", kubeconfig=False, store_uri="/s") == ("kubernetes",)
    assert order("local", "submit", kubeconfig=True, store_uri="s3://b") == ("local",)


# -- the retry helper, with a stand-in for one API method ----------------------------------------------------


def _flaky(*failures: BaseException):
    """An API method that raises `failures` in turn, then answers; records the kwargs of every attempt."""
    calls: list[dict] = []
    left = list(failures)

    def method(*args, **kwargs):
        calls.append(kwargs)
        if left:
            raise left.pop(0)
        return "answer"

    return method, calls


def test_api_call_retries_what_is_worth_retrying_and_nothing_else(monkeypatch):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

    from tunectl.kube import api_call

    monkeypatch.setenv("TUNECTL_KUBE_TIMEOUT", "7")
    slept: list[float] = []
    throttled = ApiException(status=429, reason="Too Many Requests")
    throttled.headers = {"Retry-After": "3"}
    method, calls = _flaky(ApiException(status=503), throttled, NewConnectionError(None, "refused"))
    assert api_call(method, "ns", sleep=slept.append) == "answer"
    assert slept == [0.5, 3.0, 2.0] and len(calls) == 4  # backoff doubles; a 429's Retry-After is honoured
    assert all(c["_request_timeout"] == 7.0 for c in calls)  # every attempt carries the request timeout
    method, calls = _flaky(ProtocolError("Connection broken: IncompleteRead"), ApiException(status=504))
    assert api_call(method, sleep=slept.append) == "answer" and len(calls) == 3

    for final in (ApiException(status=404), ApiException(status=409), ApiException(status=422)):
        method, calls = _flaky(final)
        with pytest.raises(ApiException):
            api_call(method, sleep=slept.append)
        assert len(calls) == 1
    method, calls = _flaky(ReadTimeoutError(None, "/api", "read timed out"))  # the timeout is the user's bound
    with pytest.raises(ReadTimeoutError):
        api_call(method, sleep=slept.append)
    assert len(calls) == 1
    method, calls = _flaky(*[ApiException(status=500)] * 5)  # gives up after 3 retries
    with pytest.raises(ApiException):
        api_call(method, sleep=lambda s: None)
    assert len(calls) == 4
    method, calls = _flaky()
    api_call(method, _request_timeout=(3, None))  # a caller's own timeout stays (a followed log)
    assert calls[0]["_request_timeout"] == (3, None)


def test_a_bad_timeout_setting_is_one_line(tunectl_env, tmp_path):
    env = {**tunectl_env, "TUNECTL_KUBE_TIMEOUT": "soon"}
    proc = cli(env, "status", CLUSTER_RUN, "--backend", "kubernetes")
    assert "TUNECTL_KUBE_TIMEOUT='soon' must be a number of seconds" in one_line_error(proc, EXIT_CONFIG_ERROR)


# -- the CLI against clusters that do not answer -------------------------------------------------------------


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunectl.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def timed(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t = time.monotonic()
    proc = cli(env, *args)
    return proc, time.monotonic() - t


def fake_local_run(store: Path, run: str = LOCAL_RUN) -> None:
    s = LocalStore(store)
    s.write_json(
        f"runs/{run}/run.json",
        {"run": run, "recipe": "tiny", "backend": "local", "created": "2026-12-01T10:00:00+00:00", "stages": ["train"]},
    )
    s.write_json(f"runs/{run}/state.json", {"train": {"state": "succeeded"}})


def write_kubeconfig(path: Path, server: str, namespace: str = "default", ca: str | None = None) -> Path:
    cluster = {"server": server, **({"certificate-authority-data": ca} if ca else {"insecure-skip-tls-verify": True})}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "unreachable", "context": {"cluster": "c", "user": "u", "namespace": namespace}}],
                "current-context": "unreachable",
            }
        )
    )
    return path


@pytest.fixture
def tunectl_env(tmp_path) -> dict[str, str]:
    """The environment of a user with a local store and no kubeconfig (a test adds one); backend auto."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNECTL_") or k == "TUNECTL_HELM"}
    env.update(
        {
            "HOME": str(tmp_path / "home"),
            "TUNECTL_STORE": str(tmp_path / "store"),
            "TUNECTL_KUBE_TIMEOUT": str(TIMEOUT),
            "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
        }
    )
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


@contextlib.contextmanager
def blackhole():
    """A port that completes the TCP handshake (the kernel's listen backlog) and never says a word."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.mark.parametrize("server", ["closed port", "blackhole"])
def test_an_unreachable_cluster_never_delays_a_local_run_and_is_named_for_a_cluster_run(tunectl_env, tmp_path, server):
    fake_local_run(tmp_path / "store")
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(blackhole()) if server == "blackhole" else closed_port()
        env = {**tunectl_env, "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{port}"))}

        proc, took = timed(env, "status", LOCAL_RUN)  # found in the local store: the cluster is never asked
        assert proc.returncode == 0, proc.stderr
        assert f"run {LOCAL_RUN} (tiny, local): succeeded" in proc.stdout and took < 5, took

        proc, took = timed(env, "status", CLUSTER_RUN)  # not here: the cluster is asked, and does not answer
        line = one_line_error(proc, 1)
        store = (tmp_path / "store").as_uri()
        why = "refused or dropped the connection" if server == "closed port" else f"did not answer within {TIMEOUT}s"
        assert line.startswith(
            f"error: no run '{CLUSTER_RUN}' in {store}, and the cluster could not be asked: "
            f"the Kubernetes API at https://127.0.0.1:{port} {why}"
        ), line
        # closed: 4 attempts 0.5 + 1 + 2 s apart; blackhole: one attempt of TIMEOUT seconds (timeouts are final)
        assert took < (3.5 + 5 if server == "closed port" else TIMEOUT + 5), took

        proc, took = timed(env, "status", CLUSTER_RUN, "--backend", "kubernetes", "-o", "json")
        line = one_line_error(proc, 1)
        assert line.startswith(
            f"error: looking for run {CLUSTER_RUN} in namespace default (context unreachable): the Kubernetes API at"
        ), line
        assert why in line and line.endswith("is the cluster up? (context unreachable; KUBECONFIG)"), line

        # list: the local runs, and a note that the cluster's were not listed
        proc, took = timed(env, "list")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[1].split()[:2] == [LOCAL_RUN, "succeeded"]
        assert f"note: kubernetes runs not listed: listing runs: the Kubernetes API at https://127.0.0.1:{port}" in (
            proc.stderr
        )
        assert f"listed local: {store}\n" in proc.stderr
        proc = cli(env, "list", "--backend", "kubernetes")
        assert why in one_line_error(proc, 1)


def test_without_a_kubeconfig_everything_is_local(tunectl_env, tmp_path):
    fake_local_run(tmp_path / "store")
    rows = json.loads(cli(tunectl_env, "list", "-o", "json").stdout)
    assert rows == [
        {
            "run": LOCAL_RUN,
            "recipe": "tiny",
            "state": "succeeded",
            "created": "2026-12-01T10:00:00+00:00",
            "backend": "local",
            "store": (tmp_path / "store").as_uri(),  # where it was found (its record names none)
        }
    ]
    proc = cli(tunectl_env, "status", CLUSTER_RUN)
    assert one_line_error(proc, 1) == f"error: no run '{CLUSTER_RUN}' in {(tmp_path / 'store').as_uri()}; " + (
        f"known runs: {LOCAL_RUN}"
    )
    line = one_line_error(cli(tunectl_env, "cancel", LOCAL_RUN), EXIT_CONFIG_ERROR)
    assert line == "error: cancel is for Kubernetes runs; stop a local run with Ctrl-C"
    line = one_line_error(cli(tunectl_env, "logs", LOCAL_RUN, "--follow"), EXIT_CONFIG_ERROR)
    assert line == "error: --follow is for Kubernetes runs; a local run streams while it runs"


# -- options before or after the command ---------------------------------------------------------------------


@pytest.mark.helm
@pytest.mark.helm
def test_shared_options_go_before_or_after_the_command_and_after_wins(tunectl_env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fake_local_run(a, "in-a-20261201-100000-abcd")
    fake_local_run(b, "in-b-20261201-100000-abcd")
    env = {k: v for k, v in tunectl_env.items() if k != "TUNECTL_STORE"}

    def runs(*args: str, environ: dict[str, str] = env) -> list[str]:
        proc = cli(environ, *args)
        assert proc.returncode == 0, proc.stderr
        return [r["run"] for r in json.loads(proc.stdout)]

    assert runs("--store", str(a), "list", "-o", "json") == ["in-a-20261201-100000-abcd"]
    assert runs("list", "-o", "json", "--store", str(b)) == ["in-b-20261201-100000-abcd"]
    assert runs("--store", str(a), "list", "--store", str(b), "-o", "json") == ["in-b-20261201-100000-abcd"]
    assert runs("list", "--store", str(b), "-o", "json", environ={**env, "TUNECTL_STORE": str(a)}) == [
        "in-b-20261201-100000-abcd"
    ]
    proc = cli(env, "status", "in-a-20261201-100000-abcd", "--store", str(a), "--backend", "local")
    assert proc.returncode == 0 and ": succeeded" in proc.stdout.splitlines()[0], proc.stderr
    # The example: accepted (it stops at the next check, which is what this test needs).
    proc = cli(env, "submit", "ruozhiba-tiny", "--store", str(a), "--backend", "local", "-f", str(tmp_path / "v.yaml"))
    line = one_line_error(proc, EXIT_CONFIG_ERROR)
    assert line == "error: --values and --helm-set are for Kubernetes runs (--backend kubernetes)"
    # render: the namespace after the command
    proc = cli(env, "render", "ruozhiba-tiny", "--store", "s3://bucket/runs", "-n", "ml", "--run", "r-1")
    assert proc.returncode == 0, proc.stderr
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(proc.stdout)} == {"ml"}
    proc = cli(env, "--namespace", "ml", "render", "ruozhiba-tiny", "--store", "s3://b/r", "--namespace", "Bad_NS")
    assert "namespace 'Bad_NS' must be a DNS-1123 label" in one_line_error(proc, EXIT_CONFIG_ERROR)


# -- against the real control plane --------------------------------------------------------------------------


@pytest.mark.cluster
def test_auto_finds_a_run_only_the_cluster_holds_and_lists_both(cluster, namespace, tunectl_env, tmp_path):
    from kubernetes import client

    fake_local_run(tmp_path / "store")
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_config_map(
            namespace,
            {
                "metadata": {
                    "name": f"{CLUSTER_RUN}-recipe",
                    "labels": {
                        "tunectl.dev/run": CLUSTER_RUN,
                        "tunectl.dev/recipe": "tiny",
                        "app.kubernetes.io/managed-by": "tunectl",
                        "app.kubernetes.io/component": "recipe",
                    },
                    "annotations": {"tunectl.dev/stages": "train,merge", "tunectl.dev/store": "s3://b/p"},
                },
                "data": {"recipe.yaml": "name: tiny\n"},
            },
        )
    env = {**tunectl_env, "KUBECONFIG": str(cluster.kubeconfig), "TUNECTL_NAMESPACE": namespace}
    doc = json.loads(cli(env, "status", CLUSTER_RUN, "-o", "json").stdout)
    assert (doc["backend"], doc["namespace"], doc["state"]) == ("kubernetes", namespace, "incomplete")
    assert [(s["stage"], s["state"]) for s in doc["stages"]] == [("train", "missing"), ("merge", "missing")]
    assert ": incomplete" in cli(env, "status", CLUSTER_RUN).stdout.splitlines()[0]
    assert ": succeeded" in cli(env, "status", LOCAL_RUN).stdout.splitlines()[0]  # the local store first

    proc = cli(env, "list")
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: (ln.split()[1], ln.split()[-1]) for ln in proc.stdout.splitlines()[1:]}
    assert rows == {LOCAL_RUN: ("succeeded", "local"), CLUSTER_RUN: ("incomplete", "kubernetes")}
    assert f"listed local: {(tmp_path / 'store').as_uri()}; kubernetes: namespace {namespace} (context " in proc.stderr
    rows = json.loads(cli(env, "list", "-o", "json").stdout)
    assert [(r["run"], r["backend"], r.get("namespace")) for r in rows] == [
        (LOCAL_RUN, "local", None),
        (CLUSTER_RUN, "kubernetes", namespace),
    ]
    proc = cli(env, "status", "nowhere-20261201-000000-0000")
    assert one_line_error(proc, 1) == (
        f"error: no run 'nowhere-20261201-000000-0000' in {(tmp_path / 'store').as_uri()} or in namespace "
        f"{namespace} (context test)"
    )


@pytest.mark.cluster
def test_create_is_safe_to_repeat_and_a_cut_connection_is_retried(cluster, namespace, tmp_path, monkeypatch):
    from cutting_proxy import CuttingProxy

    from tunectl.kube import Cluster

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    c = Cluster(namespace=namespace)
    big = {"kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"x": "y" * 200_000}}
    assert c.create(big) is True
    assert c.create(big) is False  # 409: it is there, which is what a repeated create wants

    host, port = c.host.removeprefix("https://").split(":")
    proxy = CuttingProxy((host, int(port)), after=50_000, cuts=1)  # TCP: TLS goes through to the API server
    try:
        kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
        kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        (tmp_path / "via-proxy").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "via-proxy"))
        doc = Cluster(namespace=namespace).read("ConfigMap", "big")
    finally:
        proxy.close()
    assert proxy.cut == 1 and len(doc["data"]["x"]) == 200_000  # cut mid-response once, retried, complete
