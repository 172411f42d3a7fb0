from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tunectl.errors import ArtifactError
from tunectl.runid import is_run_id, new_run_id
from tunectl.stores import LocalStore
from tunectl.stores.manifest import safe_key, sha256_file


def _stage_files(d: Path) -> None:
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (d / "loss.json").write_text("[1.0]")


def test_publish_writes_manifest_last_with_checksums(tmp_path: Path):
    store = LocalStore(tmp_path / "s")
    src = tmp_path / "out"
    _stage_files(src)
    assert store.manifest("r1", "train") is None
    doc = store.publish("r1", "train", src, {"metrics": {"loss": 1.0}})
    assert set(doc["files"]) == {"adapter/weights.bin", "loss.json"}
    assert doc["files"]["loss.json"] == {"sha256": sha256_file(src / "loss.json"), "size": 5}
    on_disk = json.loads((store.stage_dir("r1", "train") / "manifest.json").read_text())
    assert on_disk == doc and doc["metrics"] == {"loss": 1.0}
    got = store.fetch("r1", "train")
    assert got.file("adapter/weights.bin").read_bytes() == b"\x00\x01" * 1000


def test_consumer_refuses_missing_manifest_and_corruption(tmp_path: Path):
    store = LocalStore(tmp_path / "s")
    with pytest.raises(ArtifactError, match="has no manifest.*not completed"):
        store.fetch("r1", "train")
    src = tmp_path / "out"
    _stage_files(src)
    store.publish("r1", "train", src, {})
    target = store.stage_dir("r1", "train") / "loss.json"
    target.unlink()  # break the hard link before changing a byte
    target.write_text("[2.0]")
    with pytest.raises(ArtifactError, match="loss.json does not match its manifest checksum"):
        store.fetch("r1", "train")
    target.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        store.fetch("r1", "train")


def test_republish_removes_the_old_manifest_first(tmp_path: Path, monkeypatch):
    store = LocalStore(tmp_path / "s")
    src = tmp_path / "out"
    _stage_files(src)
    store.publish("r1", "train", src, {})
    calls = []
    real = store.write_json

    def spy(key, doc):
        calls.append((key, (store.stage_dir("r1", "train") / "manifest.json").exists()))
        real(key, doc)

    monkeypatch.setattr(store, "write_json", spy)
    store.publish("r1", "train", src, {})
    assert calls == [("runs/r1/train/manifest.json", False)]


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(ArtifactError, match="unsafe"):
        safe_key(key)


def test_run_ids_are_dns_labels():
    t = datetime(2026, 11, 27, 20, 1, 2, tzinfo=UTC)
    rid = new_run_id("ruozhiba-tiny", t)
    assert rid.startswith("ruozhiba-tiny-20261127-200102-") and is_run_id(rid)
    long = new_run_id("x" * 80 + "_Weird.Name", t)
    assert len(long) <= 63 and is_run_id(long)
    assert new_run_id("ruozhiba", t) != new_run_id("ruozhiba", t)


def test_writes_replace_a_link_at_the_name_and_leave_no_temp_files(tmp_path: Path):
    from tunectl.files import copy_atomic, write_atomic

    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    for name in ("doc.json", "copy.bin", "linked.bin"):
        (d / name).symlink_to(victim)
    write_atomic(d / "doc.json", "{}\n")
    copy_atomic(victim, d / "copy.bin")
    copy_atomic(victim, d / "linked.bin", link=True)
    assert victim.read_text() == "keep"
    assert not any(p.is_symlink() for p in d.iterdir())
    assert sorted(p.name for p in d.iterdir()) == ["copy.bin", "doc.json", "linked.bin"]
    assert (d / "doc.json").read_text() == "{}\n" and (d / "copy.bin").read_text() == "keep"
    assert (d / "linked.bin").stat().st_ino == victim.stat().st_ino  # a hard link to the source, as publish makes


@pytest.mark.parametrize(("data", "why"), [(b'{"a": ', "not valid JSON"), (b"[]", "a JSON list, not an object")])
def test_a_corrupt_document_is_an_error_naming_the_file(tmp_path: Path, data, why):
    from tunectl.stores import CorruptDocument

    store = LocalStore(tmp_path / "s")
    store.write_json("runs/r1/run.json", {"run": "r1"})
    (store.run_dir("r1") / "run.json").write_bytes(data)
    with pytest.raises(CorruptDocument) as e:
        store.read_json("runs/r1/run.json")
    assert str(e.value).startswith(f"{store.run_dir('r1') / 'run.json'} is corrupt ({why}")


def test_credentials_in_an_s3_store_uri_are_refused_without_being_repeated():
    from tunectl.errors import ConfigError
    from tunectl.stores import open_store

    with pytest.raises(ConfigError) as e:
        open_store("s3://AKIAEXAMPLE:s3cr3t@bucket/prefix")
    assert "s3cr3t" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    assert str(e.value).startswith("store s3://***@bucket/prefix: credentials do not belong in the store URI")


def test_early_checksums_serve_only_the_unchanged_file_they_read(tmp_path: Path):
    """A stage's finished file is hashed in the background; publishing (a hard link of it in a directory store)
    uses that digest, and a file written to after it was hashed gets none: it is read again."""
    import os
    import time

    from tunectl.stores.manifest import EarlyChecksums

    early = EarlyChecksums()
    done, later = tmp_path / "done.gguf", tmp_path / "later.gguf"
    done.write_bytes(os.urandom(3 << 20))
    later.write_bytes(b"first")
    early.soon(done)
    early.soon(later)
    assert early.digest(done) == sha256_file(done)
    os.link(done, tmp_path / "linked.gguf")
    assert early.digest(tmp_path / "linked.gguf") == sha256_file(done)
    time.sleep(0.01)
    later.write_bytes(b"second")
    assert early.digest(later) is None and early.digest(tmp_path / "never-hashed") is None
    early.close()

    store, src = LocalStore(tmp_path / "s"), tmp_path / "out"
    _stage_files(src)
    weights = src / "adapter" / "weights.bin"
    planted = "0" * 64  # not the file's: proves the publish took the digest it was given instead of reading
    doc = store.publish("r1", "train", src, {}, digests=lambda p: planted if p.name == weights.name else None)
    assert doc["files"]["adapter/weights.bin"]["sha256"] == planted
    assert doc["files"]["loss.json"]["sha256"] == sha256_file(src / "loss.json")


def test_a_run_copied_to_another_store_is_read_from_the_copy(tmp_path: Path):
    """A local run copied to another store (`cp -r`, `aws s3 sync`) is read there: `status` and `report` on the copy
    name the copy's store, not the one it was submitted to (which may be gone, or need other credentials)."""
    import shutil

    from tunectl.local import LocalBackend
    from tunectl.recipe import load_recipe
    from tunectl.stores import open_store

    run = LocalBackend(open_store(str(tmp_path / "a"))).create(load_recipe("ruozhiba-tiny", ["export.gguf=[]"]))
    shutil.copytree(tmp_path / "a" / "runs" / run, tmp_path / "b" / "runs" / run)
    shutil.rmtree(tmp_path / "a")
    copy = open_store(str(tmp_path / "b"))
    assert LocalBackend(copy).status(run).store == copy.uri
