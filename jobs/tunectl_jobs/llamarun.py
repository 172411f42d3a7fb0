"""llama.cpp on the CPU: quantize, and answer a prompt with a GGUF in a child process.

tunectl builds llama.cpp's CPU code once per x86-64 level and lets ggml pick the best one this CPU runs at
load time (jobs/tunectl_jobs/llamacpp_cpu_variants.cmake, docs/llama-cpp-builds.md). ggml looks for those
modules only beside the executable and in the working directory, so `load_cpu_backend` loads them from
llama-cpp-python's own lib directory and names the variant it chose.

A GGUF is answered in a child process: native code that crashes (a signal) takes down one file's test, which
is then reported with the signal's name, not the whole stage with its last log line.

Standalone on purpose (no tunectl imports): image builds and `llamabuild.py` run it before tunectl is
installed.

    python -m tunectl_jobs.llamarun answer < request.json      # one JSON request in, one JSON result out
    python -m tunectl_jobs.llamarun check --gguf FILE --work DIR  # quantize FILE to q8_0 and q4_k_m, answer each
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHECK_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName three colours of the rainbow and say in one sentence why the sky looks blue.\n\n"
    "### Response:\n"
)

VARIANT_ENV = "TUNECTL_LLAMA_CPU_VARIANT"
_loaded: str | None = None


def threads() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def cpu_variants() -> list[str]:
    """The CPU variants installed beside libggml (empty for a build with one CPU backend compiled in)."""
    return sorted(p.name[len("libggml-cpu-") : -len(".so")] for p in lib_dir().glob("libggml-cpu-*.so"))


def load_cpu_backend() -> str:
    """Load ggml's backends from llama-cpp-python's lib dir, once, before any model; return the CPU variant.

    `TUNECTL_LLAMA_CPU_VARIANT=haswell` (any installed variant) overrides ggml's choice: for a CPU on which the
    best-scoring variant misbehaves, and for measuring one variant against another."""
    global _loaded
    if _loaded is not None:
        return _loaded
    d = lib_dir()
    variants = cpu_variants()
    if not variants:
        _loaded = "built-in"  # one CPU backend compiled into libggml-cpu: nothing is chosen at run time
        return _loaded
    ggml = ctypes.CDLL(str(d / "libggml.so"))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    forced = os.environ.get(VARIANT_ENV)
    if forced and forced not in variants:
        raise RuntimeError(f"{VARIANT_ENV}={forced}: not an installed CPU variant ({', '.join(variants)})")
    if ggml.ggml_backend_reg_count() == 0:
        if forced:
            ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load.restype = ctypes.c_void_p
            if not ggml.ggml_backend_load(str(d / f"libggml-cpu-{forced}.so").encode()):
                raise RuntimeError(f"{VARIANT_ENV}={forced}: ggml could not load it (does this CPU support it?)")
        else:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(d).encode())
    _loaded = _mapped_variant() or "none"
    if _loaded == "none":
        raise RuntimeError(f"no llama.cpp CPU variant in {d} runs on this CPU ({', '.join(cpu_variants())})")
    return _loaded


def _mapped_variant() -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libggml-cpu-") and name.endswith(".so"):
            return name[len("libggml-cpu-") : -len(".so")]
    return None


def quantize(src: Path, dst: Path, qtype: str, *, allow_requantize: bool = False) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp cannot quantize to {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads()
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp quantization of {src.name} to {qtype} failed (code {rc})")


def answer(path: Path, prompt: str, max_tokens: int, n_ctx: int = 2048) -> dict[str, Any]:
    """Greedy completion in this process. Prefer `answer_in_child`, which survives a native crash."""
    variant = load_cpu_backend()
    import llama_cpp
    from llama_cpp import Llama

    t0 = time.monotonic()
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads(), verbose=False, seed=0)
    loaded = time.monotonic()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    done = time.monotonic()
    choice = out["choices"][0]
    result = {
        "file": path.name,
        "answer": choice["text"],
        "finish_reason": choice["finish_reason"],
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "completion_tokens": out["usage"]["completion_tokens"],
        "max_tokens": max_tokens,
        "eos_token_id": int(llm.metadata.get("tokenizer.ggml.eos_token_id", -1)),
        "cpu_variant": variant,
        "threads": threads(),
        "load_s": round(loaded - t0, 3),
        "answer_s": round(done - loaded, 3),
    }
    ctx = getattr(getattr(llm, "_ctx", None), "ctx", None)  # llama-cpp-python's internals: timings only
    perf = llama_cpp.llama_perf_context(ctx) if ctx is not None else llama_cpp.llama_perf_context_data()
    if perf.t_p_eval_ms > 0:
        result["prompt_tokens_per_s"] = round(perf.n_p_eval / perf.t_p_eval_ms * 1000, 1)
    if perf.t_eval_ms > 0:
        result["gen_tokens_per_s"] = round(perf.n_eval / perf.t_eval_ms * 1000, 1)
    del llm
    return result


def exit_text(returncode: int) -> str:
    """How a child ended: 'killed by SIGSEGV' or 'exit code 3'."""
    return f"killed by {signal_name(-returncode)}" if returncode < 0 else f"exit code {returncode}"


def answer_in_child(
    path: Path, prompt: str, max_tokens: int, *, timeout: float | None = None, command: list[str] | None = None
) -> dict[str, Any]:
    """`answer` in a fresh Python that loads only llama.cpp. A child that dies gives {'error', 'signal', 'stderr'}.

    `command` replaces the child program (tests use one that crashes on purpose)."""
    cmd = command or [sys.executable, str(Path(__file__).resolve()), "answer"]
    request = json.dumps({"gguf": str(path), "prompt": prompt, "max_tokens": max_tokens})
    try:
        proc = subprocess.run(cmd, input=request, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"file": path.name, "error": f"no answer within {timeout:.0f}s (killed)"}
    if proc.returncode == 0:
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"file": path.name, "error": "the child printed no result", "stderr": proc.stderr[-2000:]}
    result: dict[str, Any] = {"file": path.name, "error": exit_text(proc.returncode), "stderr": proc.stderr[-2000:]}
    if proc.returncode < 0:
        result["signal"] = signal_name(-proc.returncode)
    else:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
        if last:
            result["error"] += f": {last.strip()}"
    return result


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def check(gguf: Path, work: Path, max_tokens: int = 24) -> list[dict[str, Any]]:
    """A build's proof: requantize a small GGUF to q8_0 and q4_k_m, answer a few dozen tokens of prompt with each,
    every answer in its own child. Raises if any file fails to answer."""
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for qtype in ("q8_0", "q4_k_m"):
        dst = work / f"check-{qtype}.gguf"
        t0 = time.monotonic()
        quantize(gguf, dst, qtype, allow_requantize=True)
        quantize_s = round(time.monotonic() - t0, 2)
        r = answer_in_child(dst, CHECK_PROMPT, max_tokens, timeout=600)
        r.update(type=qtype, quantize_s=quantize_s)
        results.append(r)
        dst.unlink()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunectl_jobs.llamarun")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("answer", help="answer one JSON request from stdin: {gguf, prompt, max_tokens}")
    c = sub.add_parser("check", help="prove the installed llama.cpp: quantize a GGUF, answer with each type")
    c.add_argument("--gguf", type=Path, required=True)
    c.add_argument("--work", type=Path, required=True)
    sub.add_parser("variant", help="print the CPU variant ggml picks on this machine")
    args = parser.parse_args(argv)
    if args.cmd == "answer":
        req = json.loads(sys.stdin.read())
        print(json.dumps(answer(Path(req["gguf"]), req["prompt"], int(req["max_tokens"])), ensure_ascii=False))
        return 0
    if args.cmd == "variant":
        print(load_cpu_backend())
        return 0
    results = check(args.gguf, args.work)
    for r in results:
        if "error" in r:
            print(f"llama.cpp check: {r['type']} of {args.gguf.name}: {r['error']}", file=sys.stderr)
            tail = r.get("stderr", "").strip().splitlines()[-5:]
            for line in tail:
                print(f"  {line}", file=sys.stderr)
        else:
            print(
                f"llama.cpp check: {r['type']} quantized in {r['quantize_s']}s, answered {r['completion_tokens']} "
                f"tokens to a {r['prompt_tokens']}-token prompt on CPU variant {r['cpu_variant']} "
                f"({r.get('prompt_tokens_per_s', '?')} prompt tok/s, {r.get('gen_tokens_per_s', '?')} gen tok/s)"
            )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
