"""Push and pull one large artifact through tunectl's S3 store and through `mc cp`, against the same local
MinIO, alternating runs; prints MB/s for both and their ratio. A benchmark, not a test.

    make bench-s3                     # builds MinIO and mc at their pinned versions first
    python benchmarks/s3_transfer.py --minio PATH --mc PATH [--size-mib 1024] [--rounds 3]

tunectl's figures include what it does beyond copying bytes: sha256 of every file on upload (recorded in the
manifest and the object metadata) and verification of every file on download (hashed as the ranges arrive).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from minio_server import MinioServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minio", type=Path, required=True)
    ap.add_argument("--mc", type=Path, required=True)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tunectl-bench-"))
    server = MinioServer(work / "minio" / "data", binary=args.minio)
    server.start()
    try:
        os.environ.update(server.env())
        os.environ["TUNECTL_CACHE"] = str(work / "cache")
        from tunectl.stores import open_store
        from tunectl.stores.manifest import sha256_file

        src = work / "src"
        src.mkdir()
        artifact = src / "model.bin"
        with open(artifact, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(2**20))
        size = artifact.stat().st_size
        server.client().create_bucket(Bucket="bench")
        mc_env = {**os.environ, "MC_CONFIG_DIR": str(work / "mc")}
        subprocess.run(
            [str(args.mc), "alias", "set", "bench", server.endpoint, server.user, server.password],
            check=True,
            env=mc_env,
            stdout=subprocess.DEVNULL,
        )

        def timed(fn, *a, **kw) -> float:
            t = time.perf_counter()
            fn(*a, **kw)
            return size / (time.perf_counter() - t) / 1e6

        def mc(*argv: str) -> None:
            subprocess.run([str(args.mc), "cp", "--quiet", *argv], check=True, env=mc_env, stdout=subprocess.DEVNULL)

        results: dict[str, list[float]] = {k: [] for k in ("tunectl push", "mc push", "tunectl pull", "mc pull")}

        store = open_store("s3://bench/tunectl")
        # Round 0 warms up both (this VM pays for first-touched memory, so whoever goes first in a cold
        # process is slower); after it, the order alternates each round.
        for i in range(args.rounds + 1):
            run, out = f"r{i}", work / f"out-{i}"
            steps = [
                ("tunectl push", store.publish, (run, "gguf", src, {}), {}),
                ("mc push", mc, (str(artifact), f"bench/bench/mc/{run}/model.bin"), {}),
                ("tunectl pull", store.fetch, (run, "gguf"), {"dest": out / "tunectl"}),
                ("mc pull", mc, (f"bench/bench/mc/{run}/model.bin", str(out / "mc.bin")), {}),
            ]
            for k in [0, 1, 2, 3] if i % 2 == 0 else [1, 0, 3, 2]:
                name, fn, a, kw = steps[k]
                mbps = timed(fn, *a, **kw)
                if i > 0:
                    results[name].append(mbps)
            shutil.rmtree(out)

        t = time.perf_counter()
        sha256_file(artifact)
        sha_mbps = size / (time.perf_counter() - t) / 1e6
        cpus = len(os.sched_getaffinity(0))
        print(f"{size / 2**20:.0f} MiB, {args.rounds} rounds after a warm-up, MinIO on 127.0.0.1, {cpus} CPUs")
        print(f"{'':26} {'median MB/s':>12} {'min':>8} {'max':>8}")
        for k, v in results.items():
            print(f"{k:26} {statistics.median(v):12.1f} {min(v):8.1f} {max(v):8.1f}")
        for op in ("push", "pull"):
            ratio = statistics.median(results[f"tunectl {op}"]) / statistics.median(results[f"mc {op}"])
            print(f"{op}: tunectl / mc = {ratio:.2f}x")
        print(f"sha256 alone on this CPU: {sha_mbps:.0f} MB/s (tunectl hashes every file on push and pull)")
        if args.json:
            doc = {
                "size_bytes": size,
                "rounds": args.rounds,
                "cpus": cpus,
                "machine": platform.platform(),
                "concurrency": int(os.environ.get("TUNECTL_S3_CONCURRENCY", "8")),
                "sha256_alone_mbps": round(sha_mbps, 1),
                "mbps": {k: [round(x, 1) for x in v] for k, v in results.items()},
                "median_mbps": {k: round(statistics.median(v), 1) for k, v in results.items()},
            }
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
