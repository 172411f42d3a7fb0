"""The S3 store against a real MinIO: handoff contract, resumable transfers, faults and clear errors."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("boto3")

from tunectl.errors import ArtifactError, TunectlError  # noqa: E402
from tunectl.stores import open_store  # noqa: E402
from tunectl.stores import s3 as s3store  # noqa: E402
from tunectl.stores.manifest import sha256_file  # noqa: E402
from tunectl.stores.s3 import S3Store  # noqa: E402


@pytest.fixture
def small_parts(monkeypatch):
    """1 MiB parts, so a few MiB exercise multipart and ranged transfers."""
    monkeypatch.setattr(s3store, "PART_SIZE", 2**20)
    monkeypatch.setattr(s3store, "RANGE_SIZE", 2**20)
    monkeypatch.setattr(s3store, "CONCURRENCY", 4)


def _stage_dir(root: Path, big_mib: int = 5) -> Path:
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "weights.bin").write_bytes(os.urandom(big_mib * 2**20 + 12345))
    (root / "loss.json").write_text("[3.0, 2.0]")
    (root / "empty.txt").write_text("")
    return root


def _fetch_interrupted(store: S3Store, dest: Path, after: int) -> None:
    """Start pulling run r1's train stage into `dest` and stop it (as Ctrl-C would) after `after` bytes."""

    class Interrupted(Exception):
        pass

    done = 0

    def stop(n: int) -> None:
        nonlocal done
        done += n
        if done > after:
            raise Interrupted

    with pytest.raises(Interrupted):
        store.fetch("r1", "train", dest=dest, progress=stop)


def _count_uploads(store: S3Store, monkeypatch) -> list[str]:
    sent: list[str] = []
    real = store.client.upload_file

    def spy(filename, bucket, key, **kw):
        sent.append(key)
        return real(filename, bucket, key, **kw)

    monkeypatch.setattr(store.client, "upload_file", spy)
    return sent


