"""Training throughput on a GPU: the tunectl train stage vs plain Unsloth vs transformers + PEFT (issue #7).

A random-initialised Llama with Llama-3-8B's shape (32 layers, hidden 4096, intermediate 14336, 32 heads /
8 KV heads, vocab 128256) is built on the GPU in bf16 and saved twice, the way the reference recipe's
models are published: a 16-bit base (the merge base) and a bitsandbytes NF4 "-bnb-4bit" checkpoint
(what `ruozhiba` trains on, like `unsloth/llama-3-8b-bnb-4bit`). Each configuration then runs in its own
process on the same synthetic Chinese Alpaca rows, seed and step count:

    tunectl          python -m tunectl_jobs.train's own code (in-process `main()`), ruozhiba recipe values
    unsloth          a plain hand-written Unsloth + TRL script with the same settings
    hf               transformers + PEFT + bitsandbytes 4-bit, SDPA, gradient checkpointing (TRL SFTTrainer)
    hf-kbit          the same plus PEFT's prepare_model_for_kbit_training (the classic QLoRA recipe)
    tunectl-fast     the train stage with the throughput preset (one micro-batch of 4 rows, no recompute)
    tunectl-fast8    the same with 8 rows per micro-batch (8 rows per optimizer step); -fast16: 16 rows
    tunectl-fast-bf16  tunectl-fast on the 16-bit base (model.load_in_4bit=false)

NAME#2 in --configs runs NAME again (a repeat, for run-to-run noise). Results and docs: docs/gpu-benchmarks.md.

A callback (added to every trainer through `transformers`' CallbackHandler, so the stage code is untouched)
times each optimizer step after a CUDA synchronize and counts the non-padding tokens each forward sees.

    python benchmarks/gpu_train.py run --out OUTDIR [--configs tunectl,unsloth,hf] [--steps 15] [--warmup 3]
    python benchmarks/gpu_train.py plot RESULTS.json [...] --png OUT.png
    python benchmarks/gpu_train.py run --tiny ...      # CPU smoke test of the whole script on a tiny shape

No tokenizer for a 128256-token vocabulary is available offline: the rows are tokenized with SmolLM2's
tokenizer (ids < 49152) and the embedding and output head keep Llama-3's 128256 rows. Embedding lookups cost
the same whatever the ids, and the output head and the loss always run over all 128256 logits, so the
arithmetic per token is Llama-3-8B's; only the text-to-token ratio differs, and the rows are sized in tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "controller", REPO / "jobs"):  # the stage programs run from the checkout, as on the device
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
SHAPE_TOKENIZER = REPO / ".gpu" / "smollm2-shape"

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "tie_word_embeddings": False,
}
TINY = {
    **LLAMA3_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_BF16_DENSE_TFLOPS = 989.0
BASE_DIR, Q4_DIR = "llama-3-8b-shape", "llama-3-8b-shape-bnb-4bit"
EOS, PAD = "<|im_end|>", "<|endoftext|>"

# Configurations: backend + the recipe values that differ from `ruozhiba` (batch 1 x grad-accum 4,
# Unsloth gradient checkpointing).
CONFIGS: dict[str, dict[str, Any]] = {
    "tunectl": {"backend": "tunectl", "bs": 1, "ga": 4, "gc": "unsloth"},
    "unsloth": {"backend": "unsloth", "bs": 1, "ga": 4, "gc": "unsloth"},
    "hf": {"backend": "hf", "bs": 1, "ga": 4, "gc": True},
    # The classic PEFT QLoRA recipe: prepare_model_for_kbit_training (non-quantized weights upcast to fp32).
    "hf-kbit": {"backend": "hf", "bs": 1, "ga": 4, "gc": True, "kbit": True},
    "tunectl-fast": {"backend": "tunectl", "bs": 4, "ga": 1, "gc": False},
    "tunectl-fast8": {"backend": "tunectl", "bs": 8, "ga": 1, "gc": False},
    "tunectl-fast16": {"backend": "tunectl", "bs": 16, "ga": 1, "gc": False},
    # The throughput preset on the 16-bit base (LoRA instead of QLoRA: no NF4 de-quantisation in each pass).
    "tunectl-fast-bf16": {"backend": "tunectl", "bs": 4, "ga": 1, "gc": False, "base16": True},
}
# Rough seconds a configuration needs besides its steps (start, imports, model load, save), to skip what
# cannot finish before the deadline.
START_S = {"tunectl": 110, "unsloth": 100, "hf": 90}


# ---------------------------------------------------------------------------------------------------
# FLOPs


def model_flops(cfg: dict[str, Any], lora_r: int = 16) -> dict[str, float]:
    """Model FLOPs for LoRA training with a frozen base (the issue's "about 4N per token plus attention").

    Every frozen linear (the output head included) costs 2n forward + 2n for the input gradients; the LoRA
    matrices also get weight gradients (6 per parameter); attention costs 4 * layers * hidden per causal
    (query, key) pair forward (QK^T and AV), times 3 with its backward. Recompute is not counted (MFU, not
    HFU); embedding lookups cost nothing.
    """
    d, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    dkv = cfg["num_key_value_heads"] * cfg["head_dim"]
    dq = cfg["num_attention_heads"] * cfg["head_dim"]
    shapes = [(d, dq), (d, dkv), (d, dkv), (dq, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    n_layer = sum(a * b for a, b in shapes)
    n_frozen = L * n_layer + d * v
    n_lora = L * sum(lora_r * (a + b) for a, b in shapes)
    return {
        "n_frozen_linear": n_frozen,
        "n_lora": n_lora,
        "per_token": 4.0 * n_frozen + 6.0 * n_lora,
        "per_pair": 12.0 * L * dq,
        "per_token_6n": 6.0 * (n_frozen + n_lora),
    }


# ---------------------------------------------------------------------------------------------------
# The model


def build(work: Path, tiny: bool, seed: int = 0) -> dict[str, Any]:
    """Random Llama-3-8B-shaped model: 16-bit base + NF4 checkpoint (the recipe's `-bnb-4bit` form)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    base, q4 = work / BASE_DIR, work / Q4_DIR
    if (q4 / ".complete").is_file():
        return json.loads((q4 / ".complete").read_text())
    for p in (base, q4):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(SHAPE_TOKENIZER)
    tok.eos_token, tok.pad_token = EOS, PAD
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), **ids)
    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    t_init = time.time() - t0
    model.save_pretrained(base, max_shard_size="5GB")
    tok.save_pretrained(base)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    t_save = time.time() - t0 - t_init
    if cuda and importlib.util.find_spec("bitsandbytes"):
        from transformers import BitsAndBytesConfig

        torch.cuda.empty_cache()
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        m4 = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quant, dtype=torch.bfloat16, device_map="cuda"
        )
        m4.save_pretrained(q4)
        tok.save_pretrained(q4)
        del m4
        quantized = True
    else:  # CPU smoke test: no bitsandbytes; the stage ignores load_in_4bit on a CPU anyway
        shutil.copytree(base, q4)
        quantized = False
    info = {
        "params": n_params,
        "shape": TINY if tiny else LLAMA3_8B,
        "init_s": round(t_init, 1),
        "save_bf16_s": round(t_save, 1),
        "build_s": round(time.time() - t0, 1),
        "nf4": quantized,
        "base_gb": round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9, 2),
        "q4_gb": round(sum(f.stat().st_size for f in q4.glob("*.safetensors")) / 1e9, 2),
    }
    (q4 / ".complete").write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------------
