"""The merge base, downloaded while training runs: off the pipeline's critical path.

The merge stage needs the base's 16-bit weights (16 GB for an 8B model) only once training has ended, and on a
cluster it runs in a fresh pod: downloading them there puts minutes of Hub transfer between training and the
exports. So the train stage starts this program beside itself when the merge base is a Hub model; it downloads the
weights into the train stage's scratch and publishes them as the run's `merge-base` entry in the store. The merge
stage merges onto that copy (checksums verified, in-cluster storage or the same directory) and deletes it once its
own outputs are published; where the entry is missing (the download failed, an older run) it downloads from the
Hub itself, as before. A separate process, at a lower CPU priority, so the download and its checksums take neither
the GIL nor CPU time from the training loop, which launches the GPU's kernels.

    python -m tunectl_jobs.prefetch --hub-id ORG/NAME --store DIR --run RUN_ID
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from tunectl.errors import TunectlError
from tunectl.recipe import Recipe
from tunectl.refs import resolve
from tunectl.stores import Store, open_store

log = logging.getLogger("tunectl")

MERGE_BASE = "merge-base"
# What `from_pretrained` reads; not the `original/` consolidated checkpoints some repositories also carry.
ALLOW = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE = ["original/*"]


def hub_merge_base(recipe: Recipe) -> str | None:
    """The merge base's Hub id where a merge will need it, else None (local bases need no download)."""
    e = recipe.export
    if not (e.merged_16bit or e.merged_4bit or e.gguf):
        return None
    return resolve(recipe.model.merge_base_name(), "model").hub_id


class Prefetch:
    """The download running beside the train stage (`start`), waited for at its end (`wait`)."""

    def __init__(self, proc: subprocess.Popen[bytes], hub_id: str, store: Store, run: str):
        self.proc, self.hub_id, self.store, self.run = proc, hub_id, store, run
        self.t0 = time.monotonic()

    @classmethod
    def start(cls, store: Store, run: str, recipe: Recipe) -> Prefetch | None:
        hub_id = hub_merge_base(recipe)
        if hub_id is None or store.manifest(run, MERGE_BASE) is not None:  # a resumed train has it already
            return None
        cmd = [sys.executable, "-m", "tunectl_jobs.prefetch", "--hub-id", hub_id, "--store", store.uri, "--run", run]
        log.info("downloading the merge base %s beside training (into the store as %s)", hub_id, MERGE_BASE)
        return cls(subprocess.Popen(cmd, preexec_fn=_child_setup), hub_id, store, run)

    def wait(self) -> dict[str, Any]:
        """Wait for the download; what it did, for the train manifest, and a note where it failed."""
        code = self.proc.wait()
        out: dict[str, Any] = {
            "hub_id": self.hub_id,
            "exit_code": code,
            "seconds": round(time.monotonic() - self.t0, 1),
        }
        if code < 0:
            out["error"] = f"killed by {signal.Signals(-code).name}"
        elif code:
            out["error"] = f"exit status {code} (its error is in this log)"
        else:
            published = self.store.manifest(self.run, MERGE_BASE)
            out.update(published["metrics"] if published else {})
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _child_setup() -> None:
    os.nice(10)  # behind the training loop for the CPU
    # Linux: end with the train process, however it ends (it may be killed without a chance to stop us).
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def download(store: Store, run: str, hub_id: str) -> dict[str, Any]:
    """Download `hub_id`'s weights and tokenizer at its current commit and publish them as the run's merge base."""
    from huggingface_hub import HfApi, snapshot_download

    dest = store.scratch_dir(run, MERGE_BASE)
    t0 = time.monotonic()
    commit = HfApi().repo_info(hub_id).sha
    # Resumes partial files left in `dest` by an interrupted attempt.
    snapshot_download(hub_id, revision=commit, local_dir=dest, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not the model
    if not any(dest.glob("*.safetensors")):
        raise TunectlError(f"{hub_id} has no safetensors weights to prefetch")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    seconds = time.monotonic() - t0
    log.info("downloaded %s@%s: %.2f GB in %.1fs; publishing", hub_id, commit[:12], size / 1e9, seconds)
    manifest = {
        "inputs": {"hub_id": hub_id, "revision": commit},
        "metrics": {"bytes": size, "download_seconds": round(seconds, 1)},
    }
    store.publish(run, MERGE_BASE, dest, manifest)
    shutil.rmtree(dest, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunectl_jobs.prefetch", description="prefetch the merge base")
    for arg in ("hub-id", "store", "run"):
        parser.add_argument(f"--{arg}", required=True)
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [merge base] %(message)s", datefmt="%H:%M:%S",
        stream=sys.stdout,
    )  # fmt: skip
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        download(open_store(a.store), a.run, a.hub_id)
        return 0
    except Exception as e:  # any failure only costs the merge stage its own download; say it in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("not prefetched (the merge stage downloads it): %s", first[:400])
        return 1


if __name__ == "__main__":
    sys.exit(main())