def test_publish_and_fetch_round_trip(bucket, tmp_path, small_parts):
    store = open_store(f"s3://{bucket}/team/a")
    assert isinstance(store, S3Store) and store.uri == f"s3://{bucket}/team/a"
    src = _stage_dir(tmp_path / "src")
    doc = store.publish("r1", "train", src, {"metrics": {"loss": 2.0}})
    assert set(doc["files"]) == {"adapter/weights.bin", "loss.json", "empty.txt"}
    keys = {o["Key"] for o in store.client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "team/a/runs/r1/train/manifest.json" in keys and "team/a/runs/r1/train/adapter/weights.bin" in keys
    got = store.fetch("r1", "train", dest=tmp_path / "out")
    for rel in doc["files"]:
        assert sha256_file(got.file(rel)) == sha256_file(src / rel)
    assert got.manifest["metrics"] == {"loss": 2.0}
    assert not list((tmp_path / "out").rglob("*.part*"))


def test_republish_sends_only_changed_files(bucket, tmp_path, small_parts, monkeypatch):
    store = open_store(f"s3://{bucket}")
    src = _stage_dir(tmp_path / "src")
    store.publish("r1", "train", src, {})
    sent = _count_uploads(store, monkeypatch)
    store.publish("r1", "train", src, {})
    assert sent == []
    (src / "loss.json").write_text("[1.0]")
    store.publish("r1", "train", src, {})
    assert sent == ["runs/r1/train/loss.json"]
    # An object changed behind the journal's back (new ETag) is sent again, so a re-run repairs corruption.
    store.client.put_object(Bucket=bucket, Key="runs/r1/train/adapter/weights.bin", Body=b"garbage")
    sent.clear()
    store.publish("r1", "train", src, {})
    assert sent == ["runs/r1/train/adapter/weights.bin"]
    store.fetch("r1", "train", dest=tmp_path / "out")


def test_consumer_refuses_missing_manifest_and_corrupted_object(bucket, tmp_path, small_parts):
    store = open_store(f"s3://{bucket}")
    with pytest.raises(ArtifactError, match="stage 'train' of run r1 has no manifest .* not completed"):
        store.fetch("r1", "train")
    store.publish("r1", "train", _stage_dir(tmp_path / "src"), {})
    # Same size, one byte different, sha256 metadata left claiming the old content.
    obj = store.client.get_object(Bucket=bucket, Key="runs/r1/train/adapter/weights.bin")
    data = bytearray(obj["Body"].read())
    data[100] ^= 0xFF
    store.client.put_object(
        Bucket=bucket, Key="runs/r1/train/adapter/weights.bin", Body=bytes(data), Metadata=obj["Metadata"]
    )
    with pytest.raises(ArtifactError, match=r"adapter/weights.bin does not match its manifest checksum \(corrupted"):
        store.fetch("r1", "train", dest=tmp_path / "out")
    assert not (tmp_path / "out" / "adapter" / "weights.bin").exists()


def test_unsafe_keys_in_a_manifest_are_refused(bucket, tmp_path):
    store = open_store(f"s3://{bucket}")
    store.write_json("runs/r1/train/manifest.json", {"files": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}})
    with pytest.raises(ArtifactError, match="refusing unsafe artifact key"):
        store.fetch("r1", "train", dest=tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_wrong_credentials_and_missing_bucket_name_endpoint_and_bucket(bucket, minio, monkeypatch):
    monkeypatch.setenv("TUNECTL_S3_RETRY_SECONDS", "5")
    missing = open_store("s3://no-such-bucket-here")
    with pytest.raises(TunectlError) as e:
        missing.check()
    assert str(e.value) == (
        f"S3 store {minio.endpoint} bucket 'no-such-bucket-here' does not exist; "
        f"create it first (for example `mc mb` or `aws s3 mb`)"
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(TunectlError) as e:
        open_store(f"s3://{bucket}").read_json("runs/x/run.json")
    msg = str(e.value)
    assert msg.startswith(f"S3 store {minio.endpoint} bucket '{bucket}': access denied (SignatureDoesNotMatch)")
    assert "\n" not in msg and "wrong-secret" not in msg


def test_cli_reports_store_errors_in_one_line(tunectl, minio, bucket, monkeypatch):
    proc = tunectl("--store", "s3://no-such-bucket-here", "list")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: S3 store {minio.endpoint} bucket 'no-such-bucket-here' does not exist; "
        f"create it first (for example `mc mb` or `aws s3 mb`)"
    )


def test_upload_survives_minio_restart_and_no_manifest_appears_meanwhile(bucket, minio, tmp_path, small_parts, caplog):
    """MinIO is stopped in the middle of an upload and started again: the publish retries and completes;
    while it is incomplete there is no manifest and a consumer refuses the stage."""
    store = open_store(f"s3://{bucket}")
    src = _stage_dir(tmp_path / "src", big_mib=24)
    outage = {"stopped": False, "manifest_during": "unset", "consumer_error": None}
    resumed = threading.Event()

    def check_while_incomplete() -> None:
        time.sleep(1.0)
        minio.start()
        observer = S3Store(bucket, cache_root=tmp_path / "observer")
        outage["manifest_during"] = observer.manifest("r1", "train")
        try:
            observer.fetch("r1", "train")
        except ArtifactError as e:
            outage["consumer_error"] = str(e)
        resumed.set()

    sent = 0

    def progress(n: int) -> None:
        nonlocal sent
        sent += n
        if not outage["stopped"] and sent > 6 * 2**20:
            outage["stopped"] = True
            minio.stop()  # the server goes away with parts in flight
            threading.Thread(target=check_while_incomplete, daemon=True).start()
            resumed.wait(60)  # hold this part until the checks ran against the restarted server

    doc = store.publish("r1", "train", src, {}, progress=progress)
    assert outage["stopped"] and resumed.is_set()
    assert any("uploading runs/r1/train/adapter/weights.bin failed" in r.message for r in caplog.records)
    assert outage["manifest_during"] is None
    assert "has no manifest" in outage["consumer_error"]
    got = store.fetch("r1", "train", dest=tmp_path / "out")
    assert sha256_file(got.file("adapter/weights.bin")) == doc["files"]["adapter/weights.bin"]["sha256"]


def test_download_cut_mid_range_is_retried(bucket, minio, tmp_path, small_parts, monkeypatch, caplog):
    """A connection closed in the middle of a range's body (a real TCP proxy in front of MinIO cuts it): the
    range is fetched again and the pull completes, verified."""
    from cutting_proxy import CuttingProxy

    src = _stage_dir(tmp_path / "src", big_mib=6)
    open_store(f"s3://{bucket}").publish("r1", "train", src, {})
    proxy = CuttingProxy(("127.0.0.1", minio.port), after=512 * 2**10)  # inside the first 1 MiB range
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        got = open_store(f"s3://{bucket}").fetch("r1", "train", dest=tmp_path / "out")
    finally:
        proxy.close()
    assert proxy.cut == 1
    assert any("downloading runs/r1/train/adapter/weights.bin failed" in r.message for r in caplog.records)
    assert sha256_file(got.file("adapter/weights.bin")) == sha256_file(src / "adapter" / "weights.bin")


def test_interrupted_pull_resumes_with_only_the_missing_bytes(bucket, tmp_path, small_parts, monkeypatch):
    store = open_store(f"s3://{bucket}")
    src = _stage_dir(tmp_path / "src", big_mib=8)
    store.publish("r1", "train", src, {})
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    fetched: list[int] = []
    real = store.client.get_object

    def counting_get(**kw):
        out = real(**kw)
        if "Range" in kw:
            start, end = kw["Range"].removeprefix("bytes=").split("-")
            fetched.append(int(end) - int(start) + 1)
        return out

    monkeypatch.setattr(store.client, "get_object", counting_get)

    _fetch_interrupted(store, tmp_path / "out", after=total // 2)
    first = sum(fetched)
    assert 0 < first < total
    fetched.clear()
    got = store.fetch("r1", "train", dest=tmp_path / "out")
    second = sum(fetched)
    assert sha256_file(got.file("adapter/weights.bin")) == sha256_file(src / "adapter" / "weights.bin")
    # Only what was missing went over the wire the second time (ranges in flight at the interruption
    # may be fetched again: at most one part per worker).
    assert second <= total - first + s3store.CONCURRENCY * s3store.RANGE_SIZE
    assert second < total
    fetched.clear()
    store.fetch("r1", "train", dest=tmp_path / "out")  # everything present and verified: nothing sent
    assert fetched == []


def test_resumed_pull_with_a_damaged_partial_file_downloads_it_again(bucket, tmp_path, small_parts):
    store = open_store(f"s3://{bucket}")
    src = _stage_dir(tmp_path / "src", big_mib=8)
    store.publish("r1", "train", src, {})

    _fetch_interrupted(store, tmp_path / "out", after=4 * 2**20)
    part = tmp_path / "out" / "adapter" / "weights.bin.part"
    assert part.stat().st_size > 0
    with open(part, "r+b") as f:  # one flipped byte in what was already downloaded
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    got = store.fetch("r1", "train", dest=tmp_path / "out")
    assert sha256_file(got.file("adapter/weights.bin")) == sha256_file(src / "adapter" / "weights.bin")
    assert not part.exists()


def test_list_runs_reads_the_bucket(bucket, tmp_path):
    store = open_store(f"s3://{bucket}/p")
    for run in ("b-run", "a-run"):
        store.write_json(f"runs/{run}/run.json", {"run": run})
    store.write_text("runs/orphan/train/manifest.json", "{}")  # no run.json: not a run
    assert store.list_runs() == ["a-run", "b-run"]
    assert json.loads(store.read_text("runs/a-run/run.json")) == {"run": "a-run"}


def test_bodies_that_are_not_plain_http_responses_are_read_through_botocore():
    """The direct socket read applies only to an identity-encoded HTTP response; anything else (here a body over
    an in-memory stream) is read through the body's own readinto."""
    import io

    from botocore.response import StreamingBody

    data = os.urandom(3 * 2**20 + 7)
    body = StreamingBody(io.BytesIO(data), len(data))
    readinto, release = s3store._socket_reader(body)
    buf, got = memoryview(bytearray(len(data))), 0
    while got < len(buf) and (n := readinto(buf[got:])):
        got += n
    release()
    assert readinto == body.readinto
    assert got == len(data) and bytes(buf) == data