# Synthetic Chinese Alpaca rows (original text, composed from the word lists below)

_TOPICS = (
    "季节变化 城市交通 家庭厨房 古代诗词 手机电池 植物生长 天气预报 "
    "社区图书馆 健康饮食 长途旅行 小学数学 太阳系 垃圾分类 学习方法 时间管理 "
    "绿茶 传统节日 电子邮件 河流与湖泊 宠物照顾 家用电器 森林防火 地铁换乘 "
    "网上购物 跑步锻炼"
).split()
_SUBJECTS = (
    "小明 一位老师 这只橘猫 城里的居民 一位厨师 我的邻居 很多学生 "
    "这家小店的老板 一位老农民 年轻的工程师 图书管理员 公交司机 山里的孩子 "
    "一位医生 旅行者 爷爷"
).split()
_VERBS = (
    "认真地研究了 慢慢地整理了 仔细观察了 重新设计了 耐心地解释了 悄悄地记录了 "
    "反复比较了 高兴地分享了 简单地介绍了 努力地改进了 偶然发现了 系统地总结了"
).split()
_OBJECTS = (
    "窗台上的花盆 每天的作息时间 厨房里的调料 河边的小路 旧书架上的资料 "
    "晚饭的菜单 手机里的照片 学校附近的车站 冬天的取暖方法 一份详细的计划 "
    "雨后的天空 节省用电的办法 菜市场的价格 山上的小树林 周末的安排 "
    "自行车的零件"
).split()
_ADVERBIALS = (
    "在一个下雨的早晨 每到周末 经过三个星期的努力 在朋友的帮助下 趁着放假的时候 "
    "为了让大家更方便 在很短的时间里 按照老师的建议 在安静的夜晚 为了节省开支"
).split()
_REASONS = (
    "因为这样可以节省很多时间 所以大家都觉得很有意思 但是结果和想象的不太一样 "
    "而且这个办法并不复杂 然而还有一些细节需要注意 因此第二天的效果明显更好 "
    "同时也让家里变得更加整洁 这说明耐心比速度更重要 于是他决定把经验写下来"
).split()
_OPENERS = ["首先，", "其次，", "另外，", "此外，", "最后，", "总的来说，", "举个例子，", "需要注意的是，", ""]
_INSTRUCTIONS = [
    "请用中文回答下面关于{t}的问题。",
    "根据输入的内容，写一段关于{t}的说明文字。",
    "请总结下面这段话的要点，并谈谈你的看法。",
    "只能用中文回答问题。",
    "请把下面关于{t}的描述改写得更通顺、更有条理。",
    "假设你是一位{t}方面的专家，请给出详细的建议。",
]
_QUESTIONS = [
    "为什么{s}{a}{v}{o}？",
    "{t}和我们的日常生活有什么关系？",
    "如果{s}没有{v}{o}，会发生什么？",
    "怎样才能更好地了解{t}？",
    "{s}{v}{o}以后，接下来应该做什么？",
]


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_OPENERS)}{rng.choice(_SUBJECTS)}{rng.choice(_ADVERBIALS)}"
        f"{rng.choice(_VERBS)}{rng.choice(_OBJECTS)}，{rng.choice(_REASONS)}。"
    )


