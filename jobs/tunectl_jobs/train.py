"""The train stage: LoRA SFT on an Alpaca data set with TRL's SFTTrainer.

With CUDA and Unsloth installed it uses Unsloth's FastLanguageModel (4-bit QLoRA as the recipe says);
otherwise transformers + PEFT with the same hyperparameters, and every substitution a CPU forces is
recorded in the manifest's `notes`.

Outputs: `adapter/` (LoRA weights + tokenizer with the EOS contract applied), `loss.json`, `loss.png`,
`generations.json` (test prompts before and after training). Beside it, the merge base downloads from the Hub into
the store (prefetch.py). With `training.nproc_per_node`/`nnodes` above one, this program first becomes torchrun's
agent and each worker runs it again (distributed.py).

    python -m tunectl_jobs.train --recipe recipe.yaml --store DIR --run RUN_ID
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from typing import Any

from tunectl import checkpoints as store_checkpoints
from tunectl.errors import ConfigError, Preempted, TunectlError
from tunectl.recipe import LoraSpec, Recipe

from . import chat, checkpoints, data, distributed, evaluate, models
from .prefetch import Prefetch
from .stage import StageContext, run_stage

log = logging.getLogger("tunectl")

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _use_unsloth() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def _load_unsloth(ctx: StageContext, base: str) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # noqa: I001  (unsloth must be imported before transformers)
    import torch

    r = ctx.recipe
    dtype = None if r.model.dtype == "auto" else getattr(torch, r.model.dtype)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base,
        max_seq_length=r.model.max_seq_length,
        dtype=dtype,
        load_in_4bit=r.model.load_in_4bit,
        # Each process of a distributed run on its own GPU.
        **({"device_map": {"": distributed.local_rank()}} if distributed.world_size() > 1 else {}),
    )
    return model, tokenizer


def _peft_unsloth(ctx: StageContext, model: Any) -> Any:
    from unsloth import FastLanguageModel

    lo = ctx.recipe.lora
    return FastLanguageModel.get_peft_model(
        model,
        r=lo.r,
        target_modules=lo.target_modules,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        bias=lo.bias,
        use_gradient_checkpointing=lo.use_gradient_checkpointing,
        random_state=lo.random_state,
        use_rslora=lo.use_rslora,
        loftq_config=lo.loftq_config,
        max_seq_length=ctx.recipe.model.max_seq_length,
    )


def _load_hf(ctx: StageContext, base: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = ctx.recipe
    cuda = torch.cuda.is_available()
    if r.model.load_in_4bit:
        ctx.note("model.load_in_4bit ignored: 4-bit loading needs CUDA and bitsandbytes; training in full precision")
    if cuda:
        dtype = torch.bfloat16 if r.model.dtype == "auto" else getattr(torch, _DTYPES[r.model.dtype])
    else:
        dtype = torch.float32  # CPU kernels for 16-bit training are slow or missing
        if r.model.dtype not in ("auto", "float32"):
            ctx.note(f"model.dtype {r.model.dtype} replaced by float32 on CPU")
    tokenizer = AutoTokenizer.from_pretrained(base)
    device_map = {"": distributed.local_rank()} if cuda else None  # each process of a distributed run: its GPU
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device_map)
    return model, tokenizer


def _peft_hf(ctx: StageContext, model: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    lo = ctx.recipe.lora
    if lo.loftq_config:
        raise ConfigError("lora.loftq_config is only supported with Unsloth on a CUDA GPU")
    if lo.use_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if lo.use_gradient_checkpointing == "unsloth":
            ctx.note("lora.use_gradient_checkpointing 'unsloth' -> standard gradient checkpointing (no Unsloth)")
    torch.manual_seed(lo.random_state)
    config = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        bias=lo.bias,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _layer_dims(module: Any) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt (PEFT: linear, embedding, convolution), None for anything else."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    dims = getattr(module, "in_features", None), getattr(module, "out_features", None)  # Linear, 4-bit Linear
    if all(isinstance(d, int) for d in dims):
        return dims  # type: ignore[return-value]
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2's linear layers
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def check_lora_targets(model: Any, lora: LoraSpec, model_name: str) -> None:
    """Refuse target modules that match no layer of the model, and a rank larger than a targeted layer.

    PEFT and Unsloth report these mid-setup as tracebacks (a list where only some names match is silently
    accepted: fewer layers adapted than the recipe says), and a huge rank runs out of memory. Names match as
    PEFT matches a list: a module's full name, or its last dotted parts.
    """
    dims = {name: _layer_dims(m) for name, m in model.named_modules() if name}
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name}
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, d in dims.items() if d})
    shown = ", ".join(adaptable[:15]) + (", ..." if len(adaptable) > 15 else "")
    unknown: list[str] = []
    smallest: tuple[int, str] | None = None
    for target in lora.target_modules:
        matched = [n for n in dims if n == target or n.endswith("." + target)]
        if not matched:
            unknown.append(target)
            continue
        block = next((n for n in matched if dims[n] is None), None)
        if block is not None:
            raise ConfigError(
                f"lora.target_modules: '{target}' names {kinds[block]} modules ({block}), not layers LoRA can adapt; "
                f"name layers instead: {shown}"
            )
        for n in matched:
            d = dims[n]
            assert d is not None
            if smallest is None or min(d) < smallest[0]:
                smallest = (min(d), n)
    if unknown:
        close = [c for t in unknown for c in difflib.get_close_matches(t, adaptable, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        names, verb = ", ".join(repr(t) for t in unknown), "matches" if len(unknown) == 1 else "match"
        raise ConfigError(
            f"lora.target_modules: {names} {verb} no layer of {model_name}{hint}; its layers LoRA can adapt: {shown}"
        )
    if smallest is not None and lora.r > smallest[0]:
        d = dims[smallest[1]]
        assert d is not None
        raise ConfigError(
            f"lora.r {lora.r} exceeds the rank of the targeted layer {smallest[1]} ({d[0]} in, {d[1]} out): "
            f"set lora.r to {smallest[0]} or less"
        )


def _optimizer(ctx: StageContext, cuda: bool) -> str:
    optim = ctx.recipe.training.optim
    if not cuda and optim in ("adamw_8bit", "paged_adamw_8bit"):
        ctx.note(f"training.optim {optim} -> adamw_torch: 8-bit optimizers need CUDA (same lr, betas, decay)")
        return "adamw_torch"
    return optim


def trained_tokens(history: list[dict[str, Any]], resumed_at: int) -> tuple[float, float] | None:
    """(tokens of the whole run, tokens of this attempt) from TRL's `num_tokens` in the logged steps, or None when
    the trainer logged no count. TRL counts every process's tokens from 0 in each trainer, so after a resume from
    step N the restored history has the earlier attempts' count up to N, and the steps after N this attempt's."""
    before = next((h["num_tokens"] for h in reversed(history) if h["step"] <= resumed_at and h.get("num_tokens")), 0)
    now = next((h["num_tokens"] for h in reversed(history) if h["step"] > resumed_at and h.get("num_tokens")), None)
    return None if now is None else (before + now, now)


def _loss_plot(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", label="training")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="o", label="held-out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cpu_ddp_trainer(base: type) -> type:
    """The trainer for gloo processes on a CPU. transformers (5.17) loads a resumed optimizer state onto
    `args.device`, which is `cpu:0` there, a location torch.load cannot restore to: this loads it onto the CPU."""
    import torch

    class CpuDdpTrainer(base):  # type: ignore[misc, valid-type]
        def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
            load = torch.load

            def on_cpu(*args: Any, **kwargs: Any) -> Any:
                if str(kwargs.get("map_location")) == "cpu:0":
                    kwargs["map_location"] = "cpu"
                return load(*args, **kwargs)

            torch.load = on_cpu
            try:
                super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                torch.load = load

    return CpuDdpTrainer


def _ddp_args(cuda: bool) -> dict[str, Any]:
    return {"ddp_backend": "nccl" if cuda else "gloo", "ddp_find_unused_parameters": False, "use_cpu": not cuda}


def _row_marks(row: dict[str, Any], loss_on: str) -> list[bool] | None:
    """Which tokens of a prepared row the recipe puts the loss on: all of them, or those its marks name (TRL's
    labels, assistant_masks or completion_mask); None where the row has lost its marks."""
    n = len(row["input_ids"])
    if loss_on != "assistant":
        return [True] * n
    if "labels" in row:
        return [x != -100 for x in row["labels"]]
    key = next((k for k in ("assistant_masks", "completion_mask") if k in row), None)
    return None if key is None else [bool(m) for m in row[key]]


def _row_starts(row: dict[str, Any]) -> set[int]:
    """Where the sequences of a prepared row begin: its first token, and each packed sequence's (seq_lengths)."""
    starts, at = {0}, 0
    for length in row.get("seq_lengths") or []:
        starts.add(at)
        at += int(length)
    return starts


