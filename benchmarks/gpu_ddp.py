"""The train stage on 1..N GPUs of one host (issue 18): throughput, scaling efficiency and memory per GPU.

Each configuration runs the real train stage (`python -m tunectl_jobs.train`, which becomes torchrun's agent when the
recipe asks for several processes) on the Llama-3-8B-shaped random model of benchmarks/gpu_train.py (its NF4
checkpoint, as `ruozhiba` trains) and its synthetic Chinese Alpaca rows, with the recipe's LoRA settings:

    same-N     N GPUs, the reference's 4 rows per optimizer step (per-device 1 x grad-accum 4/N x N GPUs)
    fast-N     N GPUs, the throughput preset: 4 rows per GPU in one micro-batch, no recompute (4N rows per step)
    torchrun-1 one GPU under `torchrun --nproc_per_node 1` (DDP with one process): the launcher's own cost,
               against same-1 (the stage started directly); its losses must equal same-1's

It prints, per configuration: steps/s, rows/s, tokens/s (rows/s x the rows' mean length), scaling efficiency
against the same preset on 1 GPU (throughput / (N x 1-GPU throughput)), peak memory of each GPU (NVML), final loss.

A short warm-up run (same-1, 3 steps, not reported) goes first: the first train stage on a machine compiles and
caches kernels (Unsloth's compiled modules in the working directory, Triton's autotuning) that every later run
reuses, and without it the first configuration measured pays for all of them (on an H100: same-1 took 61.6 s for 30
steps run first, torchrun-1 42.4 s right after it). `--repeat N` runs the configurations N times, interleaved, so
run-to-run noise (loss differences from GPU atomics included) can be told from a difference between them.

    python benchmarks/gpu_ddp.py run --out OUTDIR [--gpus 1,2,4,8] [--steps 30] [--configs same,fast,torchrun]
                                     [--repeat N] [--no-warmup]
    python benchmarks/gpu_ddp.py table OUTDIR/ddp.json
    python benchmarks/gpu_ddp.py run --tiny --out OUTDIR --gpus 1,2   # CPU: gloo processes, a tiny shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "controller", REPO / "jobs", REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def _configs(names: list[str], gpus: list[int]) -> list[tuple[str, int, list[str], bool]]:
    """(tag, processes, recipe overrides, under torchrun) for each configuration asked for."""
    out = []
    for name in names:
        if name == "torchrun":
            out.append(("torchrun-1", 1, [], True))
            continue
        for n in gpus:
            if name == "same":
                if 4 % n:
                    continue  # 4 rows per step do not split evenly over n GPUs
                sets = [f"training.gradient_accumulation_steps={4 // n}", "training.global_batch_size=4"]
            else:  # the throughput preset of gpu_train (tunectl-fast): one micro-batch of 4 rows, no recompute
                sets = ["training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
                        "lora.use_gradient_checkpointing=false"]  # fmt: skip
            out.append((f"{name}-{n}", n, [f"training.nproc_per_node={n}", *sets], False))
    return out


def run_one(work: Path, tag: str, procs: int, sets: list[str], torchrun: bool, steps: int) -> dict[str, Any]:
    from gpu_pipeline import GpuSampler
    from gpu_train import Q4_DIR

    from tunectl.recipe import load_recipe

    recipe = load_recipe("ruozhiba", [
        f"model.name={work / Q4_DIR}", f"data.source={work / 'data' / 'alpaca.jsonl'}", f"training.max_steps={steps}",
        "training.sample_answers=false", "export.gguf=[]", *sets,
    ])  # fmt: skip
    rfile = work / f"recipe-{tag}.yaml"
    rfile.write_text(recipe.to_yaml())
    store, run = work / "store", f"ddp-{tag}"
    shutil.rmtree(store / "runs" / run, ignore_errors=True)  # a run of an earlier invocation
    # The stage's arguments through its environment: torchrun's own parser would take `--run` for `--run-path`.
    stage = ["-m", "tunectl_jobs.train"]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone"] if torchrun else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "controller"), str(REPO / "jobs"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "TUNECTL_RECIPE": str(rfile), "TUNECTL_STORE": str(store), "TUNECTL_RUN": run}  # fmt: skip
    log = work / f"{tag}.log"
    t0 = time.time()
    with GpuSampler(interval=0.2) as gpu, open(log, "w") as f:
        rc = subprocess.run([sys.executable, *launcher, *stage], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    manifest = store / "runs" / run / "train" / "manifest.json"
    doc = json.loads(manifest.read_text()) if manifest.is_file() else {}
    m = doc.get("metrics", {})
    losses = json.loads((store / "runs" / run / "train" / "loss.json").read_text()) if manifest.is_file() else []
    out: dict[str, Any] = {
        "config": tag, "processes": procs, "torchrun": torchrun, "exit_code": rc, "wall_s": round(time.time() - t0, 1),
        "steps": m.get("steps"), "rows_per_step": recipe.training.effective_batch_size,
        "train_seconds": m.get("train_seconds"), "final_loss": m.get("final_loss"),
        "losses": [h["loss"] for h in losses], "peak_mib_per_gpu": dict(gpu.peak_mib),
        "peak_gpu_mem_gib_rank0": m.get("peak_gpu_mem_gib"),
    }  # fmt: skip
    if rc != 0:
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def cmd_run(a: argparse.Namespace) -> int:
    import gpu_train

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = gpu_train.build(work, tiny=a.tiny)
    data = gpu_train.write_data(work, a.rows)
    gpus = [int(g) for g in a.gpus.split(",")]
    have = _devices()
    if have and max(gpus) > have:
        sys.exit(f"error: --gpus {a.gpus} asks for {max(gpus)} GPUs; this machine has {have}")
    if a.warmup:
        print("warm-up (same-1, 3 steps, not reported) ...", flush=True)
        warm = run_one(work, "warmup", 1, [], False, 3)
        if warm["exit_code"] != 0:
            print(warm.get("log_tail", ""), file=sys.stderr)
            return 1
    results = []
    for round_ in range(1, a.repeat + 1):
        for tag, procs, sets, torchrun in _configs(a.configs.split(","), gpus):
            print(f"{tag} (round {round_}): {procs} process(es) ...", flush=True)
            results.append({**run_one(work, tag, procs, sets, torchrun, a.steps), "round": round_})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), flush=True)
    doc = {"results": results, "model": model, "data": {k: v for k, v in data.items() if k != "example"},
           "env": gpu_train.env_info(), "gpus": have, "cpus": os.cpu_count(), "steps": a.steps,
           "warmup": a.warmup}  # fmt: skip
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "ddp.json").write_text(json.dumps(doc, indent=1))
    print_table(doc)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


def _devices() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def print_table(doc: dict[str, Any]) -> None:
    tokens_per_row = doc["data"]["tokens_mean"]
    rate: dict[str, float] = {}
    print(f"{'config':12} {'procs':>5} {'steps/s':>8} {'rows/s':>8} {'tokens/s':>9} {'scaling':>8} {'loss':>7}  "
          f"peak MiB per GPU")  # fmt: skip
    for r in doc["results"]:
        name = r["config"] + (f"#{r['round']}" if r.get("round", 1) > 1 else "")
        if r["exit_code"] != 0 or not r["train_seconds"]:
            print(f"{name:12} {r['processes']:5} failed (exit {r['exit_code']})")
            continue
        steps_s = r["steps"] / r["train_seconds"]
        rows_s = steps_s * r["rows_per_step"]
        preset = r["config"].split("-")[0]
        if r["processes"] == 1 and not r["torchrun"]:
            rate[preset] = rows_s
        base = rate.get(preset)
        scaling = f"{rows_s / (r['processes'] * base):.2f}" if base and not r["torchrun"] else "-"
        peaks = ", ".join(f"{v}" for _, v in sorted(r["peak_mib_per_gpu"].items())) or "-"
        print(f"{name:12} {r['processes']:5} {steps_s:8.3f} {rows_s:8.2f} {rows_s * tokens_per_row:9.0f} "
              f"{scaling:>8} {r['final_loss']:7.4f}  {peaks}")  # fmt: skip
    _launcher_cost(doc["results"])


def _launcher_cost(results: list[dict[str, Any]]) -> None:
    """torchrun-1 against same-1: mean training time of each, and the largest loss difference between them next to
    the largest between two runs of same-1 (the noise), where --repeat gave two."""
    runs = {c: [r for r in results if r["config"] == c and r["exit_code"] == 0 and r["losses"]]
            for c in ("same-1", "torchrun-1")}  # fmt: skip
    same, tr = runs["same-1"], runs["torchrun-1"]
    if not (same and tr):
        return

    def mean_s(rs: list[dict[str, Any]]) -> float:
        return sum(r["train_seconds"] for r in rs) / len(rs)

    def largest(a: dict[str, Any], b: dict[str, Any]) -> float:
        return max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))

    print(f"torchrun-1 vs same-1: training {mean_s(tr):.1f} s vs {mean_s(same):.1f} s for {tr[0]['steps']} steps "
          f"(mean of {len(tr)} and {len(same)} runs, ratio {mean_s(tr) / mean_s(same):.3f}); largest loss difference "
          f"{max(largest(t, s) for t in tr for s in same):.2e}"
          + (f", between two same-1 runs {largest(same[0], same[1]):.2e}" if len(same) > 1 else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", default="/tmp/tunectl-ddp")
    r.add_argument("--out", required=True)
    r.add_argument("--gpus", default="1", help="process counts to run, comma-separated (e.g. 1,2,4,8)")
    r.add_argument("--configs", default="same,fast,torchrun")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--rows", type=int, default=1500)
    r.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (gloo processes)")
    r.add_argument("--repeat", type=int, default=1, help="run the configurations this many times, interleaved")
    r.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up run")
    t = sub.add_parser("table")
    t.add_argument("results")
    a = p.parse_args(argv)
    if a.cmd == "table":
        print_table(json.loads(Path(a.results).read_text()))
        return 0
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
