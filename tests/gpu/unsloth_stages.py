"""Run the train and merge stage programs with Unsloth on a CUDA machine, on a random-initialised Llama.

No weights can be downloaded on the GPU test machine, so a Llama with a real model's shape (and its real
tokenizer) is built there with random weights, saved in bf16, and then loaded by the train stage exactly as
the reference recipe loads its base: 4-bit, LoRA r=16 on all seven projections, adamw_8bit. The stages
are the same programs and recipe schema the containers use.

    python tests/gpu/unsloth_stages.py --shape-from DIR --steps 5 --out OUTDIR [--chat]

--chat trains on the bundled conversations (data.format messages) in the shape's own chat template with the loss
on the assistant's turns: the train stage checks that Unsloth's trainer keeps TRL's masking and records how many
tokens of its first rows carry the loss (`loss_tokens_checked`, the same count as on a CPU with transformers),
and 6 conversations are held out and measured before and after training.
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

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "controller/tunectl/recipes/data/ruozhiba-sample.jsonl"
CHAT_SAMPLE = REPO / "controller/tunectl/recipes/data/ruozhiba-chat-sample.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_random_llama(shape_from: Path, dest: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shape_from)
    config.dtype = "bfloat16"
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (shape_from / name).is_file():
            shutil.copy(shape_from / name, dest / name)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape-from", type=Path, required=True, help="dir with config.json + tokenizer of the shape")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tunectl-gpu"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="train,merge")
    ap.add_argument("--chat", action="store_true", help="conversations, loss on the assistant's turns")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    from tunectl.recipe import load_recipe

    t0 = time.time()
    base = build_random_llama(args.shape_from, args.work / "base")
    print(f"random-initialised model from {args.shape_from} in {time.time() - t0:.1f}s", flush=True)
    chat = ["data.format=messages", "data.eval_rows=6", "test_prompts=[{instruction: 鱼在水里会不会口渴？}]"]
    chat = chat if args.chat else []
    recipe = load_recipe(
        "ruozhiba",
        [
            f"model.name={base}",
            "model.max_seq_length=512",
            f"data.source={CHAT_SAMPLE if args.chat else SAMPLE}",
            f"training.max_steps={args.steps}",
            "export.gguf=[]",
            "export.merged_4bit=true",
            *chat,
        ],
    )
    recipe_file = args.work / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())
    store, run = args.work / "store", "gpu-unsloth-chat" if args.chat else "gpu-unsloth"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    summary = {}
    for stage in args.stages.split(","):
        log = args.out / f"{stage}.log"
        with open(log, "w") as f:
            rc = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    f"tunectl_jobs.{stage}",
                    "--recipe",
                    str(recipe_file),
                    "--store",
                    str(store),
                    "--run",
                    run,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
            )
        manifest = store / "runs" / run / stage / "manifest.json"
        summary[stage] = {"exit_code": rc, "manifest": manifest.is_file()}
        print(f"stage {stage}: exit {rc}, manifest {'written' if manifest.is_file() else 'MISSING'}", flush=True)
        if manifest.is_file():
            shutil.copy(manifest, args.out / f"{stage}-manifest.json")
            doc = json.loads(manifest.read_text())
            summary[stage].update(
                metrics=doc["metrics"],
                versions=doc["versions"],
                timings=doc["timings"],
                notes=doc["notes"],
                files=sorted(doc["files"]),
            )
        if rc != 0:
            print(open(log).read()[-4000:])
            break
    for extra in ("loss.json", "generations.json"):
        p = store / "runs" / run / "train" / extra
        if p.is_file():
            shutil.copy(p, args.out / extra)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0 if all(s["exit_code"] == 0 and s["manifest"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
