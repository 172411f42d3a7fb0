"""Training checkpoints: their size, save and restore time in the store, and what saving them costs training.

One process, two parts:

1. Overhead. The train stage itself (`tunectl_jobs.train.main`, in-process, a directory store as the local backend
   uses) trains the same steps without checkpoints (`base`), with one every `--save-steps` steps (`ckpt`) and
   without again (`base#2`). gpu_train's Probe times every optimizer step; a callback times each save from the end
   of its step to the end of the store callback's `on_save` (the Trainer writing its checkpoint directory, the
   commit to the store, the local copy removed). The default interval (`training.save_minutes: 10`) costs one such
   save per 600 s of training: overhead = seconds per checkpoint / 600. The aggressive interval's overhead is
   measured: the timed steps of `ckpt` against those of the baselines.
2. Store. The last checkpoint directory `ckpt` saved (kept as hard links) is committed again with
   `tunectl.checkpoints.save` into a fresh directory store and, with `--store s3://BUCKET/PREFIX` (endpoint and
   credentials from the AWS_* variables, AWS_ENDPOINT_URL for MinIO), into S3, then fetched back with
   `tunectl.checkpoints.restore`, `--repeats` times each; from the third save on, a save also prunes the oldest
   (keep_checkpoints 2).

    python benchmarks/checkpoints.py --tiny --out DIR     # ruozhiba-tiny (SmolLM2-135M) on a CPU, offline
    python benchmarks/checkpoints.py --out DIR            # GPU: gpu_train's Llama-3-8B-shaped NF4 model, ruozhiba
    python benchmarks/checkpoints.py --smoke --out DIR    # the GPU mode's code on gpu_train's 2-layer shape, on a CPU

The GPU mode trains with the `ruozhiba` recipe's values (QLoRA r=16 on all seven projections, adamw_8bit, batch 1 x
grad-accum 4, Unsloth gradient checkpointing) on gpu_train's model and data (built in --work, reused when there).
Results: docs/benchmarks.md (CPU) and docs/gpu-benchmarks.md (GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train as gt  # noqa: E402  (also puts controller/ and jobs/ on sys.path)

ACTIVE: list[dict[str, Any]] = []  # the run being measured; the callbacks below write into it


def install(work: Path) -> None:
    """Add the measuring callbacks to every Trainer the stage builds and time the store part of its saves, without
    touching the stage's code (as gpu_train's Probe.install does)."""
    import transformers.trainer_callback as tcb
    from transformers import TrainerCallback

    from tunectl_jobs import checkpoints as stage_checkpoints

    class SaveTimer(TrainerCallback):
        # Added after the stage's own callbacks, so on_save runs once its store commit and cleanup are done.
        def __init__(self, rec: dict[str, Any]) -> None:
            self.rec, self.step_end = rec, 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step_end = time.perf_counter()  # after the Probe's CUDA synchronize

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            total = time.perf_counter() - self.step_end - self.rec.pop("_kept_s", 0.0)
            self.rec["saves"].append({"step": state.global_step, "total_s": round(total, 4)})

    orig_init = tcb.CallbackHandler.__init__

    def init(handler: Any, *a: Any, **k: Any) -> None:
        orig_init(handler, *a, **k)
        if ACTIVE:
            handler.add_callback(ACTIVE[-1]["_probe"].callback())
            handler.add_callback(SaveTimer(ACTIVE[-1]))

    tcb.CallbackHandler.__init__ = init  # type: ignore[method-assign]
    real_save = stage_checkpoints.save

    def timed_save(store: Any, run: str, recipe: Any, src: Path, step: int, why: str, *a: Any, **k: Any) -> None:
        t0 = time.perf_counter()
        real_save(store, run, recipe, src, step, why, *a, **k)
        rec = ACTIVE[-1]
        rec["store_s"].append(round(time.perf_counter() - t0, 4))
        # Keep the newest checkpoint directory for part 2 (the stage deletes it next): hard links, a few ms, left
        # out of the save's time.
        t1 = time.perf_counter()
        shutil.rmtree(work / "kept", ignore_errors=True)
        shutil.copytree(src, work / "kept", copy_function=os.link)
        rec["_kept_s"] = time.perf_counter() - t1

    stage_checkpoints.save = timed_save


def train_once(name: str, recipe: Any, work: Path, warmup: int, flops: dict[str, float]) -> dict[str, Any]:
    from tunectl_jobs import train as stage

    t = recipe.training
    rec: dict[str, Any] = {"name": name, "save_steps": t.save_steps, "save_minutes": t.save_minutes}
    rec.update(saves=[], store_s=[], _probe=gt.Probe(None), load_before=os.getloadavg())
    rfile = work / f"recipe-{name.replace('#', '-')}.yaml"
    rfile.write_text(recipe.to_yaml())
    run = f"ckpt-{name.replace('#', '-')}"
    ACTIVE.append(rec)
    t0 = time.perf_counter()
    try:
        rec["exit_code"] = stage.main(["--recipe", str(rfile), "--store", str(work / "store"), "--run", run])
    finally:
        ACTIVE.pop()
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["load_after"] = os.getloadavg()
    probe = rec.pop("_probe")
    summary = probe.summary(warmup, flops, gt.H100_BF16_DENSE_TFLOPS)
    rec["step_t"] = [s["t"] for s in summary.get("steps", [])]
    rec["timed"] = summary.get("timed")
    for s, store_s in zip(rec["saves"], rec["store_s"], strict=False):
        s["store_s"] = store_s
    manifest = work / "store" / "runs" / run / "train" / "manifest.json"
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        rec["manifest"] = {k: doc["metrics"].get(k) for k in ("backend", "device", "steps", "train_seconds")}
        rec["versions"], rec["notes"] = doc.get("versions"), doc.get("notes")
    gc.collect()  # the next run loads its own model
    if _cuda():
        import torch

        rec["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.empty_cache()
    return rec


def store_bench(kept: Path, recipe: Any, stores: dict[str, Any], repeats: int, work: Path) -> dict[str, Any]:
    from tunectl import checkpoints

    files = {p.relative_to(kept).as_posix(): p.stat().st_size for p in sorted(kept.rglob("*")) if p.is_file()}
    out: dict[str, Any] = {"bytes": sum(files.values()), "files": files}
    for name, store in stores.items():
        run = f"ckpt-store-{os.getpid()}"
        saves, restores = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            checkpoints.save(store, run, recipe, kept, i + 1, "bench")
            saves.append(round(time.perf_counter() - t0, 4))
            dest = work / "restored"
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.perf_counter()
            got = checkpoints.restore(store, run, recipe, dest)
            restores.append(round(time.perf_counter() - t0, 4))
            assert got is not None and got[1] == i + 1, got
        checkpoints.delete_all(store, run)
        out[name] = {
            "uri": store.uri,
            "save_s": saves,
            "restore_s": restores,
            "save_s_median": round(statistics.median(saves), 4),
            "restore_s_median": round(statistics.median(restores), 4),
            "save_mb_per_s": round(out["bytes"] / 1e6 / statistics.median(saves), 1),
            "restore_mb_per_s": round(out["bytes"] / 1e6 / statistics.median(restores), 1),
        }
    return out


def overhead(runs: list[dict[str, Any]], warmup: int, steps: int) -> dict[str, Any]:
    """Per-checkpoint cost, the default interval's overhead and the aggressive interval's, measured."""
    ok = [r for r in runs if r.get("exit_code") == 0 and r.get("timed")]
    base = [r["timed"]["seconds"] for r in ok if not r["save_steps"]]
    ckpt = [r for r in ok if r["save_steps"] and r["saves"]]
    if not ckpt:
        return {"error": "no checkpointing run finished"}
    c = ckpt[0]
    total = statistics.median(s["total_s"] for s in c["saves"])
    store = statistics.median(c["store_s"])
    out: dict[str, Any] = {
        "per_checkpoint_s": {
            "total_median": round(total, 3),
            "store_median": round(store, 3),
            "trainer_write_and_cleanup_median": round(total - store, 3),
            "all": c["saves"],
        },
        "default_interval": {"save_minutes": 10, "overhead_fraction": round(total / 600, 5)},
    }
    if not base:  # a second model load failed, say: the cost per checkpoint still stands
        return out
    base_s, timed_steps = statistics.mean(base), c["timed"]["steps"]
    in_window = [s for s in c["saves"] if warmup <= s["step"] < steps]  # saves inside the timed steps
    out["baseline_steps_per_s"] = round(timed_steps / base_s, 4)
    out["baseline_tokens_per_s"] = [r["timed"]["tokens_per_s"] for r in ok if not r["save_steps"]]
    out["default_interval"]["steps_between_saves"] = round(600 * timed_steps / base_s)
    out["aggressive"] = {
        "save_steps": c["save_steps"],
        "timed_steps": timed_steps,
        "saves_in_timed_steps": len(in_window),
        "baseline_seconds": base,
        "ckpt_seconds": c["timed"]["seconds"],
        "ckpt_tokens_per_s": c["timed"]["tokens_per_s"],
        "measured_overhead_fraction": round(c["timed"]["seconds"] / base_s - 1, 4),
        "predicted_overhead_fraction": round(sum(s["total_s"] for s in in_window) / base_s, 4),
    }
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        **gt.env_info(),
    }
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), None)
        flags = next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("flags")), [])
        wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "sha_ni")
        info["cpu_model"], info["cpu_flags"] = model, [f for f in wanted if f in flags]
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="ruozhiba-tiny on a CPU")
    mode.add_argument("--smoke", action="store_true", help="the GPU mode's code on a 2-layer shape, CPU")
    ap.add_argument("--out", type=Path, default=Path("."), help="writes OUT/checkpoints-<mode>.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tunectl-bench"), help="model, data, stores (scratch)")
    ap.add_argument("--runs", default="base,ckpt,base#2", help="base*: no checkpoints; ckpt*: every --save-steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="saves and restores per store in part 2")
    ap.add_argument("--rows", type=int, default=400, help="GPU mode: synthetic rows (gpu_train's)")
    ap.add_argument("--store", help="also measure part 2 in this store, e.g. s3://BUCKET/PREFIX")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip training runs that would end later")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    mode_name = "tiny" if a.tiny else "smoke" if a.smoke else "gpu"
    import importlib.util

    import torch

    if not a.tiny and torch.cuda.is_available() and importlib.util.find_spec("unsloth"):
        import unsloth  # noqa: F401  (before transformers, as the stage does)
    from tunectl.recipe import load_recipe
    from tunectl.stores import LocalStore, open_store

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    for d in ("store", "dir-store", "kept", "restored"):
        shutil.rmtree(a.work / d, ignore_errors=True)
    result: dict[str, Any] = {"mode": mode_name, "args": {k: str(v) for k, v in vars(a).items()}, "env": machine()}
    res_path = a.out / f"checkpoints-{mode_name}.json"

    def write() -> None:
        res_path.write_text(json.dumps(result, indent=1, default=str))

    if a.tiny:
        name, sets, flops = "ruozhiba-tiny", ["test_prompts=[]"], {"per_token": 0, "per_pair": 0, "per_token_6n": 0}
    else:
        result["build"] = gt.build(a.work, a.smoke)
        result["data"] = {k: v for k, v in gt.write_data(a.work, a.rows).items() if k != "example"}
        name, flops = "ruozhiba", gt.model_flops(gt.TINY if a.smoke else gt.LLAMA3_8B)
        sets = [f"model.name={a.work / gt.Q4_DIR}", f"data.source={a.work / 'data' / 'alpaca.jsonl'}"]
        sets += ["export.gguf=[]", "test_prompts=[]"]
    write()
    install(a.work)
    runs: list[dict[str, Any]] = []
    recipe = None
    for run in a.runs.split(","):
        every = a.save_steps if run.startswith("ckpt") else 0
        # The baselines save nothing; the checkpointing run saves by steps only (10 minutes never pass here).
        steps = [f"training.max_steps={a.steps}", f"training.save_steps={every}", "training.save_minutes=0"]
        recipe_r = load_recipe(name, [*sets, *steps])
        left = a.deadline_s - (time.perf_counter() - t_start)
        need = 1.1 * max((r["wall_s"] for r in runs), default=0)
        if left < need:
            runs.append({"name": run, "skipped": f"{left:.0f}s left < {need:.0f}s"})
            continue
        r = train_once(run, recipe_r, a.work, a.warmup, flops)
        runs.append(r)
        recipe = recipe_r if every else recipe
        tm = r.get("timed") or {}
        print(
            f"== {run}: exit {r['exit_code']} in {r['wall_s']}s; timed {tm.get('steps')} steps {tm.get('seconds')}s "
            f"({tm.get('tokens_per_s')} tok/s); saves {r['saves']}; load {r['load_before']} -> {r['load_after']}",
            flush=True,
        )
        result["runs"] = runs
        write()
    result["overhead"] = overhead(runs, a.warmup, a.steps)
    write()
    if recipe is not None and (a.work / "kept").is_dir():
        stores: dict[str, Any] = {"dir": LocalStore(a.work / "dir-store")}
        if a.store:
            stores["s3" if a.store.startswith("s3://") else "extra"] = open_store(a.store)
        result["store"] = store_bench(a.work / "kept", recipe, stores, a.repeats, a.work)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    write()
    print(json.dumps({k: result.get(k) for k in ("overhead", "store")}, indent=1))
    print(res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
