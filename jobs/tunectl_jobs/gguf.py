"""The gguf stage: llama.cpp's own converter and quantizer at a pinned version, then a smoke test.

The merged 16-bit model is converted once to a 16-bit GGUF; every quantized type is made from that file.
Each file then has to load in llama.cpp, answer a test prompt and stop at EOS before the token limit: a
model that never stops is a failed export. An Ollama `Modelfile` with the training prompt and stop tokens
is written beside the files.

Outputs: `<recipe>-<type>.gguf` for each requested type, `Modelfile`, `smoke.json`.

    python -m tunectl_jobs.gguf --recipe recipe.yaml --store DIR --run RUN_ID
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunectl import ollama
from tunectl.errors import ConfigError, TunectlError

from . import llamacpp
from .stage import StageContext, run_stage

log = logging.getLogger("tunectl")

_CONVERTER_TYPES = ("f16", "bf16", "f32")
_SMOKE_DEFAULT = ("Say hello in one short sentence.", "", 64)


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
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise ConfigError(f"llama.cpp {llamacpp.LLAMA_CPP_PYTHON_VERSION} cannot quantize to {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise TunectlError(f"llama.cpp quantization to {qtype} failed (code {rc})")


def smoke_test(path: Path, prompt: str, max_tokens: int, contract: dict[str, Any]) -> dict[str, Any]:
    """Load in llama.cpp, answer greedily, and require a stop at EOS before `max_tokens`."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=os.cpu_count() or 1, verbose=False, seed=0)
    eos = int(llm.metadata.get("tokenizer.ggml.eos_token_id", -1))
    if eos not in contract["stop_token_ids"]:
        raise TunectlError(f"{path.name}: GGUF EOS id {eos} is not the trained EOS {contract['eos_token_id']}")
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    choice = out["choices"][0]
    result = {
        "file": path.name,
        "answer": choice["text"],
        "finish_reason": choice["finish_reason"],
        "completion_tokens": out["usage"]["completion_tokens"],
        "max_tokens": max_tokens,
        "eos_token_id": eos,
    }
    log.info(
        "smoke %s (%d tokens, %s): %s",
        path.name,
        result["completion_tokens"],
        result["finish_reason"],
        choice["text"].strip(),
    )
    del llm
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
    with ctx.phase(f"convert {high}"):
        convert(script, src, high_file, high)
    files: dict[str, Path] = {high: high_file}
    for t in types:
        if t in files:
            continue
        dst = ctx.out / f"{stem}-{t}.gguf"
        with ctx.phase(f"{'convert' if t in _CONVERTER_TYPES else 'quantize'} {t}"):
            if t in _CONVERTER_TYPES:
                convert(script, src, dst, t)
            else:
                quantize(high_file, dst, t)
        files[t] = dst
    if high not in types:
        high_file.unlink()
        del files[high]

    instruction, inp, max_tokens = _SMOKE_DEFAULT
    if r.test_prompts:
        p = r.test_prompts[0]
        instruction, inp, max_tokens = p.instruction, p.input, p.max_new_tokens
    prompt = r.prompt_for(instruction, inp)
    smoke = []
    with ctx.phase("smoke test"):
        for t in types:
            result = smoke_test(files[t], prompt, max_tokens, contract)
            smoke.append({"type": t, "instruction": instruction, "input": inp, **result})
    (ctx.out / "smoke.json").write_text(json.dumps(smoke, indent=1, ensure_ascii=False) + "\n")
    (ctx.out / "Modelfile").write_text(ollama.modelfile(files[types[0]].name, contract))
    ctx.metrics = {
        "types": types,
        "sizes_mib": {t: round(files[t].stat().st_size / 2**20, 1) for t in types},
        "smoke": {s["type"]: {"finish_reason": s["finish_reason"], "tokens": s["completion_tokens"]} for s in smoke},
    }
    # The answers travel in the manifest: `tunectl pull --to ollama` compares the server's answer with them.
    ctx.extra = {"contract": contract, "smoke": smoke}
    failed = [s["type"] for s in smoke if s["finish_reason"] != "stop" or not s["answer"].strip()]
    if failed:
        # A model that does not stop is a failed export: no manifest, the files stay in scratch to inspect.
        raise TunectlError(
            f"GGUF {', '.join(failed)} did not answer and stop at EOS within {max_tokens} tokens "
            f"(see {ctx.out / 'smoke.json'}); the model has not learned to stop: train longer or check the data"
        )


def main(argv: list[str] | None = None) -> int:
    return run_stage("gguf", gguf, argv)


if __name__ == "__main__":
    sys.exit(main())
