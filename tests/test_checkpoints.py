"""Training checkpoints in the store (tunectl.checkpoints): committed like stages, listed only once complete, the
newest that verifies restored, a different recipe refused, old ones pruned. The Trainer's checkpoint directories
are stood in for by a few files here; training through a SIGTERM and resuming is tested in test_e2e_pipeline.py
(local) and test_real_node.py (Kubernetes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunectl import checkpoints
from tunectl.errors import ConfigError
from tunectl.recipe import load_recipe
from tunectl.stores import LocalStore, open_store

RUN = "r-ckpt-1"


@pytest.fixture
def recipe():
    return load_recipe("ruozhiba-tiny", ["training.keep_checkpoints=2"])


@pytest.fixture(params=["dir", pytest.param("minio", marks=pytest.mark.minio)])
def store(request, tmp_path):
    if request.param == "dir":
        return LocalStore(tmp_path / "store")
    from conftest import new_bucket

    minio = request.getfixturevalue("minio")
    for k, v in minio.env().items():
        request.getfixturevalue("monkeypatch").setenv(k, v)
    request.getfixturevalue("monkeypatch").setenv("TUNECTL_S3_CACHE", str(tmp_path / "s3-cache"))
    return open_store(f"s3://{new_bucket(minio, 'ckpt')}/p")


def trainer_dir(tmp_path: Path, step: int) -> Path:
    """What the Trainer writes for a checkpoint, in small."""
    d = tmp_path / f"trainer/checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (d / "optimizer.pt").write_bytes(b"opt" * step)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def save(store, recipe, tmp_path, step, why="steps"):
    checkpoints.save(store, RUN, recipe, trainer_dir(tmp_path, step), step, why)


def test_the_newest_complete_checkpoint_is_restored_and_old_ones_pruned(store, recipe, tmp_path):
    assert checkpoints.restore(store, RUN, recipe, tmp_path / "r0") is None
    for step in (4, 8, 12):
        save(store, recipe, tmp_path, step)
    assert [c["step"] for c in checkpoints.listed(store, RUN)] == [12, 8]  # keep_checkpoints=2
    assert store.manifest(RUN, "checkpoints/train/step-00000004") is None  # pruned
    path, step = checkpoints.restore(store, RUN, recipe, tmp_path / "r1")
    assert step == 12 and json.loads((path / "trainer_state.json").read_text()) == {"global_step": 12}
    assert (path / "adapter_model.safetensors").read_bytes() == bytes([12]) * 1000
    assert checkpoints.newest(store, RUN)["step"] == 12


def test_a_checkpoint_torn_mid_upload_is_never_used(store, recipe, tmp_path):
    """A SIGKILL during an upload leaves files without a manifest and the index untouched: the previous one wins."""
    save(store, recipe, tmp_path, 4)
    torn = trainer_dir(tmp_path, 8)
    for f in torn.iterdir():  # the files arrive; the manifest and the index update never do
        store.put_file(f"runs/{RUN}/checkpoints/train/step-00000008/{f.name}", f)
    _, step = checkpoints.restore(store, RUN, recipe, tmp_path / "r")
    assert step == 4


def test_a_listed_checkpoint_that_fails_its_checksums_gives_way_to_the_one_before(store, recipe, tmp_path, caplog):
    save(store, recipe, tmp_path, 4)
    save(store, recipe, tmp_path, 8)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not what the manifest says")
    store.put_file(f"runs/{RUN}/checkpoints/train/step-00000008/optimizer.pt", bad)
    path, step = checkpoints.restore(store, RUN, recipe, tmp_path / "r")
    assert step == 4 and (path / "optimizer.pt").read_bytes() == b"opt" * 4
    assert "checkpoint at step 8 is unusable" in caplog.text


def test_a_different_recipe_is_refused_with_one_line(store, recipe, tmp_path):
    save(store, recipe, tmp_path, 4)
    changed = load_recipe("ruozhiba-tiny", ["training.learning_rate=0.002"])
    with pytest.raises(ConfigError) as e:
        checkpoints.restore(store, RUN, changed, tmp_path / "r")
    assert str(e.value) == (
        f"run {RUN} has a checkpoint at step 4 from a different recipe: resume it with the recipe it started with "
        f"(tunectl status {RUN} shows it), or submit a new run"
    )


def test_all_checkpoints_go_once_the_stage_has_published(store, recipe, tmp_path):
    save(store, recipe, tmp_path, 4)
    save(store, recipe, tmp_path, 8)
    checkpoints.delete_all(store, RUN)
    assert checkpoints.listed(store, RUN) == [] and checkpoints.newest(store, RUN) is None
    for step in (4, 8):
        assert store.manifest(RUN, f"checkpoints/train/step-{step:08d}") is None
    if isinstance(store, LocalStore):
        assert not (store.root / "runs" / RUN / "checkpoints" / "train").exists()


@pytest.mark.minio
def test_sigkill_in_the_middle_of_a_checkpoint_upload_leaves_the_previous_one_in_use(minio, tmp_path, monkeypatch):
    """A real upload to MinIO killed with SIGKILL part way (a process of its own, as the train stage would be): the
    files that made it are there, but without a manifest or an index entry the checkpoint does not exist."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import new_bucket

    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TUNECTL_S3_CACHE", str(tmp_path / "s3-cache"))
    uri = f"s3://{new_bucket(minio, 'torn')}/p"
    recipe = load_recipe("ruozhiba-tiny")
    store = open_store(uri)
    save(store, recipe, tmp_path, 4)
    big = trainer_dir(tmp_path, 8)
    with open(big / "optimizer.pt", "wb") as f:  # large enough to be caught mid-upload
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    script = (
        "import sys; from pathlib import Path; from tunectl import checkpoints; from tunectl.recipe import load_recipe;"
        "from tunectl.stores import open_store;"
        f"checkpoints.save(open_store({uri!r}), {RUN!r}, load_recipe('ruozhiba-tiny'), Path({str(big)!r}), 8, 'steps')"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    prefix = f"runs/{RUN}/checkpoints/train/step-00000008/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # kill once the first file of step 8 has landed
        if store.read_json(prefix + ".uploaded.json"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the upload finished before it could be killed"
    assert store.manifest(RUN, "checkpoints/train/step-00000008") is None
    assert [c["step"] for c in checkpoints.listed(store, RUN)] == [4]
    _, step = checkpoints.restore(store, RUN, recipe, tmp_path / "r")
    assert step == 4