def make_rows(
    tokenizer: Any, n: int, seed: int = 3407, mean: int = 760, sd: int = 110
) -> tuple[list[dict[str, str]], list[int]]:
    """Alpaca rows whose formatted text (template + EOS) is about `mean` tokens; returns rows and lengths."""
    from tunectl.recipe import ALPACA_TEMPLATE

    rng = random.Random(seed)
    rows, lengths = [], []

    def n_tokens(row: dict[str, str]) -> int:
        return len(tokenizer(ALPACA_TEMPLATE.format(**row) + EOS, add_special_tokens=False)["input_ids"])

    for _ in range(n):
        t = rng.choice(_TOPICS)
        fill = {"t": t, "s": rng.choice(_SUBJECTS), "a": rng.choice(_ADVERBIALS), "v": rng.choice(_VERBS)}
        fill["o"] = rng.choice(_OBJECTS)
        kind = rng.random()
        if kind < 0.3:
            inp = ""
        elif kind < 0.7:
            inp = rng.choice(_QUESTIONS).format(**fill)
        else:
            inp = "".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
        row = {"instruction": rng.choice(_INSTRUCTIONS).format(t=t), "input": inp, "output": ""}
        target = int(min(max(rng.gauss(mean, sd), mean - 2 * sd), mean + 2 * sd))
        k = n_tokens(row)
        while k < target:  # add sentences up to the target; keep the last one only if that lands closer
            prev, prev_k = row["output"], k
            row["output"] += _sentence(rng)
            k = n_tokens(row)
            if k - target > target - prev_k and prev:
                row["output"], k = prev, prev_k
                break
        rows.append(row)
        lengths.append(k)
    return rows, lengths


