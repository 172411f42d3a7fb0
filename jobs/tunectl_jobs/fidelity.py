"""What quantization did to the model, measured with llama.cpp on the run's own rows: for each GGUF, the
perplexity of the held-out rows (the train stage's `heldout.json`: token ids, and the positions that carry the
loss), and how far its next-token distribution is from the f16 file's at each of those positions: the mean KL
divergence (and its 99th percentile) and how often the two agree on the most likely token.

First a reference pass over the f16 GGUF saves its log-probabilities (float32, one row of the vocabulary per
measured position); then each GGUF, f16 included, is run again and compared with them, each in a child process
(a crash names the file, as in the smoke test). The f16 file against its own reference is a check of the method:
llama.cpp on a CPU repeats itself, so its KL divergence is 0 and its agreement 1.

    python -m tunectl_jobs.fidelity < request.json     # {gguf, rows, reference, save_reference}: one JSON result
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import llamarun


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def logprobs(gguf: Path, rows: dict[str, Any], reference: Path, save_reference: bool) -> dict[str, Any]:
    """One pass over the rows in this process: perplexity, and the comparison with (or the saving of) the
    reference log-probabilities."""
    import numpy as np

    variant = llamarun.load_cpu_backend()
    from llama_cpp import Llama

    ids_rows = [r["ids"] for r in rows["rows"]]
    n_ctx = max(len(ids) for ids in ids_rows)
    t0 = time.monotonic()
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True,
                n_threads=llamarun.threads(), verbose=False, seed=0)  # fmt: skip
    kept: list[Any] = []
    ref = None if save_reference else np.load(reference, mmap_mode="r")
    nll, count, at = 0.0, 0, 0
    klds: list[Any] = []
    agree = 0
    for row in rows["rows"]:
        ids, mask = row["ids"], row["loss_on"]
        pos = np.flatnonzero(np.asarray(mask[1:], dtype=bool))  # position p predicts token p + 1
        if not len(pos):
            continue
        llm.reset()
        llm.eval(ids)
        lp = _log_softmax(np.asarray(llm.scores[: len(ids) - 1], dtype=np.float32)[pos])
        targets = np.asarray(ids[1:])[pos]
        nll -= float(lp[np.arange(len(pos)), targets].sum())
        count += len(pos)
        if ref is None:
            kept.append(lp)
        else:
            base = np.asarray(ref[at : at + len(pos)], dtype=np.float32)
            klds.append((np.exp(base) * (base - lp)).sum(axis=1))
            agree += int((base.argmax(axis=1) == lp.argmax(axis=1)).sum())
        at += len(pos)
    seconds = time.monotonic() - t0
    del llm
    result: dict[str, Any] = {"file": gguf.name, "tokens": count, "perplexity": round(math.exp(nll / count), 4),
                              "seconds": round(seconds, 2), "cpu_variant": variant}  # fmt: skip
    if ref is None:
        np.save(reference, np.concatenate(kept))
    else:
        kld = np.concatenate(klds)
        result.update(kld=float(kld.mean()), kld_p99=float(np.percentile(kld, 99)), top1=round(agree / count, 4))
    return result


def _in_child(gguf: Path, rows_file: Path, reference: Path, save_reference: bool) -> dict[str, Any]:
    request = {"gguf": str(gguf), "rows": str(rows_file), "reference": str(reference), "save": save_reference}
    proc = subprocess.run([sys.executable, "-m", "tunectl_jobs.fidelity"], input=json.dumps(request),
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode == 0:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
    return {"file": gguf.name, "error": f"{llamarun.exit_text(proc.returncode)}{': ' + last.strip() if last else ''}"}


def measure(files: dict[str, Path], reference_gguf: Path, rows_file: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Each type's figures against the reference GGUF (the f16 file), or its error."""
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference-logprobs.npy"
    base = _in_child(reference_gguf, rows_file, reference, True)
    if "error" in base:
        return {t: {"error": f"reference pass over {reference_gguf.name}: {base['error']}"} for t in files}
    try:
        return {t: _in_child(path, rows_file, reference, False) for t, path in files.items()}
    finally:
        reference.unlink(missing_ok=True)


def main() -> int:
    req = json.loads(sys.stdin.read())
    rows = json.loads(Path(req["rows"]).read_text())
    result = logprobs(Path(req["gguf"]), rows, Path(req["reference"]), bool(req["save"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
