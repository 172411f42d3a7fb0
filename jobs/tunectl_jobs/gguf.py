"""The gguf stage: llama.cpp's own converter and quantizer at a pinned version, then a smoke test.

The merged 16-bit model is converted once to a 16-bit GGUF; every quantized type is made from that file.
Each file then has to load in llama.cpp, answer a test prompt and stop at EOS before the token limit: a
model that never stops is a failed export. An Ollama `Modelfile` with the training prompt and stop tokens
is written beside the files.

Each file's fidelity to the 16-bit one (perplexity, KL divergence, top-1 agreement) is measured on the train
stage's held-out token rows (fidelity.py).

Outputs: `<recipe>-<type>.gguf` for each requested type, `Modelfile`, `smoke.json`, `fidelity.json`.

    python -m tunectl_jobs.gguf --recipe recipe.yaml --store DIR --run RUN_ID
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunectl import ollama
from tunectl.errors import ConfigError, TunectlError
from tunectl.stageexit import killed

from . import fidelity, llamacpp, llamarun
from .evaluate import HELDOUT
from .stage import StageContext, run_stage

log = logging.getLogger("tunectl")

_CONVERTER_TYPES = ("f16", "bf16", "f32")
_SMOKE_DEFAULT = ("Say hello in one short sentence.", "", 64)
# The smoke test's child program; None is llamarun's own. Tests set one that crashes on purpose.
SMOKE_COMMAND: list[str] | None = None


def convert(script: Path, model_dir: Path, out: Path, outtype: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent / "gguf-py"), str(script.parent)])}
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype", outtype]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines()[-15:]:
        log.info("convert: %s", line)
    if proc.returncode != 0 or not out.is_file():
        last = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.strip()), "no output")
        raise TunectlError(f"convert_hf_to_gguf.py failed (exit {proc.returncode}): {last}")


def quantize(src: Path, dst: Path, qtype: str) -> None:
    try:
        llamarun.quantize(src, dst, qtype)
    except ValueError:
        raise ConfigError(f"llama.cpp {llamacpp.LLAMA_CPP_PYTHON_VERSION} cannot quantize to {qtype}") from None
    except RuntimeError as e:
        raise TunectlError(str(e)) from None


def check_chat_template(path: Path, template: str) -> None:
    """The GGUF carries the chat template the run trained with (llama.cpp and Ollama's import read it there)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    carried = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    if carried != template:
        raise TunectlError(
            f"{path.name} carries {'another chat template' if carried else 'no chat template'} than the one the run "
            "trained with: the merge stage's tokenizer_config.json and chat_template.jinja disagree"
        )


def chat_prompt(model_dir: Path, template: str, prompt: Any) -> str:
    """A chat run's smoke prompt: its first test prompt's messages (or the default question) rendered with the
    trained template and the generation prompt, as a chat server would send it."""
    from transformers import AutoTokenizer

    messages = prompt.messages() if prompt is not None else [{"role": "user", "content": _SMOKE_DEFAULT[0]}]
    tok = AutoTokenizer.from_pretrained(model_dir)
    return str(tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True))


def smoke_test(
    path: Path, prompt: str, max_tokens: int, contract: dict[str, Any], command: list[str] | None = None
) -> dict[str, Any]:
    """Answer greedily in a child process (llamarun) and check the GGUF's EOS; a crash is this file's error."""
    result = llamarun.answer_in_child(path, prompt, max_tokens, command=command)
    if "error" in result:
        if result.get("signal"):
            reason = killed(result["signal"], {"phase": "smoke test", "file": path.name, "native": "llama.cpp"})
        else:
            reason = f"smoke test of {path.name}: {result['error']}"
        for line in result.get("stderr", "").strip().splitlines()[-20:]:
            log.info("smoke %s: %s", path.name, line)
        log.error("%s", reason)
        return {"file": path.name, "error": reason}
    eos = result["eos_token_id"]
    if eos not in contract["stop_token_ids"]:
        raise TunectlError(f"{path.name}: GGUF EOS id {eos} is not the trained EOS {contract['eos_token_id']}")
    log.info(
        "smoke %s (%d tokens, %s): %s",
        path.name,
        result["completion_tokens"],
        result["finish_reason"],
        result["answer"].strip(),
    )
    log.info(
        "smoke %s ran on llama.cpp CPU variant %s with %d threads (%s prompt, %s generated tokens/s)",
        path.name,
        result["cpu_variant"],
        result["threads"],
        result.get("prompt_tokens_per_s", "?"),
        result.get("gen_tokens_per_s", "?"),
    )
    return result


