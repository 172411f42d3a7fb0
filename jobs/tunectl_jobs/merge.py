"""The merge stage: the LoRA adapter exported alone, merged onto the 16-bit base, and (on request) 4-bit.

Merging happens on the 16-bit weights of the base, never on the de-quantized 4-bit weights the adapter
was trained against, unless the recipe asks (`export.merge_onto_4bit`), because rounding the base twice
loses fidelity. The serving contract from training (EOS ids, pad, the prompt as chat template) is checked
and written into each export's configs and tokenizer files (tunectl.contract).

Outputs: `lora/`, `merged-16bit/`, `merged-4bit/` (each only when the recipe exports it).

    python -m tunectl_jobs.merge --recipe recipe.yaml --store DIR --run RUN_ID
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from tunectl.contract import check_model_dir
from tunectl.errors import ConfigError
from tunectl.refs import resolve

from . import models
from .prefetch import MERGE_BASE
from .stage import StageContext, run_stage

log = logging.getLogger("tunectl")


def _is_4bit(config: Any) -> bool:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return False
    q = q if isinstance(q, dict) else q.to_dict()
    return bool(q.get("load_in_4bit")) or q.get("quant_method") == "bitsandbytes" and not q.get("load_in_8bit")


def merge_16bit(ctx: StageContext, adapter: Path, contract: dict[str, Any], dest: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    r = ctx.recipe
    base = merge_base(ctx)
    if _is_4bit(AutoConfig.from_pretrained(base)):
        if not r.export.merge_onto_4bit:
            raise ConfigError(
                f"merge base {base} is stored in 4-bit: set model.merge_base to its 16-bit weights, "
                f"or export.merge_onto_4bit=true to accept the lower fidelity"
            )
        ctx.note(f"merging onto the de-quantized 4-bit weights of {base} (export.merge_onto_4bit): lower fidelity")
    cuda = torch.cuda.is_available()
    out_dtype = {
        "auto": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.bfloat16,
    }[r.model.dtype]
    # On CPU, merge in float32 (exact add of the low-rank update) and round once when saving.
    work_dtype = out_dtype if cuda else torch.float32
    with ctx.phase("load base"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=work_dtype, device_map="cuda" if cuda else None)
    with ctx.phase("merge"):
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model = model.to(out_dtype)
        models.apply_contract_to_generation_config(model, contract)
    with ctx.phase("save merged 16-bit"):
        model.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
        AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(dest)
    ctx.inputs["merge_base"] = r.model.merge_base_name() if "merge_base_revision" in ctx.inputs else base
    ctx.metrics["merged_dtype"] = str(out_dtype).removeprefix("torch.")
    ctx.metrics["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    del model


def merge_base(ctx: StageContext) -> str:
    """The 16-bit base to load: the copy the train stage downloaded into the store while it trained (deleted once
    this stage has published), else the recipe's model, downloaded now if it is a Hub id."""
    name = ctx.recipe.model.merge_base_name()
    ahead = ctx.store.manifest(ctx.run, MERGE_BASE)
    if ahead is None or ahead["inputs"].get("hub_id") != resolve(name, "model").hub_id:
        return models.base_model_path(name)
    with ctx.phase("fetch merge base"):
        fetched = ctx.store.fetch(ctx.run, MERGE_BASE)
    ctx.inputs["merge_base_revision"] = ahead["inputs"]["revision"]

    def drop() -> None:  # the store's entry, and a remote store's local copy: the Hub keeps the original
        ctx.store.delete(ctx.run, MERGE_BASE)
        shutil.rmtree(fetched.path, ignore_errors=True)

    ctx.after_publish.append(drop)
    log.info("merging onto %s@%s, downloaded during training", name, ahead["inputs"]["revision"][:12])
    return str(fetched.path)


def merge_4bit(ctx: StageContext, merged16: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    ctx.note(
        "merged 4-bit export requested: bitsandbytes NF4 loses more fidelity than GGUF q4_k_m; "
        "prefer the 16-bit or GGUF exports for serving"
    )
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with ctx.phase("save merged 4-bit"):
        model = AutoModelForCausalLM.from_pretrained(str(merged16), quantization_config=q, device_map="cuda")
        model.save_pretrained(dest, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(merged16)).save_pretrained(dest)


def check_contract(ctx: StageContext, export: Path, contract: dict[str, Any]) -> None:
    """The exported files must carry the EOS the model was trained to emit and render the training prompt as
    their chat template; what the manifest decides is rewritten (and noted), the rest refused."""
    for line in check_model_dir(export, contract):
        ctx.note(f"{export.name}/{line}")


def merge(ctx: StageContext) -> None:
    r = ctx.recipe
    if r.export.merged_4bit:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("export.merged_4bit needs a CUDA GPU (bitsandbytes); set export.merged_4bit=false")
    with ctx.phase("fetch train"):
        train = ctx.store.fetch(ctx.run, "train")
    contract = train.manifest["contract"]
    adapter = train.file("adapter")
    ctx.inputs = {"train": {"files": len(train.manifest["files"]), "finished": train.manifest["timings"]["finished"]}}
    exports = []
    if r.export.lora:
        shutil.copytree(adapter, ctx.out / "lora", dirs_exist_ok=True)
        check_contract(ctx, ctx.out / "lora", contract)
        exports.append("lora")
    if r.export.merged_16bit or r.export.merged_4bit:
        merge_16bit(ctx, adapter, contract, ctx.out / "merged-16bit")
        check_contract(ctx, ctx.out / "merged-16bit", contract)
        exports.append("merged-16bit")
    if r.export.merged_4bit:
        merge_4bit(ctx, ctx.out / "merged-16bit", ctx.out / "merged-4bit")
        check_contract(ctx, ctx.out / "merged-4bit", contract)
        exports.append("merged-4bit")
        if not r.export.merged_16bit:
            shutil.rmtree(ctx.out / "merged-16bit")
            exports.remove("merged-16bit")
    ctx.metrics["exports"] = exports
    ctx.extra = {"contract": contract}


def main(argv: list[str] | None = None) -> int:
    return run_stage("merge", merge, argv)


if __name__ == "__main__":
    sys.exit(main())
