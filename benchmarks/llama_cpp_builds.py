"""llama.cpp builds side by side on this CPU: does each run the quantized files, how fast does it quantize and
answer (a benchmark, not a test; docs/llama-cpp-builds.md has the results and the CPUs they were measured on).

A configuration is a directory holding an installed `llama_cpp` package (a `pip install --target` of a wheel)
and, for tunectl's portable build, optionally one CPU variant forced with TUNECTL_LLAMA_CPU_VARIANT; without
one, ggml's own run-time choice is measured. Every measurement runs in a child process (a crash is recorded as
the signal, and the next configuration still runs); rounds interleave the configurations so drift on a shared
machine hits them all alike.

    python benchmarks/llama_cpp_builds.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --config portable=/tmp/site-portable --config portable:haswell=/tmp/site-portable \\
        --config native=/tmp/site-native --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMARUN = Path(__file__).resolve().parents[1] / "jobs" / "tunectl_jobs" / "llamarun.py"
sys.path.insert(0, str(LLAMARUN.parent))
from llamarun import CHECK_PROMPT, VARIANT_ENV, exit_text  # noqa: E402

# One child: quantize the f16 file to TYPE (timed), then answer with the result (llamarun's own child).
_QUANTIZE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {llamarun_dir!r})
import llamarun
src, dst, qtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t0 = time.monotonic()
llamarun.quantize(src, dst, qtype, allow_requantize=True)
print(json.dumps({{"quantize_s": round(time.monotonic() - t0, 3)}}))
"""


def cpu_flags() -> list[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    keep = ("avx", "amx", "fma", "f16c", "bmi2", "sse4")
    return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(keep))


def cpu_model() -> str:
    try:
        return next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def child_env(site: Path, variant: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != VARIANT_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    if variant:
        env[VARIANT_ENV] = variant
    return env


def measure(site: Path, variant: str | None, f16: Path, work: Path, max_tokens: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    env = child_env(site, variant)
    for qtype in ("q8_0", "q4_k_m", "f16"):
        row: dict = {}
        target = f16
        if qtype != "f16":
            target = work / f"bench-{qtype}.gguf"
            code = _QUANTIZE.format(llamarun_dir=str(LLAMARUN.parent))
            q = subprocess.run(
                [sys.executable, "-c", code, str(f16), str(target), qtype], env=env, capture_output=True, text=True
            )
            if q.returncode != 0:
                out[qtype] = {"error": f"quantize: {exit_text(q.returncode)}", "stderr": q.stderr[-500:]}
                continue
            row.update(json.loads(q.stdout.strip().splitlines()[-1]))
        request = json.dumps({"gguf": str(target), "prompt": CHECK_PROMPT, "max_tokens": max_tokens})
        a = subprocess.run(
            [sys.executable, str(LLAMARUN), "answer"], input=request, env=env, capture_output=True, text=True
        )
        if a.returncode != 0:
            row["error"] = exit_text(a.returncode)
            row["stderr"] = a.stderr[-500:]
        else:
            r = json.loads(a.stdout.strip().splitlines()[-1])
            row.update(
                {k: r.get(k) for k in ("cpu_variant", "prompt_tokens_per_s", "gen_tokens_per_s", "completion_tokens")}
            )
        out[qtype] = row
        if target != f16:
            target.unlink(missing_ok=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True, help="a small GGUF; it is requantized to f16 first")
    p.add_argument("--config", action="append", required=True, help="NAME[:VARIANT]=SITE_DIR")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    configs = []
    for c in args.config:
        name, _, site = c.partition("=")
        variant = name.split(":", 1)[1] if ":" in name else None
        configs.append((name, variant, Path(site)))
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        work = Path(tmp)
        f16 = work / "bench-f16.gguf"
        code = _QUANTIZE.format(llamarun_dir=str(LLAMARUN.parent))
        subprocess.run(
            [sys.executable, "-c", code, str(args.gguf), str(f16), "f16"],
            env=child_env(configs[0][2], None),
            check=True,
            capture_output=True,
        )
        results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        for rnd in range(args.rounds):
            for name, variant, site in configs:
                results[name].append(measure(site, variant, f16, work, args.max_tokens))
                print(f"round {rnd + 1}: {name} done", file=sys.stderr, flush=True)
    summary = {}
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; flags: {' '.join(cpu_flags())}")
    print(f"{'config':<22} {'type':<7} {'variant':<10} {'quantize s':>10} {'prompt tok/s':>13} {'gen tok/s':>10}  note")
    for name, rounds in results.items():
        summary[name] = {}
        for qtype in ("q8_0", "q4_k_m", "f16"):
            rows = [r[qtype] for r in rounds]
            errors = [r["error"] for r in rows if "error" in r]
            ok = [r for r in rows if "error" not in r]

            def med(key: str, ok: list[dict] = ok) -> float | None:
                vals = [r[key] for r in ok if r.get(key) is not None]
                return round(statistics.median(vals), 3) if vals else None

            s = {
                "variant": ok[0]["cpu_variant"] if ok else None,
                "quantize_s": med("quantize_s"),
                "prompt_tokens_per_s": med("prompt_tokens_per_s"),
                "gen_tokens_per_s": med("gen_tokens_per_s"),
                "errors": errors,
                "rounds": len(rows),
            }
            summary[name][qtype] = s
            note = f"{len(errors)}/{len(rows)} failed: {errors[0]}" if errors else ""
            print(
                f"{name:<22} {qtype:<7} {str(s['variant']):<10} {str(s['quantize_s'] or '-'):>10} "
                f"{str(s['prompt_tokens_per_s'] or '-'):>13} {str(s['gen_tokens_per_s'] or '-'):>10}  {note}"
            )
    if args.json:
        doc = {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "flags": cpu_flags(),
            "rounds": args.rounds,
            "results": summary,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