def gguf(ctx: StageContext) -> None:
    r = ctx.recipe
    types = list(dict.fromkeys(r.export.gguf))
    if not types:
        raise ConfigError("export.gguf is empty: nothing to convert")
    script = llamacpp.converter()
    with ctx.phase("fetch merge"):
        merged = ctx.store.fetch(ctx.run, "merge")
    contract = merged.manifest["contract"]
    src = merged.file("merged-16bit")
    ctx.inputs = {"merge": {"files": len(merged.manifest["files"]), "finished": merged.manifest["timings"]["finished"]}}

    stem = r.name
    high = next((t for t in types if t in _CONVERTER_TYPES), "f16")
    high_file = ctx.out / f"{stem}-{high}.gguf"
    with ctx.phase(f"convert {high}", file=high_file.name):
        convert(script, src, high_file, high)
    if high in types:
        ctx.finished(high_file)  # hashed while the other types are made (16 GB for an 8B model)
    files: dict[str, Path] = {high: high_file}
    for t in types:
        if t in files:
            continue
        dst = ctx.out / f"{stem}-{t}.gguf"
        if t in _CONVERTER_TYPES:
            with ctx.phase(f"convert {t}", file=dst.name):
                convert(script, src, dst, t)
        else:
            with ctx.phase(f"quantize {t}", file=dst.name, native="llama.cpp"):
                quantize(high_file, dst, t)
        ctx.finished(dst)
        files[t] = dst

    instruction, inp, max_tokens = _SMOKE_DEFAULT
    if r.test_prompts:
        p = r.test_prompts[0]
        instruction, inp, max_tokens = p.instruction, p.input, p.max_new_tokens
    chat = contract.get("format") in ("messages", "sharegpt")
    if chat:  # the conversation so far in the template the run trained with, which the GGUF must carry
        check_chat_template(files[types[0]], contract["chat_template"])
        prompt = chat_prompt(src, contract["chat_template"], r.test_prompts[0] if r.test_prompts else None)
    else:
        prompt = r.prompt_for(instruction, inp)
    smoke = []
    # One file after another, each with every CPU: on the GPU machine's 16 cores, quantizing (compute-bound) and
    # answering (memory-bound) side by side, the CPUs shared out, took longer than this (docs/gpu-benchmarks.md).
    with ctx.phase("smoke test"):
        # Each file in its own child: one that crashes is named, and the others are still tested.
        for t in types if r.export.smoke_test != "off" else []:
            result = smoke_test(files[t], prompt, max_tokens, contract, command=SMOKE_COMMAND)
            asked = {"instruction": instruction, "input": inp}
            if chat and r.test_prompts and r.test_prompts[0].system:
                asked["system"] = r.test_prompts[0].system
            smoke.append({"type": t, "check": r.export.smoke_test, **asked, **result})
    (ctx.out / "smoke.json").write_text(json.dumps(smoke, indent=1, ensure_ascii=False) + "\n")
    measured = measure_fidelity(ctx, files, high, high_file)
    if high not in types:  # converted only to quantize from and to measure against
        high_file.unlink()
        del files[high]
    crashed = [s for s in smoke if "error" in s]
    if crashed:
        answered = [s["type"] for s in smoke if "error" not in s]
        raise TunectlError(
            "; ".join(s["error"] for s in crashed)
            + (f" ({', '.join(answered)} answered)" if answered else "")
            + ": a GGUF that cannot be run is a failed export"
        )
    if chat and not contract.get("ollama_template"):
        ctx.note(f"no Modelfile: the run's chat template is not one tunectl can write for Ollama "
                 f"({contract.get('ollama_refusal')})")  # fmt: skip
    else:
        (ctx.out / "Modelfile").write_text(ollama.modelfile(files[types[0]].name, contract))
    ctx.metrics = {
        "types": types,
        "sizes_mib": {t: round(files[t].stat().st_size / 2**20, 1) for t in types},
        "smoke": {s["type"]: {"finish_reason": s["finish_reason"], "tokens": s["completion_tokens"]} for s in smoke},
    }
    if measured:
        ctx.metrics["fidelity"] = measured
    if smoke:
        ctx.metrics["cpu_variant"] = smoke[0]["cpu_variant"]
    else:
        ctx.note("no smoke test (export.smoke_test: off): no GGUF was run")
    # The answers travel in the manifest: `tunectl pull --to ollama` compares the server's answer with them.
    ctx.extra = {"contract": contract, "smoke": smoke}
    over = {t: m["kld"] for t, m in measured.get("types", {}).items() if "kld" in m and r.export.max_kld is not None
            and m["kld"] > r.export.max_kld}  # fmt: skip
    if over:
        raise TunectlError(
            "; ".join(f"GGUF {t}'s mean KL divergence from {high} is {k:.4g}" for t, k in over.items())
            + f", above export.max_kld {r.export.max_kld} (see {ctx.out / FIDELITY}): keep a higher-precision type"
        )
    if r.export.smoke_test == "answer":
        silent = [s["type"] for s in smoke if not s["answer"].strip()]
        if silent:
            raise TunectlError(f"GGUF {', '.join(silent)} gave an empty answer (see {ctx.out / 'smoke.json'})")
        unstopped = [s["type"] for s in smoke if s["finish_reason"] != "stop"]
        if unstopped:
            ctx.note(f"{', '.join(unstopped)} answered up to the token limit: accepted (export.smoke_test: answer)")
        return
    failed = [s["type"] for s in smoke if s["finish_reason"] != "stop" or not s["answer"].strip()]
    if failed:
        # A model that does not stop is a failed export: no manifest, the files stay in scratch to inspect.
        raise TunectlError(
            f"GGUF {', '.join(failed)} did not answer and stop at EOS within {max_tokens} tokens "
            f"(see {ctx.out / 'smoke.json'}); the model has not learned to stop: train longer or check the data"
        )


