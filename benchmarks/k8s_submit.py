"""Submit latency and 200 runs at once on the test control plane (real kube-apiserver, Job controller and
scheduler; kwok nodes). A benchmark, not a test: it prints figures.

    make bench-k8s
    python benchmarks/k8s_submit.py [--runs 200] [--samples 20] [--nodes 60]

1. Latency of one submit, N times: in-process (render with `helm template` + create the objects) and the whole
   `tunectl submit` command (Python start-up included), p50/p95.
2. RUNS runs submitted together (8 threads), every stage's pod scheduled on kwok GPU nodes. Stages publish a
   one-file stand-in artifact through the real S3 store (MinIO) instead of training (tests/cluster/podrunner);
   each run's reconciler is the real Reconciler, one thread per run, authenticated as that run's own
   ServiceAccount. Prints time until all runs succeeded, each reconciler's CPU time, and its API requests per
   run as the reconciler counted them and as the API server's audit log recorded them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import yaml  # noqa: E402
from cluster.controlplane import ControlPlane, service_account_user  # noqa: E402
from cluster.podrunner import EXIT_ANNOTATION, PodRunner  # noqa: E402
from minio_server import MinioServer  # noqa: E402

from tunectl.kube import Cluster, KubernetesBackend  # noqa: E402
from tunectl.recipe import load_recipe  # noqa: E402
from tunectl.reconcile import Reconciler  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs) or [float("nan")]
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=60, help="kwok nodes with 8 GPUs each")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tunectl-bench-k8s-"))
    cp = ControlPlane(work / "k8s")
    minio = MinioServer(work / "minio" / "data")
    t = time.monotonic()
    cp.start()
    minio.start()
    print(f"control plane + MinIO up in {time.monotonic() - t:.1f}s; work dir {work}", flush=True)
    try:
        cp.add_nodes(count=args.nodes, gpus=8)
        os.environ.update(minio.env())
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        os.environ["TUNECTL_S3_CACHE"] = str(work / "s3-cache")
        minio.client().create_bucket(Bucket="bench")
        ns = cp.new_namespace("bench")
        from kubernetes import client

        with cp.api_client() as api:
            client.CoreV1Api(api).create_namespaced_secret(
                ns,
                {
                    "metadata": {"name": "s3-creds"},
                    "stringData": {"AWS_ACCESS_KEY_ID": minio.user, "AWS_SECRET_ACCESS_KEY": minio.password},
                },
            )
        values = work / "values.yaml"
        values.write_text(yaml.safe_dump({"s3": {"endpoint": minio.endpoint, "credentialsSecret": "s3-creds"}}))
        store = "s3://bench/tunectl"
        be = KubernetesBackend(Cluster(namespace=ns), store)
        recipe = load_recipe("ruozhiba-tiny")

        # 1. one submit at a time
        render_s, create_s, cli_s = [], [], []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            run, docs = be.render(recipe, values=(values,))
            t1 = time.perf_counter()
            be.create_objects(run, docs)
            render_s.append(t1 - t0)
            create_s.append(time.perf_counter() - t1)
        env = {**os.environ, "TUNECTL_NAMESPACE": ns, "TUNECTL_STORE": store, "TUNECTL_BACKEND": "kubernetes"}
        for _ in range(max(3, args.samples // 4)):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "tunectl.cli", "submit", "ruozhiba-tiny", "-f", str(values)],
                env=env,
                check=True,
                capture_output=True,
            )
            cli_s.append(time.perf_counter() - t0)
        for r in be.list_runs():
            be.cancel(r.run)
        total = [a + b for a, b in zip(render_s, create_s, strict=True)]
        print(f"\n== submit latency, one run at a time ({args.samples} samples) ==")
        for name, xs in (("render (helm template)", render_s), ("create 8 objects", create_s), ("total", total)):
            print(f"{name:<28} p50 {pct(xs, 50) * 1000:7.1f} ms   p95 {pct(xs, 95) * 1000:7.1f} ms")
        print(f"{'tunectl submit (CLI)':<28} p50 {pct(cli_s, 50) * 1000:7.1f} ms   p95 {pct(cli_s, 95) * 1000:7.1f} ms")

        # 2. many runs at once
        n = args.runs
        modes = {"train": "publish", "merge": "publish", "gguf": "publish", "reconciler": "hold"}
        results: dict[str, dict[str, float]] = {}
        lock = threading.Lock()

        def reconcile(run: str) -> None:
            kubeconfig = cp.service_account_kubeconfig(ns, f"{run}-reconciler", work / f"sa-{run}.yaml")
            from kubernetes import config

            api = config.new_client_from_config(config_file=str(kubeconfig))
            r = Reconciler(client.BatchV1Api(api), ns, run, poll_seconds=15)
            c0 = time.thread_time()
            try:
                states = r.run_until_done(timeout=1800)
            except Exception as e:  # noqa: BLE001 - counted as a failed run, reported below
                print(f"reconciler of {run} failed: {type(e).__name__}: {e}"[:300], flush=True)
                states = {"error": str(e)}
            cpu = time.thread_time() - c0
            with lock:
                results[run] = {
                    "cpu": cpu,
                    "requests": r.requests,
                    "done": time.monotonic(),
                    "ok": all(s == "succeeded" for s in states.values()),
                }
            pods = client.CoreV1Api(api_admin).list_namespaced_pod(ns, label_selector=f"job-name={run}-reconciler")
            for p in pods.items:
                client.CoreV1Api(api_admin).patch_namespaced_pod(
                    p.metadata.name, ns, {"metadata": {"annotations": {EXIT_ANNOTATION: "0"}}}
                )

        api_admin = cp.api_client()
        with PodRunner(cp, ns, work / "pods", modes):
            t0 = time.monotonic()
            runs: list[str] = []

            def submit_one(_: int) -> str:
                run, docs = be.render(recipe, values=(values,))
                be.create_objects(run, docs)
                return run

            with ThreadPoolExecutor(8) as pool:
                runs = list(pool.map(submit_one, range(n)))
            submitted = time.monotonic() - t0
            threads = [threading.Thread(target=reconcile, args=(r,), daemon=True) for r in runs]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=1800)
            wall = time.monotonic() - t0
        ok = sum(1 for r in runs if results.get(r, {}).get("ok"))
        done_at = [results[r]["done"] - t0 for r in runs if r in results]
        cpu = [results[r]["cpu"] for r in runs if r in results]
        reqs = [results[r]["requests"] for r in runs if r in results]
        audited = [len(cp.audit_events(service_account_user(ns, f"{r}-reconciler"))) for r in runs]
        print(f"\n== {n} runs submitted together onto {args.nodes} kwok nodes ({args.nodes * 8} GPUs) ==")
        print(f"all submitted (8 threads)     {submitted:7.1f} s  ({n / submitted:.1f} runs/s)")
        print(f"runs succeeded                {ok} / {n}")
        print(
            f"run finished after submit    p50 {pct(done_at, 50):7.1f} s   p95 {pct(done_at, 95):7.1f} s   "
            f"all {wall:.1f} s"
        )
        print(
            f"reconciler CPU per run       p50 {pct(cpu, 50) * 1000:6.1f} ms   p95 {pct(cpu, 95) * 1000:6.1f} ms   "
            f"max {max(cpu) * 1000:.1f} ms   mean {statistics.mean(cpu) * 1000:.1f} ms"
        )
        print(
            f"API requests per run         counted by reconciler: mean {statistics.mean(reqs):.1f}  "
            f"max {max(reqs)};  audit log: mean {statistics.mean(audited):.1f}  max {max(audited)}"
        )
        return 0 if ok == n else 1
    finally:
        minio.stop()
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