def _collated_loss(batch: dict[str, Any], lengths: list[int]) -> list[tuple[list[int], list[bool]]]:
    """The token ids and the positions a causal LM's loss reaches, per row of the collator's input, from its output:
    padded rows (one per input row, right or left padded: the attention mask says where) or one padding-free
    sequence of the rows end to end (position_ids). A label is predicted from the token before it in the same
    sequence, so the first position of every sequence never reaches the loss: the shift drops a padded row's first
    label, and a padding-free sequence's row starts must be -100 or they would be predicted from the row before."""
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    if len(ids) < len(lengths) or ("position_ids" in batch and "attention_mask" not in batch):
        flat_ids, flat_labels = ids[0], labels[0]
        out, at = [], 0
        for n in lengths:
            out.append((flat_ids[at : at + n], [at + j > 0 and flat_labels[at + j] != -100 for j in range(n)]))
            at += n
        return out
    mask = batch["attention_mask"].tolist() if "attention_mask" in batch else [[1] * len(r) for r in ids]
    out = []
    for row_ids, row_labels, row_mask, n in zip(ids, labels, mask, lengths, strict=True):
        keep = [j for j, m in enumerate(row_mask) if m][:n]
        out.append(([row_ids[j] for j in keep], [k > 0 and row_labels[j] != -100 for k, j in enumerate(keep)]))
    return out


