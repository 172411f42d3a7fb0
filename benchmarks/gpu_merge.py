"""The merge stage on a GPU with the Llama-3-8B-shaped model: wall time, peak memory, and fidelity (issue #7).

Runs after `benchmarks/gpu_train.py run`, which leaves in WORK the 16-bit base, its `-bnb-4bit` checkpoint,
the recipe files and a store with the train stage's adapter. The merge stage program runs in a child
process (`tunectl_jobs.merge.main`, exactly what `python -m tunectl_jobs.merge` runs) so its peak GPU
memory is its own; then this script checks the merged weights it published against

- PEFT's own `merge_and_unload` of the same adapter onto the same 16-bit base, done here independently
  (max abs difference over every tensor; expected 0: same operation, same dtype), and
- an fp32 reference W + (alpha/r) * B @ A rounded once to bf16 (how far the bf16 merge is from exact).

    python benchmarks/gpu_merge.py --work /tmp/tunectl-bench --run bench-tunectl --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "controller", REPO / "jobs"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

BASE_DIR = "llama-3-8b-shape"


def stage(work: Path, run: str, out_json: Path) -> int:
    """The merge stage program, in this process, timed; its peak GPU memory recorded."""
    import torch

    from tunectl_jobs import merge

    recipe = work / f"recipe-{run.removeprefix('bench-')}.yaml"
    store = work / "store"
    t0 = time.time()
    rc = merge.main(["--recipe", str(recipe), "--store", str(store), "--run", run])
    wall = time.time() - t0
    manifest = store / "runs" / run / "merge" / "manifest.json"
    doc = json.loads(manifest.read_text()) if manifest.is_file() else {}
    result = {
        "exit_code": rc,
        "stage_wall_s": round(wall, 2),
        "timings": doc.get("timings"),
        "metrics": doc.get("metrics"),
        "notes": doc.get("notes"),
        "inputs": doc.get("inputs"),
        "merged_bytes": sum(v["size"] for k, v in doc.get("files", {}).items() if k.startswith("merged-16bit/")),
    }
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name(0)
        result["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    out_json.write_text(json.dumps(result, indent=1, default=str))
    return rc


def verify(work: Path, run: str) -> dict[str, Any]:
    """Merged 16-bit files vs PEFT merge_and_unload (same base) and vs an fp32 reference."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    base = work / BASE_DIR
    train_dir = work / "store" / "runs" / run / "train"
    adapter = train_dir / "adapter"
    merged = work / "store" / "runs" / run / "merge" / "merged-16bit"
    t0 = time.time()
    dtype = torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=dev if cuda else None)
    ref = PeftModel.from_pretrained(ref, str(adapter)).merge_and_unload()
    ref_sd = ref.state_dict()
    t_ref = time.time() - t0

    # The adapter's LoRA pairs, keyed by the base weight they update.
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    lora: dict[str, dict[str, Any]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt", device=dev) as f:
        for k in f.keys():
            for part in ("lora_A", "lora_B"):
                if f".{part}." in k:
                    wkey = k.removeprefix("base_model.model.").replace(f".{part}.weight", ".weight")
                    lora.setdefault(wkey, {})[part] = f.get_tensor(k)
    base_files = {}
    for p in sorted(base.glob("*.safetensors")):
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for k in f.keys():
                base_files[k] = p

    out: dict[str, Any] = {
        "tensors": 0,
        "max_abs_diff_vs_peft": 0.0,
        "tensors_differing_from_peft": 0,
        "lora_weights": 0,
        "max_abs_diff_vs_fp32": 0.0,
        "max_abs_diff_bf16_of_fp32": 0.0,
        "max_abs_lora_delta": 0.0,
        "elements_changed_by_merge": 0,
        "elements_in_lora_weights": 0,
        "missing_in_merged": [],
        "extra_in_merged": [],
    }
    seen = set()
    for p in sorted(merged.glob("*.safetensors")):
        with safe_open(str(p), framework="pt", device=dev) as f:
            for k in f.keys():
                seen.add(k)
                m = f.get_tensor(k)
                if k not in ref_sd:
                    out["extra_in_merged"].append(k)
                    continue
                r = ref_sd[k].to(dev)
                d = (m.float() - r.float()).abs().max().item() if m.numel() else 0.0
                out["tensors"] += 1
                out["max_abs_diff_vs_peft"] = max(out["max_abs_diff_vs_peft"], d)
                out["tensors_differing_from_peft"] += int(d > 0 or m.dtype != r.dtype or m.shape != r.shape)
                if k in lora:
                    with safe_open(str(base_files[k]), framework="pt", device=dev) as fb:
                        w = fb.get_tensor(k)
                    delta = scale * (lora[k]["lora_B"].float() @ lora[k]["lora_A"].float())
                    exact = w.float() + delta
                    out["lora_weights"] += 1
                    out["max_abs_diff_vs_fp32"] = max(
                        out["max_abs_diff_vs_fp32"], (m.float() - exact).abs().max().item()
                    )
                    out["max_abs_diff_bf16_of_fp32"] = max(
                        out["max_abs_diff_bf16_of_fp32"], (m.float() - exact.to(m.dtype).float()).abs().max().item()
                    )
                    out["max_abs_lora_delta"] = max(out["max_abs_lora_delta"], delta.abs().max().item())
                    out["elements_changed_by_merge"] += int((m != w).sum().item())
                    out["elements_in_lora_weights"] += m.numel()
                    del w, delta, exact
                del m, r
    out["missing_in_merged"] = sorted(set(ref_sd) - seen)[:20]
    out["lora_pairs_in_adapter"] = len(lora)
    out["merged_dtype"] = str(next(iter(ref_sd.values())).dtype)
    out["peft_reference_s"] = round(t_ref, 1)
    out["verify_s"] = round(time.time() - t0, 1)
    out["equal_to_peft"] = out["max_abs_diff_vs_peft"] == 0.0 and not out["missing_in_merged"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", default="run", choices=["run", "stage"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tunectl-bench"))
    ap.add_argument("--run", default="bench-tunectl", help="the benchmark run whose train stage to merge")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "stage":
        return stage(a.work, a.run, a.json)
    a.out.mkdir(parents=True, exist_ok=True)
    sj = a.work / f"merge-stage-{a.run}.json"
    sj.unlink(missing_ok=True)
    log = a.out / "merge.log"
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "stage",
                "--work",
                str(a.work),
                "--run",
                a.run,
                "--json",
                str(sj),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    result: dict[str, Any] = {"run": a.run, "exit_code": rc, "process_s": round(time.time() - t0, 1)}
    if sj.is_file():
        result["stage"] = json.loads(sj.read_text())
    print(json.dumps(result, indent=1, default=str), flush=True)
    if rc == 0:
        result["verify"] = verify(a.work, a.run)
        print(json.dumps(result["verify"], indent=1), flush=True)
    (a.out / "merge.json").write_text(json.dumps(result, indent=1, default=str))
    ok = rc == 0 and result.get("verify", {}).get("equal_to_peft", False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