FIDELITY = "fidelity.json"


def measure_fidelity(ctx: StageContext, files: dict[str, Path], high: str, high_file: Path) -> dict[str, Any]:
    """Each GGUF against the highest-precision one on the train stage's token rows (fidelity.py); {} where the
    train stage wrote none (export.fidelity_tokens 0). A file that fails to run is named in the result and the
    manifest notes, not a failed export: the smoke test is what decides that."""
    r = ctx.recipe
    if not r.export.fidelity_tokens:
        return {}
    train = ctx.store.manifest(ctx.run, "train")
    if train is None or HELDOUT not in train["files"]:
        why = "its manifest is not in this store" if train is None else "it kept no token rows"
        ctx.note(f"no fidelity measured: the rows come from the train stage, and {why}")
        return {}
    with ctx.phase("fetch rows"):
        rows_file = ctx.store.fetch(ctx.run, "train", select=lambda rel: rel == HELDOUT).file(HELDOUT)
    with ctx.phase("fidelity", native="llama.cpp"):
        results = fidelity.measure(files, high_file, rows_file, ctx.out / ".fidelity")
    shutil.rmtree(ctx.out / ".fidelity", ignore_errors=True)
    source = json.loads(rows_file.read_text())["source"]
    for t, m in results.items():
        if "error" in m:
            ctx.note(f"fidelity of {t} not measured: {m['error']}")
        else:
            log.info(
                "fidelity %s on %d %s tokens: perplexity %.4f, KL divergence from %s %.6f (p99 %.4f), top-1 %.2f%%",
                t, m["tokens"], source, m["perplexity"], high, m["kld"], m["kld_p99"], 100 * m["top1"],
            )  # fmt: skip
    doc = {"reference": high, "source": source, "types": results}
    (ctx.out / FIDELITY).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    return run_stage("gguf", gguf, argv)


if __name__ == "__main__":
    sys.exit(main())