def check_loss_tokens(trainer: Any, loss_on: str, source: Any = None, rows: int = 8) -> dict[str, int]:
    """The tokens the trainer's own collator gives the loss in its first rows must be the ones the recipe asks for,
    position by position: every token for `all`; for `assistant`, the answers marked in `source` (assistant_masks),
    which TRL turns into the labels of its processed rows, or the response (completion_mask). Positions the loss can
    never reach (the first of each sequence) are left out on both sides, so padded and padding-free or packed batches
    (Unsloth turns padding-free on by itself on a GPU) give the same count. This is what catches a trainer (Unsloth
    patches TRL's) that drops the marks and trains on the prompts, or moves them."""
    ds = trainer.train_dataset
    batch = [ds[i] for i in range(min(rows, len(ds)))]
    if not batch:
        return {}
    name = type(trainer).__name__
    lengths = [len(row["input_ids"]) for row in batch]
    marks = [_row_marks(row, loss_on) for row in batch]
    if any(m is None for m in marks):
        raise TunectlError("the trainer's data set lost the marks of what trains: it would train on every token")
    want = [[m and j not in _row_starts(row) for j, m in enumerate(row_marks or [])]
            for row, row_marks in zip(batch, marks, strict=True)]  # fmt: skip
    # Packed rows hold several conversations in another order (best-fit): only unpacked rows match the source's.
    packed = any(row.get("seq_lengths") for row in batch)
    if loss_on == "assistant" and not packed and source is not None and "assistant_masks" in source.column_names:
        marked = sum(sum(m) for m in source[: len(batch)]["assistant_masks"])
        have = sum(sum(m or []) for m in marks)
        if marked != have:
            raise TunectlError(
                f"the trainer's data set marks {have} tokens of its first {len(batch)} rows for the loss where "
                f"the conversations' assistant turns have {marked}: it changed the rows"
            )
    got = _collated_loss(trainer.data_collator(batch), lengths)
    differ = []
    for i, (row, (ids, reached), wanted) in enumerate(zip(batch, got, want, strict=True)):
        if ids != list(row["input_ids"]):
            raise TunectlError(f"the trainer's collator changed the tokens of row {i} of its first {len(batch)}: "
                               f"{name} does not keep the rows it is given")  # fmt: skip
        if reached != wanted:
            differ.append(f"row {i} {sum(reached)} not {sum(wanted)}")
    total_got, total_want = sum(sum(r) for _, r in got), sum(sum(w) for w in want)
    if differ:
        raise TunectlError(
            f"the trainer would put the loss on {total_got} tokens of its first {len(batch)} rows where data.train_on "
            f"{loss_on} marks {total_want} ({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}): "
            f"{name} does not keep TRL's masking"
        )
    return {"loss_tokens_checked": total_got, "tokens_checked": sum(lengths)}