def write_data(work: Path, n: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tunectl.recipe import ALPACA_TEMPLATE

    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(work / Q4_DIR)
    rows, lengths = make_rows(tok, n)
    with open(d / "alpaca.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(d / "text.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": ALPACA_TEMPLATE.format(**r) + EOS}, ensure_ascii=False) + "\n")
    lengths.sort()
    return {
        "rows": n,
        "tokens_mean": round(sum(lengths) / n, 1),
        "tokens_min": lengths[0],
        "tokens_median": lengths[n // 2],
        "tokens_max": lengths[-1],
        "chars_mean": round(sum(len(r["instruction"] + r["input"] + r["output"]) for r in rows) / n, 1),
        "example": rows[0],
    }


# ---------------------------------------------------------------------------------------------------
# The probe: step timer + token counter, added to whatever trainer the code under test builds


class Probe:
    def __init__(self, pad_id: int | None, profile_from: int | None = None):
        self.pad_id = pad_id
        self.profile_from = profile_from  # global step after which the remaining steps run under torch.profiler
        self._prof: Any = None
        self._prof_t0, self._prof_step0 = 0.0, 0
        self.profile: dict[str, Any] = {}
        self.steps: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self._pending: list[tuple[Any, ...]] = []
        self._emb_pending: list[Any] = []
        self.tokens = self.pairs = self.seqs = self.slots = 0
        self.emb_tokens = 0
        self._hooks: list[Any] = []
        self.t0 = 0.0

    # forward pre-hooks -------------------------------------------------------------------------
    def _pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        am, pos, psl = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("packed_seq_lengths")
        if not self.info.get("batch"):
            self.info["batch"] = {
                "input_ids": list(ids.shape),
                "keys": sorted(k for k, v in kwargs.items() if v is not None),
            }
        if psl is not None:
            self._pending.append(("psl", psl, ids.numel()))
        elif am is not None and am.dim() == 2:
            self._pending.append(("mask", am.sum(-1), ids.numel()))
        elif pos is not None:
            self._pending.append(("pos", pos, ids.numel()))
        else:
            self._pending.append(("rows", ids.shape, ids.numel()))

    def _emb_pre(self, module: Any, args: tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if ids is not None and getattr(ids, "dtype", None) is not None and not ids.is_floating_point():
            self._emb_pending.append((ids != self.pad_id).sum() if self.pad_id is not None else ids.numel())

    def _flush(self) -> None:
        import torch

        for kind, x, slots in self._pending:
            if kind == "psl":
                lens = [int(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]
            elif kind == "mask":
                lens = [int(v) for v in x.tolist()]
            elif kind == "pos":
                p = x.reshape(-1)
                starts = torch.nonzero(p == 0).reshape(-1).tolist() or [0]
                lens = [b - a for a, b in zip(starts, starts[1:] + [p.numel()], strict=True)]
            else:
                lens = [int(x[-1])] * int(x[0])
            self.tokens += sum(lens)
            self.pairs += sum(n * (n + 1) // 2 for n in lens)
            self.seqs += len(lens)
            self.slots += slots
        self._pending.clear()
        for v in self._emb_pending:
            self.emb_tokens += int(v)
        self._emb_pending.clear()

    # trainer callback --------------------------------------------------------------------------
    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        probe = self

        def sync() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        class _CB(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                if model is not None and not probe._hooks:
                    probe._hooks.append(probe_hook(model, probe._pre, with_kwargs=True))
                    emb = model.get_input_embeddings()
                    probe._hooks.append(emb.register_forward_pre_hook(probe._emb_pre))
                    head = model.get_output_embeddings()
                    probe.info.update(
                        model_class=type(model).__name__,
                        lm_head=list(head.weight.shape) if head is not None else None,
                        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                        gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                    )
                sync()
                probe.t0 = time.perf_counter()

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if probe.profile_from is not None and state.global_step == probe.profile_from and not probe._prof:
                    probe.start_profile()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync()
                t = time.perf_counter() - probe.t0
                probe._flush()
                probe.steps.append(
                    {
                        "step": state.global_step,
                        "t": round(t, 4),
                        "tokens": probe.tokens,
                        "pairs": probe.pairs,
                        "seqs": probe.seqs,
                        "slots": probe.slots,
                        "emb_tokens": probe.emb_tokens,
                    }
                )

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and "loss" in logs:
                    keep = ("loss", "grad_norm", "learning_rate", "num_tokens")
                    probe.logs.append(
                        {"step": state.global_step, **{k: logs[k] for k in keep if k in logs}},
                    )

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if probe._prof is not None:
                    sync()
                    probe.stop_profile(state.global_step)
                for h in probe._hooks:
                    h.remove()
                if torch.cuda.is_available():
                    probe.info["peak_alloc_train_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)

        return _CB()

    def start_profile(self) -> None:
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)
        self._prof.__enter__()
        self._prof_t0 = time.perf_counter()
        self._prof_step0 = len(self.steps)

    def stop_profile(self, step: int) -> None:
        """How much of the profiled steps' wall time the GPU spent running kernels (union of kernel intervals,
        so overlapping streams count once), and which kernels took it."""
        from torch.autograd import DeviceType

        wall = time.perf_counter() - self._prof_t0
        self._prof.__exit__(None, None, None)
        kernels = [
            e
            for e in self._prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy, end = 0.0, float("-inf")
        for a, b in spans:
            if b > end:
                busy += b - max(a, end)
                end = b
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
        n = max(1, step - self.profile_from) if self.profile_from is not None else 1
        self.profile = {
            "steps": n,
            "wall_s_per_step": round(wall / n, 4),  # includes the profiler's own overhead
            "gpu_busy_s_per_step": round(busy / 1e6 / n, 4),
            "kernels_per_step": round(len(kernels) / n),
            "top_kernels": [[name[:120], round(sum(v) / 1e3 / n, 2), len(v) // n] for name, v in top],
        }
        self._prof = None

    def install(self) -> None:
        """Add the callback to every trainer built from now on, without touching the code that builds it."""
        import transformers.trainer_callback as tcb

        cb = self.callback()
        orig = tcb.CallbackHandler.__init__

        def init(handler: Any, *a: Any, **k: Any) -> None:
            orig(handler, *a, **k)
            handler.add_callback(cb)

        tcb.CallbackHandler.__init__ = init  # type: ignore[method-assign]

    def summary(self, warmup: int, flops: dict[str, float], peak_tflops: float) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "log": self.logs, **self.info}
        if self.profile:
            out["profile"] = self.profile
        steps = self.steps[: self._prof_step0] if self.profile else self.steps  # profiled steps run slower
        if len(steps) <= warmup:
            return out
        a, b = steps[warmup - 1] if warmup else {"t": 0.0, "tokens": 0, "pairs": 0, "seqs": 0}, steps[-1]
        secs = b["t"] - a["t"]
        tokens, pairs = b["tokens"] - a["tokens"], b["pairs"] - a["pairs"]
        step_s = sorted(y["t"] - x["t"] for x, y in zip(steps[warmup - 1 : -1], steps[warmup:], strict=True))
        model_flop = tokens * flops["per_token"] + pairs * flops["per_pair"]
        out["timed"] = {
            "steps": len(steps) - warmup,
            "after_warmup_steps": warmup,
            "seconds": round(secs, 3),
            "tokens": tokens,
            "sequences": b["seqs"] - a["seqs"],
            "tokens_per_s": round(tokens / secs, 1),
            "step_s_median": round(step_s[len(step_s) // 2], 4),
            "mean_seq_tokens": round(tokens / max(1, b["seqs"] - a["seqs"]), 1),
            "model_tflops_per_s": round(model_flop / secs / 1e12, 2),
            "mfu": round(model_flop / secs / 1e12 / peak_tflops, 4),
            "mfu_6n": round(tokens * flops["per_token_6n"] / secs / 1e12 / peak_tflops, 4),
            "padding_slots": (b["slots"] - a["slots"]) - tokens,
        }
        return out


def probe_hook(model: Any, fn: Any, with_kwargs: bool) -> Any:
    return model.register_forward_pre_hook(fn, with_kwargs=with_kwargs)


# ---------------------------------------------------------------------------------------------------
# The three ways to train


def _common_sft(cfg: dict[str, Any], steps: int, out: Path, bf16: bool) -> dict[str, Any]:
    """The ruozhiba recipe's training values, as the train stage passes them to SFTConfig."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": cfg["bs"],
        "gradient_accumulation_steps": cfg["ga"],
        "warmup_steps": 5,
        "max_steps": steps,
        "learning_rate": 2e-4,
        "optim": "adamw_8bit" if bf16 else "adamw_torch",
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "seed": 3407,
        "logging_steps": 1,
        "bf16": bf16,
        "fp16": False,
        "max_length": 2048,
        "packing": False,
        "dataset_text_field": "text",
        "report_to": "none",
        "save_strategy": "no",
    }


def run_tunectl(cfg: dict[str, Any], work: Path, steps: int, tag: str) -> dict[str, Any]:
    """The train stage itself: the ruozhiba recipe with the benchmark's model, data and step count."""
    from tunectl.recipe import load_recipe
    from tunectl_jobs import train as stage

    sets = [
        f"model.name={work / Q4_DIR}",
        f"data.source={work / 'data' / 'alpaca.jsonl'}",
        f"training.max_steps={steps}",
        "export.gguf=[]",
        "test_prompts=[]",
    ]
    if cfg["bs"] != 1 or cfg["ga"] != 4:
        sets += [
            f"training.per_device_train_batch_size={cfg['bs']}",
            f"training.gradient_accumulation_steps={cfg['ga']}",
        ]
    if cfg["gc"] != "unsloth":
        sets.append(f"lora.use_gradient_checkpointing={str(cfg['gc']).lower()}")
    if cfg.get("base16"):
        sets[0] = f"model.name={work / BASE_DIR}"
        sets.append("model.load_in_4bit=false")
    recipe = load_recipe("ruozhiba", sets)
    rfile = work / f"recipe-{tag}.yaml"
    rfile.write_text(recipe.to_yaml())
    store = work / "store"
    rc = stage.main(["--recipe", str(rfile), "--store", str(store), "--run", f"bench-{tag}"])
    manifest = store / "runs" / f"bench-{tag}" / "train" / "manifest.json"
    doc = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return {
        "exit_code": rc,
        "overrides": sets,
        "manifest_metrics": doc.get("metrics"),
        "manifest_notes": doc.get("notes"),
        "phases": doc.get("timings", {}).get("phases"),
        "versions": doc.get("versions"),
    }


def run_unsloth(cfg: dict[str, Any], work: Path, steps: int, tag: str) -> dict[str, Any]:
    """What a user writes from the Unsloth notebook, with the recipe's values."""
    from unsloth import FastLanguageModel  # noqa: I001
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(work / Q4_DIR), max_seq_length=2048, dtype=None, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=TARGET_MODULES,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing=cfg["gc"],
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
        max_seq_length=2048,
    )
    ds = load_dataset("json", data_files=str(work / "data" / "text.jsonl"), split="train")
    args = SFTConfig(**_common_sft(cfg, steps, work / f"out-{tag}", torch.cuda.is_bf16_supported()))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=ds, args=args)
    trainer.train()
    return {"exit_code": 0}


def run_hf(cfg: dict[str, Any], work: Path, steps: int, tag: str) -> dict[str, Any]:
    """transformers + PEFT + bitsandbytes 4-bit, SDPA attention, gradient checkpointing, through TRL."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(work / Q4_DIR)
    model = AutoModelForCausalLM.from_pretrained(
        work / Q4_DIR,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="cuda" if cuda else None,
        attn_implementation="sdpa",
    )
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGET_MODULES, task_type="CAUSAL_LM"
    )
    if cfg.get("kbit"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(cfg["gc"]), gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    ds = load_dataset("json", data_files=str(work / "data" / "text.jsonl"), split="train")
    args = SFTConfig(
        **_common_sft(cfg, steps, work / f"out-{tag}", cuda),
        gradient_checkpointing=bool(cfg["gc"]),
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    set_seed(3407)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=ds, args=args, peft_config=lora)
    trainer.train()
    return {"exit_code": 0, "attn_implementation": model.config._attn_implementation}


def worker(name: str, work: Path, steps: int, warmup: int, out_json: Path, tiny: bool, profile: int = 0) -> int:
    import importlib.util

    cfg = CONFIGS[name.split("#")[0]]  # NAME#2: a repeat of NAME
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if cfg["backend"] == "unsloth" and not has_unsloth:
        out_json.write_text(json.dumps({"name": name, "ok": False, "error": "unsloth is not installed"}))
        return 2
    import torch

    if cfg["backend"] in ("tunectl", "unsloth") and has_unsloth and torch.cuda.is_available():
        import unsloth  # noqa: F401  (before transformers, as the stage does)
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(work / Q4_DIR).pad_token_id
    probe = Probe(pad_id, profile_from=steps - profile if profile else None)
    probe.install()
    result: dict[str, Any] = {"name": name, **cfg, "steps_requested": steps}
    t0 = time.time()
    try:
        fn = {"tunectl": run_tunectl, "unsloth": run_unsloth, "hf": run_hf}[cfg["backend"]]
        result.update(fn(cfg, work, steps, name.split("#")[0]))
        result["ok"] = result.get("exit_code") == 0
    except Exception as e:  # recorded, so one failing configuration does not hide the others
        import traceback

        traceback.print_exc()
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    result["wall_s"] = round(time.time() - t0, 1)
    cuda = torch.cuda.is_available()
    flops = model_flops(TINY if tiny else LLAMA3_8B)
    result.update(probe.summary(warmup, flops, H100_BF16_DENSE_TFLOPS))
    if cuda:
        result["device"] = torch.cuda.get_device_name(0)
        result["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    out_json.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str))
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------------
# Driver


def _run_child(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = -9
    return rc, time.time() - t0


def env_info() -> dict[str, Any]:
    import importlib.metadata

    info: dict[str, Any] = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "unsloth", "unsloth_zoo"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def cmd_run(a: argparse.Namespace) -> int:
    t_start = time.time()
    deadline = t_start + a.deadline_s
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    log = a.out / "train.log"
    res_path = a.out / a.results_name
    results: dict[str, Any] = {"env": env_info(), "args": {k: str(v) for k, v in vars(a).items()}, "configs": {}}
    results["flops"] = model_flops(TINY if a.tiny else LLAMA3_8B)
    results["peak_tflops"] = H100_BF16_DENSE_TFLOPS

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str))

    me = [sys.executable, str(Path(__file__).resolve())]
    tiny = ["--tiny"] if a.tiny else []
    rc, secs = _run_child([*me, "build", "--work", str(a.work), *tiny], log, deadline - time.time())
    build_json = a.work / Q4_DIR / ".complete"
    results["build"] = {"exit_code": rc, "wall_s": round(secs, 1)}
    if build_json.is_file():
        results["build"].update(json.loads(build_json.read_text()))
    print(f"build: exit {rc} in {secs:.0f}s {results['build']}", flush=True)
    save()
    if rc != 0:
        print(log.read_text()[-6000:])
        return 1
    results["data"] = write_data(a.work, a.rows)
    print(f"data: {json.dumps({k: v for k, v in results['data'].items() if k != 'example'})}", flush=True)
    save()
    for name in a.configs.split(","):
        left = deadline - time.time()
        need = START_S[CONFIGS[name.split("#")[0]]["backend"]] + 2 * a.steps
        if left < need:
            print(f"{name}: skipped, {left:.0f}s left < ~{need}s needed", flush=True)
            results["configs"][name] = {"name": name, "ok": False, "error": f"skipped: {left:.0f}s left"}
            save()
            continue
        cj = a.work / f"result-{name}.json"
        cj.unlink(missing_ok=True)
        cmd = [*me, "worker", name, "--work", str(a.work), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += ["--profile", str(a.profile)]
        rc, secs = _run_child([*cmd, "--json", str(cj), *tiny], log, left - 5)
        r = json.loads(cj.read_text()) if cj.is_file() else {"name": name, "ok": False, "error": f"exit {rc}"}
        r["process_s"] = round(secs, 1)
        results["configs"][name] = r
        save()
        tm = r.get("timed", {})
        print(
            f"{name}: ok={r.get('ok')} {secs:.0f}s tok/s={tm.get('tokens_per_s')} mfu={tm.get('mfu')} "
            f"peak={r.get('peak_alloc_gib')}GiB err={r.get('error', '')[:300]}",
            flush=True,
        )
        if r.get("profile"):
            pr = r["profile"]
            print(
                f"  profiled {pr['steps']} steps: {pr['wall_s_per_step']} s/step wall (profiler on), GPU busy "
                f"{pr['gpu_busy_s_per_step']} s/step, {pr['kernels_per_step']} kernels/step",
                flush=True,
            )
            for name, ms, count in pr["top_kernels"][:12]:
                print(f"    {ms:9.2f} ms/step {count:6d}x  {name[:90]}", flush=True)
    results["total_s"] = round(time.time() - t_start, 1)
    save()
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"{'config':<15}{'tok/s':>9}{'MFU':>8}{'peak GiB':>10}{'step s':>8}  loss first->last")
    for name, r in results["configs"].items():
        tm = r.get("timed") or {}
        losses = [x["loss"] for x in r.get("log", [])]
        lf = f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"
        print(
            f"{name:<15}{tm.get('tokens_per_s', '-')!s:>9}{tm.get('mfu', '-')!s:>8}"
            f"{r.get('peak_alloc_gib', '-')!s:>10}{tm.get('step_s_median', '-')!s:>8}  {lf}"
        )


def cmd_plot(a: argparse.Namespace) -> int:
    """Bars of tokens/s (with MFU) and peak memory per configuration and GPU, and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, str, dict[str, Any]]] = []
    seen: set[str] = set()
    for path in a.results:
        doc = json.loads(Path(path).read_text())
        smi = doc.get("env", {}).get("nvidia_smi") or "?"
        gpu = next((g for g in ("H200", "H100") if g in smi), smi.split(",")[0])
        for name, r in doc["configs"].items():
            if not r.get("timed"):
                continue
            label = f"{name} ({gpu})"
            while label in seen:
                label += "'"
            seen.add(label)
            rows.append((label, gpu, r))
    order = {n: i for i, n in enumerate(CONFIGS)}
    rows.sort(key=lambda x: (x[1] != "H200", order.get(x[0].split(" ")[0].split("#")[0], 99)))
    colors = {"H200": "tab:blue", "H100": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), dpi=110, gridspec_kw={"width_ratios": [3, 3, 2]})
    labels = [n for n, _, _ in rows]
    tps = [r["timed"]["tokens_per_s"] for _, _, r in rows]
    mem = [r.get("peak_alloc_gib", 0) for _, _, r in rows]
    cols = [colors.get(g, "tab:gray") for _, g, _ in rows]
    bars = axes[0].bar(labels, tps, color=cols)
    axes[0].bar_label(
        bars,
        labels=[f"{v:.0f}\n{r['timed']['mfu'] * 100:.1f}%" for v, (_, _, r) in zip(tps, rows, strict=True)],
        fontsize=7,
    )
    axes[0].set_ylabel("tokens/s (non-padding); label: MFU (4N + attention)")
    axes[0].set_title("training throughput")
    bars = axes[1].bar(labels, mem, color=cols)
    axes[1].bar_label(bars, fmt="%.1f", fontsize=7)
    axes[1].set_ylabel("peak GPU memory allocated (GiB)")
    axes[1].set_title("peak memory")
    for label, gpu, r in rows:
        if gpu != a.loss_gpu:
            continue
        log = r.get("log", [])
        style = "--" if r.get("bs", 1) * r.get("ga", 4) != 4 else "-"
        name = label.split(" ")[0]
        axes[2].plot([x["step"] for x in log], [x["loss"] for x in log], style, marker=".", label=name)
    axes[2].set_xlabel("optimizer step (4 rows a step; dashed: 8 or 16)")
    axes[2].set_ylabel("training loss")
    axes[2].set_title(f"loss ({a.loss_gpu} runs)")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7.5, labelrotation=40)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
        ax.margins(y=0.22)
    fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.png)
    print(a.png)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build the model and data, run the configurations, write RESULTS json")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/tunectl-bench"))
    r.add_argument("--configs", default="tunectl,unsloth,hf")
    r.add_argument("--steps", type=int, default=15)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--rows", type=int, default=400)
    r.add_argument("--deadline-s", type=float, default=540)
    r.add_argument("--results-name", default="train.json")
    r.add_argument("--tiny", action="store_true", help="tiny shape, for a CPU smoke test")
    r.add_argument("--profile", type=int, default=0, help="run the last N steps under torch.profiler (not timed)")
    b = sub.add_parser("build")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--tiny", action="store_true")
    w = sub.add_parser("worker")
    w.add_argument("name", help=f"one of {', '.join(CONFIGS)}, optionally NAME#k for a repeat")
    w.add_argument("--work", type=Path, required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--warmup", type=int, required=True)
    w.add_argument("--json", type=Path, required=True)
    w.add_argument("--tiny", action="store_true")
    w.add_argument("--profile", type=int, default=0)
    p = sub.add_parser("plot")
    p.add_argument("results", nargs="+")
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--title", default="Llama-3-8B-shaped QLoRA, synthetic Chinese Alpaca rows")
    p.add_argument("--loss-gpu", default="H100", help="whose loss curves to draw")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "build":
        print(json.dumps(build(a.work, a.tiny)), flush=True)
        return 0
    if a.cmd == "worker":
        return worker(a.name, a.work, a.steps, a.warmup, a.json, a.tiny, a.profile)
    return cmd_plot(a)


if __name__ == "__main__":
    sys.exit(main())
