"""The merge base downloads while training runs (jobs/tunectl_jobs/prefetch.py), from a stand-in Hub on 127.0.0.1
serving the tiny model's 16-bit weights (tests/hub_server.py: the real Hub cannot be reached here).

Real `tunectl submit ruozhiba-tiny` runs on the local backend with `model.merge_base` set to a Hub id: the train
stage downloads it beside its steps into the store, the merge stage merges onto that copy and removes it; where the
download fails, training goes on and the merge stage downloads the base itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

pytestmark = [pytest.mark.train]

HUB_ID = "tunectl-test/smollm2-135m"


@pytest.fixture(scope="module")
def base_dir() -> Path:
    """The tiny recipe's model as 16-bit safetensors: what the stand-in Hub serves as the merge base."""
    from tunectl.recipe import load_recipe
    from tunectl_jobs import models

    return Path(models.base_model_path(load_recipe("ruozhiba-tiny").model.name))


def _submit(tmp_path: Path, hub: HubServer) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    store = tmp_path / "store"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "TUNECTL_BACKEND": "local"}
    env.pop("HF_HUB_OFFLINE", None)
    sets = [f"model.merge_base={HUB_ID}", "training.max_steps=4", "training.sample_answers=false", "export.gguf=[]"]
    cmd = [sys.executable, "-m", "tunectl.cli", "--store", str(store), "submit", "ruozhiba-tiny"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    found = re.search(r"^run (\S+): stages", proc.stderr, re.M)
    assert proc.returncode == 0 and found, proc.stderr[-4000:]
    return proc, store / "runs" / found.group(1), found.group(1)


def _manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def _served_files(base_dir: Path) -> set[str]:
    return {f"{HUB_ID}/{p.name}" for p in base_dir.iterdir() if not p.name.startswith(".")}


def test_the_merge_base_downloads_during_training_and_is_merged_from_the_store(tmp_path, base_dir):
    # 50 MB/s: the 538 MB of weights take about 11 s, while the train stage starts and trains.
    with HubServer({HUB_ID: base_dir}, bytes_per_s=50e6) as hub:
        proc, run_dir, run = _submit(tmp_path, hub)
        downloads = list(hub.downloads)
        commit = hub.commits[HUB_ID]

    assert sorted(downloads) == sorted(_served_files(base_dir))  # each file once: the merge stage did not download
    train = _manifest(run_dir, "train")
    prefetch = train["metrics"]["merge_base_prefetch"]
    assert prefetch["hub_id"] == HUB_ID and prefetch["exit_code"] == 0, prefetch
    assert prefetch["bytes"] == sum(p.stat().st_size for p in base_dir.iterdir() if not p.name.startswith("."))
    assert prefetch["download_seconds"] >= 538e6 / 50e6 * 0.9  # the stated rate held
    assert "wait for merge base" in train["timings"]["phases"]
    merge = _manifest(run_dir, "merge")
    assert merge["inputs"]["merge_base"] == HUB_ID and merge["inputs"]["merge_base_revision"] == commit
    assert "fetch merge base" in merge["timings"]["phases"]
    assert not (run_dir / "merge-base").exists()  # removed once merge published; the Hub keeps the original
    assert not (tmp_path / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}").exists()
    log = (run_dir / "logs" / "train.log").read_text()
    assert f"downloading the merge base {HUB_ID} beside training" in log
    assert re.search(rf"\[merge base\] downloaded {HUB_ID}@{commit[:12]}: 0\.5\d GB in [\d.]+s", log), log[-3000:]
    merged = run_dir / "merge" / "merged-16bit"
    assert (merged / "model.safetensors").stat().st_size > 200e6
    status = subprocess.run(
        [sys.executable, "-m", "tunectl.cli", "--store", str(run_dir.parents[1]), "status", run],
        capture_output=True, text=True,
    )  # fmt: skip
    assert re.search(r"phases \(merge, s\): .*fetch merge base", status.stdout), status.stdout


def test_a_failed_download_leaves_the_merge_stage_to_download_the_base(tmp_path, base_dir):
    # The first file request is refused (403): the download beside training fails, training goes on.
    with HubServer({HUB_ID: base_dir}, refuse_downloads=1) as hub:
        proc, run_dir, run = _submit(tmp_path, hub)
        downloads = list(hub.downloads)

    train = _manifest(run_dir, "train")
    assert train["metrics"]["merge_base_prefetch"]["exit_code"] == 1
    assert any(f"merge base {HUB_ID} not downloaded ahead (exit status 1" in n for n in train["notes"]), train["notes"]
    log = (run_dir / "logs" / "train.log").read_text()
    assert re.search(r"WARNING \[merge base\] not prefetched \(the merge stage downloads it\): .*403", log), log[-3000:]
    merge = _manifest(run_dir, "merge")
    assert merge["inputs"]["merge_base"] == HUB_ID and "merge_base_revision" not in merge["inputs"]
    assert set(downloads) >= {f"{HUB_ID}/model.safetensors", f"{HUB_ID}/config.json"}  # by the merge stage
    assert not (run_dir / "merge-base").exists()