def _stopped(signum: int, frame: Any) -> None:
    raise Preempted("stopped by SIGTERM outside a training step: a retry resumes from the newest checkpoint")


def train(ctx: StageContext) -> None:
    # The merge base downloads beside training where it comes from the Hub (prefetch.py); by rank 0 only.
    prefetch = Prefetch.start(ctx.store, ctx.run, ctx.recipe) if distributed.rank() == 0 else None
    try:
        fine_tune(ctx)
        if prefetch is not None:
            with ctx.phase("wait for merge base"):
                done = prefetch.wait()
            ctx.metrics["merge_base_prefetch"] = done
            if "error" in done:
                ctx.note(
                    f"merge base {done['hub_id']} not downloaded ahead ({done['error']}): the merge stage downloads it"
                )
    finally:
        if prefetch is not None:
            prefetch.stop()


def fine_tune(ctx: StageContext) -> None:
    r: Recipe = ctx.recipe
    # SIGTERM outside the training steps ends the stage as preempted at once; within them the store callback saves
    # a checkpoint first (checkpoints.py).
    checkpoints.on_sigterm(_stopped)
    unsloth = _use_unsloth()
    if unsloth:
        # Its own phase: Unsloth patches transformers and TRL (and compiles) as it is imported, a cost status shows.
        with ctx.phase("import unsloth"):
            import unsloth as _  # noqa: F401  (patches transformers/trl; must come before they are imported)
    with ctx.phase("load data"):
        ds, lines = data.load_rows(r.data)
        loaded_rows, lineage = len(ds), data.lineage(r.data, ds)
        ds, eval_ds, lines, eval_lines = data.hold_out(ds, r.data, r.training.seed, lines)
    with ctx.phase("load model"):
        base = models.base_model_path(r.model.name)
        model, tokenizer = (_load_unsloth if unsloth else _load_hf)(ctx, base)
        import torch

        cuda = torch.cuda.is_available()
        contract = models.resolve_token_contract(tokenizer, model.config, getattr(model, "generation_config", None))
        log.info(
            "backend: %s on %s; EOS %r (id %d), pad %r",
            "unsloth" if unsloth else "transformers+peft",
            "cuda" if cuda else "cpu",
            contract["eos_token"],
            contract["eos_token_id"],
            contract["pad_token"],
        )
    template = chat.template_for(r.data, tokenizer, r.model.name) if r.data.is_chat else None
    with ctx.phase("check"):
        check_lora_targets(model, r.lora, r.model.name)
        max_len = r.model.max_seq_length

        def fit_rows(rows: Any, rows_lines: list[int] | None) -> tuple[Any, dict[str, int]]:
            if template is not None:  # conversations: token ids, and marks where the loss is on the answers only
                return chat.tokenized_dataset(
                    rows, r.data, tokenizer, template, contract["stop_token_ids"], max_len, rows_lines
                )
            return data.fit_to_length(rows, r.data, tokenizer, contract["eos_token"], max_len, rows_lines)

        ds, fit = fit_rows(ds, lines)
        if eval_ds is not None:
            eval_ds, eval_fit = fit_rows(eval_ds, eval_lines)
            log.info("held out: %d rows (%d too long, dropped %d)", eval_fit["rows_trained"],
                     eval_fit["rows_too_long"], eval_fit["rows_dropped"])  # fmt: skip
        log.info(
            "rows: %d to train of %d; %d longer than max_seq_length %d (dropped %d, prompt cut %d); longest %d tokens",
            fit["rows_trained"],
            loaded_rows,
            fit["rows_too_long"],
            max_len,
            fit["rows_dropped"],
            fit["rows_prompt_cut"],
            fit["longest_row_tokens"],
        )
        if fit["rows_dropped"]:
            ctx.note(f"data.too_long drop: {fit['rows_dropped']} rows longer than {max_len} tokens not trained on")
        if fit["rows_prompt_cut"]:
            ctx.note(f"data.too_long cut_prompt: {fit['rows_prompt_cut']} rows had their prompt shortened")
    if template is not None:  # the template writes any BOS itself
        prompts = [(tokenizer.apply_chat_template(p.messages(), chat_template=template, tokenize=False,
                                                  add_generation_prompt=True), p.max_new_tokens)
                   for p in r.test_prompts]  # fmt: skip
    else:
        prompts = [(r.prompt_for(p.instruction, p.input), p.max_new_tokens) for p in r.test_prompts]
    stop_ids = contract["stop_token_ids"]

    def answer_test_prompts(when: str) -> list[dict[str, Any]]:
        if not prompts or not r.training.sample_answers or distributed.rank() != 0:
            return []
        with ctx.phase(f"generate {when}"):
            if unsloth:
                from unsloth import FastLanguageModel

                FastLanguageModel.for_inference(model)
            model.eval()
            answers = models.generate(model, tokenizer, prompts, stop_ids, add_special_tokens=template is None)
            return [{"stage": when, **g} for g in answers]

    before = answer_test_prompts("before")

    with ctx.phase("prepare"):
        model = (_peft_unsloth if unsloth else _peft_hf)(ctx, model)
        # Conversations come tokenized (TRL takes input_ids and assistant_masks as they are); Alpaca rows as text,
        # or as prompt and completion where the loss is on the response only (TRL's completion-only loss).

        def trainer_rows(rows: Any) -> Any:
            if template is not None:
                return rows
            if r.data.loss_on == "assistant":
                return data.format_prompt_completion(rows, r.data, contract["eos_token"])
            return data.format_alpaca(rows, r.data, contract["eos_token"])

        train_ds = trainer_rows(ds)
        from trl import SFTConfig, SFTTrainer

        t = r.training
        bf16 = cuda and torch.cuda.is_bf16_supported() and r.model.dtype in ("auto", "bfloat16")
        args = SFTConfig(
            output_dir=str(ctx.out / ".trainer"),
            per_device_train_batch_size=t.per_device_train_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            warmup_steps=t.warmup_steps,
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            optim=_optimizer(ctx, cuda),
            weight_decay=t.weight_decay,
            lr_scheduler_type=t.lr_scheduler_type,
            seed=t.seed,
            logging_steps=t.logging_steps,
            bf16=bf16,
            fp16=cuda and not bf16,
            max_length=r.model.max_seq_length,
            packing=t.packing,
            dataset_text_field="text",
            report_to="none",
            # Saves are the store callback's (checkpoints.py): by steps, by time and on SIGTERM.
            save_strategy="no",
            disable_tqdm=False,
            # TRL turns checkpointing on by default; without Unsloth the recipe's setting must win (Unsloth's
            # get_peft_model has applied it already on its path).
            **({} if unsloth else {"gradient_checkpointing": bool(r.lora.use_gradient_checkpointing)}),
            # Several processes: each takes its share of every batch (DDP); LoRA leaves most weights without grads.
            # On a CPU transformers wraps the model for DDP only with use_cpu (else each process trains alone).
            **(_ddp_args(cuda) if distributed.world_size() > 1 else {}),
        )
        saver = checkpoints.store_checkpoints_callback(ctx.store, ctx.run, r)
        trainer_class = SFTTrainer if cuda or distributed.world_size() == 1 else _cpu_ddp_trainer(SFTTrainer)
        trainer = trainer_class(
            model=model,
            processing_class=tokenizer,
            train_dataset=train_ds,
            eval_dataset=trainer_rows(eval_ds) if eval_ds is not None else None,
            args=args,
            callbacks=[saver],
        )
        # The held-out rows as the trainer tokenizes and labels them; without any, the first training rows, which
        # the gguf stage measures its files on (the fidelity of a quantization, not what the model learned).
        if eval_ds is not None:
            eval_rows: evaluate.Rows | None = evaluate.collated(trainer, trainer.eval_dataset, "held-out")
            if r.training.eval_steps:
                trainer.add_callback(evaluate.callback(eval_rows, r.training.eval_steps, distributed.rank() == 0))
        elif r.export.fidelity_tokens and r.export.gguf:
            eval_rows = evaluate.collated(trainer, trainer.train_dataset, "training", limit=256)
        else:
            eval_rows = None
        loss_tokens = check_loss_tokens(trainer, r.data.loss_on, train_ds)
        if loss_tokens:
            log.info(
                "loss on %d of %d tokens in the first rows (data.train_on %s)",
                loss_tokens["loss_tokens_checked"], loss_tokens["tokens_checked"], r.data.loss_on,
            )  # fmt: skip

    held_out = eval_rows is not None and eval_rows.source == "held-out" and distributed.rank() == 0
    if held_out:
        with ctx.phase("evaluate before"):
            eval_before = evaluate.measure(model, eval_rows)
        log.info("held-out before training: loss %.4f, perplexity %.3f on %d tokens", eval_before["loss"],
                 eval_before["perplexity"], eval_before["tokens"])  # fmt: skip

    with ctx.phase("resume"):
        # A retry or `tunectl resume`: the newest complete checkpoint of this run, if any (same recipe only).
        resume = store_checkpoints.restore(ctx.store, ctx.run, r, ctx.out / ".resume")
        # Once train has published, nothing resumes from its checkpoints.
        ctx.after_publish.append(lambda: store_checkpoints.delete_all(ctx.store, ctx.run))
        if resume:
            log.info("resumed from step %d (checkpoint in the store)", resume[1])
            ctx.metrics["resumed_from_step"] = resume[1]
            ctx.notes.append(f"resumed from step {resume[1]} after a stop (its checkpoint in the store)")

    with ctx.phase("train"):
        if unsloth:
            from unsloth import FastLanguageModel

            FastLanguageModel.for_training(model)
        result = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
    if saver.preempted_at is not None:
        raise Preempted(f"stopped by SIGTERM at step {saver.preempted_at}: checkpoint saved, a retry resumes from it")
    history = [
        {
            "step": h["step"],
            "loss": h["loss"],
            "learning_rate": h.get("learning_rate"),
            "grad_norm": h.get("grad_norm"),
            "num_tokens": h.get("num_tokens"),
        }  # fmt: skip
        for h in trainer.state.log_history
        if "loss" in h
    ]

    if held_out:
        with ctx.phase("evaluate after"):
            eval_after = evaluate.measure(model, eval_rows)
        log.info("held-out after training: loss %.4f, perplexity %.3f", eval_after["loss"], eval_after["perplexity"])
    after = answer_test_prompts("after")

    if distributed.rank() != 0:  # rank 0 saves and publishes what every rank trained alike
        return
    with ctx.phase("save"):
        adapter = ctx.out / "adapter"
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        (ctx.out / "loss.json").write_text(json.dumps(history, indent=1) + "\n")
        evals: list[dict[str, Any]] = []
        if held_out:
            steps = int(result.global_step)
            during = [e for e in evaluate.history(trainer.state.log_history) if 0 < e["step"] < steps]
            evals = [{"step": 0, **eval_before}, *during, {"step": steps, **eval_after}]
            (ctx.out / "eval.json").write_text(json.dumps({"source": "held-out", "rows": len(eval_rows.ids),
                                                          "history": evals}, indent=1) + "\n")  # fmt: skip
        _loss_plot(history, evals, ctx.out / "loss.png", f"{r.name}: {len(history)} logged steps")
        if eval_rows is not None and r.export.fidelity_tokens and r.export.gguf:
            eval_rows.capped(r.export.fidelity_tokens).write(ctx.out / evaluate.HELDOUT)
        (ctx.out / "generations.json").write_text(json.dumps(before + after, indent=1, ensure_ascii=False) + "\n")
        import shutil

        shutil.rmtree(ctx.out / ".trainer", ignore_errors=True)
        shutil.rmtree(ctx.out / ".resume", ignore_errors=True)

    ctx.inputs = {"model": r.model.name, "resolved_model": base, "data": r.data.source, "rows": loaded_rows,
                  **lineage}  # fmt: skip
    resumed_at = resume[1] if resume else 0
    counted = trained_tokens(history, resumed_at)
    tokens, tokens_now = counted or (None, None)
    tokens_basis = "counted"
    if counted is None and len(trainer.train_dataset):
        # Unsloth's trainer logs no count: the rows trained times their mean length in the prepared data set.
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        per_step = r.training.effective_batch_size * sum(lengths) / len(lengths)
        tokens, tokens_now = int(result.global_step) * per_step, (int(result.global_step) - resumed_at) * per_step
        tokens_basis = "estimated: rows trained x their mean length"
    train_s = result.metrics.get("train_runtime", 0.0)
    ctx.metrics = {
        "backend": "unsloth" if unsloth else "transformers+peft",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "processes": distributed.world_size(),
        "rows_per_step": r.training.effective_batch_size,
        "steps": int(result.global_step),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 3),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_trained": int(tokens) if tokens else None,  # every process's, every attempt's
        "tokens_per_s": round(tokens_now / train_s, 1) if tokens_now and train_s else None,  # this attempt's
        "tokens_basis": tokens_basis,
        "model_shape": models.shape(model.config),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "after_stopped_at_eos": all(g["stopped_at_eos"] for g in after) if after else None,
        **fit,
        **loss_tokens,
        **(
            {
                "eval_rows": len(eval_rows.ids),
                "eval_tokens": eval_before["tokens"],
                "eval_loss_before": eval_before["loss"],
                "eval_loss_after": eval_after["loss"],
                "eval_perplexity_before": eval_before["perplexity"],
                "eval_perplexity_after": eval_after["perplexity"],
            }
            if held_out
            else {}
        ),  # fmt: skip
    }
    if template is not None:
        go, why = chat.ollama_template(tokenizer, template)
        trained_as = {"format": r.data.format, "chat_template": template, "train_on": r.data.loss_on,
                      "ollama_template": go, **({"ollama_refusal": why} if why else {})}  # fmt: skip
    else:
        trained_as = {"format": "alpaca", "prompt_template": r.data.prompt_template, "train_on": r.data.loss_on}
    ctx.extra = {"contract": {**contract, **trained_as, "base_model": base}}


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", train, argv, distributed_ok=True)


if __name__ == "__main__":
    sys.exit(main())
