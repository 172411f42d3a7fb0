"""The whole reference pipeline on one GPU as a user runs it: `tunectl submit ruozhiba`, local backend (issue 17).

The recipe is `ruozhiba` with its values (LoRA r=16 on the seven projections, 60 steps, adamw_8bit, seed 3407, GGUF
q4_k_m, q8_0 and f16), with two stand-ins for what this machine cannot download: the Llama-3-8B-shaped random model
of benchmarks/gpu_train.py (its NF4 `-bnb-4bit` checkpoint to train on, its 16-bit weights as the merge base) and
synthetic ruozhiba-length Chinese Alpaca rows. A random model never learns to stop at EOS, so the GGUF smoke tests
run with `export.smoke_test: answer` (an answer up to the token limit passes, and the stage notes it); the CPU
pipeline in the tests proves the real stop.

What it prints: the wall time a user waits from `submit` to the last manifest, each stage's wall time and phases
(from the manifests the stages publish, and the start-up before the first phase from the stage logs), bytes read and
written per stage, and how busy the GPU was in each stage (NVML, sampled every 100 ms).

    # here (PyPI): the wheels the GPU machine lacks, the portable llama.cpp wheel and the converter tree
    ~/.cache/tunectl/venv/bin/python benchmarks/gpu_bundle.py build --allow-conflicts --dest .gpu/wheels-ckpt
    mkdir -p .gpu/llama && cp ~/.cache/tunectl/wheels/*/llama_cpp_python-*.whl .gpu/llama/ \\
      && cp -r ~/.cache/tunectl/llama.cpp .gpu/llama/tree \\
      && pip download --no-deps --only-binary=:all: -d .gpu/llama diskcache==5.6.3
    # there (carry .gpu/wheels-ckpt, .gpu/llama, .gpu/smollm2-shape):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels-ckpt/*.whl .gpu/llama/*.whl
    export PYTHONPATH=/tmp/site TUNECTL_LLAMA_CPP_DIR=$PWD/.gpu/llama/tree/0.3.36
    python3 benchmarks/gpu_pipeline.py run --work /tmp/tunectl-bench --out OUTDIR --hub-mb-s 100

With `--hub-mb-s`, the 16-bit merge base is a Hub id served by a stand-in Hub (tests/hub_server.py) at that rate,
as a real run downloads it: the train stage fetches it beside its steps, and the table says how long that took and
how long training then waited for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "controller", REPO / "jobs", REPO / "benchmarks", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

STAGES = ("train", "merge", "gguf")
HUB_ID = "bench/llama-3-8b-shape"


class GpuSampler:
    """GPU utilisation and memory every `interval` seconds through NVML, on a thread, with wall-clock times: of GPU
    0 in `samples`, and the peak memory of every GPU in `peak_mib`."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (time, util %, memory used MiB)
        self.peak_mib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no NVML or no GPU (a CPU smoke test of a benchmark)
            return
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self._stop.is_set():
            mems = [pynvml.nvmlDeviceGetMemoryInfo(h).used // 2**20 for h in handles]
            for i, m in enumerate(mems):
                self.peak_mib[i] = max(self.peak_mib.get(i, 0), m)
            self.samples.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(handles[0]).gpu, mems[0]))
            self._stop.wait(self.interval)
        pynvml.nvmlShutdown()

    def window(self, start: float, end: float) -> dict[str, float]:
        """GPU-busy seconds (utilisation x time) and peak memory between two wall-clock times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {}
        busy = sum(u / 100 * self.interval for _, u, _ in inside)
        return {"gpu_busy_s": round(busy, 1), "gpu_busy_pct": round(100 * busy / max(end - start, 1e-9), 1),
                "gpu_mem_peak_gib": round(max(m for _, _, m in inside) / 1024, 1)}  # fmt: skip


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def stage_report(store: Path, run: str, stage: str, sampler: GpuSampler, read_bytes: int) -> dict[str, Any]:
    manifest_path = store / "runs" / run / stage / "manifest.json"
    log = store / "runs" / run / "logs" / f"{stage}.log"
    out: dict[str, Any] = {"stage": stage, "published": manifest_path.is_file()}
    if not manifest_path.is_file():
        out["log_tail"] = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        return out
    m = json.loads(manifest_path.read_text())
    t = m["timings"]
    start, end = _epoch(t["started"]), _epoch(t["finished"])
    out |= {
        "wall_s": round(t["seconds"], 1),
        "phases_s": {k: round(v, 1) for k, v in t["phases"].items()},
        "written_gb": round(sum(f["size"] for f in m["files"].values()) / 1e9, 2),
        "read_gb": round(read_bytes / 1e9, 2),
        "metrics": m.get("metrics"),
        "notes": m.get("notes"),
        **sampler.window(start, end),
    }
    # The stage's own log times each phase; what comes before the first one is start-up (imports, the store).
    out["phases_s"] = {"start-up": round(t["seconds"] - sum(t["phases"].values()), 1), **out["phases_s"]}
    if log.is_file():
        out["log_phase_lines"] = [
            ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\] .* done in", ln)
        ]
    return out


def cmd_run(a: argparse.Namespace) -> int:
    import gpu_train

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = gpu_train.build(work, tiny=a.tiny)
    data = gpu_train.write_data(work, a.rows)
    prep_s = time.time() - t0
    store = work / "store"
    sets = [
        f"model.name={work / gpu_train.Q4_DIR}",
        f"data.source={work / 'data' / 'alpaca.jsonl'}",
        f"training.max_steps={a.steps}",
        f"export.smoke_test={a.smoke}",
        *a.set,
    ]
    base_dir = work / gpu_train.BASE_DIR
    hub = None
    if a.hub_mb_s:
        # The merge base from a stand-in Hub at a stated rate: the train stage downloads it beside its steps
        # (jobs/tunectl_jobs/prefetch.py). The Hub's copy lives in memory (/dev/shm): the GPU machine's disk cannot
        # hold the base twice besides the run's outputs.
        from hub_server import HubServer

        base_dir = _in_memory(base_dir, Path(a.hub_dir))
        hub = HubServer({HUB_ID: base_dir}, bytes_per_s=a.hub_mb_s * 1e6).__enter__()
        sets.append(f"model.merge_base={HUB_ID}")
    cmd = [sys.executable, "-m", "tunectl.cli", "--store", str(store), "submit", "ruozhiba", "--backend", "local"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "controller"), str(REPO / "jobs"),
                                                         os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    if hub is not None:
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(work / "hf")}
    log_path = Path(a.out) / "submit.log"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    print(f"model ready ({prep_s:.0f}s): {json.dumps(model)}", flush=True)
    with GpuSampler() as sampler, open(log_path, "w") as log:
        submitted = time.time()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        waited = time.time() - submitted
    if hub is not None:
        hub.__exit__(None, None, None)
    text = log_path.read_text(errors="replace")
    found = re.search(r"^run (\S+): stages", text, re.M)
    run = found.group(1) if found else ""
    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    q4_bytes = sum(f.stat().st_size for f in (work / gpu_train.Q4_DIR).glob("*.safetensors"))
    runs = store / "runs" / run

    # What each stage reads: train the NF4 checkpoint; merge the adapter and the 16-bit base; gguf the merged model.
    merged = sum(f["size"] for k, f in _files(runs / "merge").items() if k.startswith("merged-16bit/"))
    adapter = sum(f["size"] for f in _files(runs / "train").values())
    reads = {"train": q4_bytes, "merge": adapter + base_bytes, "gguf": merged}
    stages = [stage_report(store, run, s, sampler, reads[s]) for s in STAGES]
    result = {
        "exit_code": proc.returncode,
        "run": run,
        "submit_to_done_s": round(waited, 1),
        "stages": stages,
        "merge_base_hub": {"mb_per_s": a.hub_mb_s, "downloads": hub.downloads} if hub else None,
        "recipe_sets": sets,
        "model": model,
        "data": {k: v for k, v in data.items() if k != "example"},
        "env": gpu_train.env_info(),
        "cpus": os.cpu_count(),
        "cpu": _cpu(),
        "store_gb": round(_size(store) / 1e9, 1) if store.exists() else 0,
        "submit_tail": text[-2500:],
    }
    (Path(a.out) / "pipeline.json").write_text(json.dumps(result, indent=1, default=str, ensure_ascii=False))
    print_table(result)
    return proc.returncode


def _in_memory(base_dir: Path, hub_dir: Path) -> Path:
    """Move the 16-bit base into `hub_dir` (a tmpfs) once; where it is, if there."""
    dest = hub_dir / base_dir.name
    if dest.is_dir() and not base_dir.exists():
        return dest
    need = _size(base_dir)
    hub_dir.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(hub_dir).f_bavail * os.statvfs(hub_dir).f_frsize
    if free < need + 2**30:
        sys.exit(f"error: {hub_dir} has {free / 1e9:.1f} GB free, the base needs {need / 1e9:.1f}: pass --hub-dir")
    import shutil

    shutil.move(base_dir, dest)
    return dest


def _cpu() -> dict[str, Any]:
    """The host CPU's model and its vector flags: llama.cpp's convert, quantize and smoke tests run on it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    vector = sorted(f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx", "amx", "sha")))
    return {"model": model.group(1) if model else "?", "flags": vector}


def _files(stage_dir: Path) -> dict[str, Any]:
    p = stage_dir / "manifest.json"
    return json.loads(p.read_text())["files"] if p.is_file() else {}


def print_table(r: dict[str, Any]) -> None:
    print(
        f"\nrun {r['run']}: exit {r['exit_code']}; submit to done {r['submit_to_done_s']} s; store {r['store_gb']} GB"
    )
    print(f"{'stage':6} {'wall s':>7} {'read GB':>8} {'wrote GB':>9} {'GPU busy':>9} {'GPU peak':>9}  phases (s)")
    for s in r["stages"]:
        if not s.get("published"):
            print(f"{s['stage']:6} not published")
            continue
        busy = f"{s['gpu_busy_pct']}%" if "gpu_busy_pct" in s else "-"
        peak = f"{s['gpu_mem_peak_gib']} GiB" if "gpu_mem_peak_gib" in s else "-"
        phases = ", ".join(f"{k} {v}" for k, v in s["phases_s"].items())
        print(f"{s['stage']:6} {s['wall_s']:7} {s['read_gb']:8} {s['written_gb']:9} {busy:>9} {peak:>9}  {phases}")
    total = sum(s.get("wall_s", 0) for s in r["stages"])
    print(f"sum of stages {total:.1f} s; between and around them {r['submit_to_done_s'] - total:.1f} s")
    hub, train = r.get("merge_base_hub"), r["stages"][0]
    fetched = (train.get("metrics") or {}).get("merge_base_prefetch")
    if hub and fetched:
        print(
            f"merge base from the stand-in Hub at {hub['mb_per_s']:g} MB/s: {fetched.get('bytes', 0) / 1e9:.1f} GB in "
            f"{fetched.get('download_seconds', '?')} s beside training; train waited "
            f"{train['phases_s'].get('wait for merge base', 0)} s for it; merge fetched it in "
            f"{r['stages'][1].get('phases_s', {}).get('fetch merge base', '?')} s"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build the stand-in (once), submit the pipeline, print the table")
    r.add_argument("--work", default="/tmp/tunectl-bench")
    r.add_argument("--out", required=True)
    r.add_argument("--rows", type=int, default=1500)
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--smoke", default="answer", choices=["stop", "answer", "off"])
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    r.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: a smoke test of this script")
    r.add_argument("--hub-mb-s", type=float, default=0, help="serve the merge base from a stand-in Hub at this MB/s")
    r.add_argument("--hub-dir", default="/dev/shm/tunectl-hub", help="where the stand-in Hub keeps the base")
    t = sub.add_parser("table", help="print the table of a pipeline.json")
    t.add_argument("results")
    a = p.parse_args(argv)
    if a.cmd == "table":
        print_table(json.loads(Path(a.results).read_text()))
        return 0
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
