"""Hostile and careless files and stores (issue 13, items 4, 9 and 10 in part).

Every file tunectl writes is created beside its target without following links and renamed into place, so a
symlink planted in a pull destination (`manifest.json`, a `.part`, a temp name) never gets its target written.
A machine problem (read-only or full destination, a store path that is a file) is one line and exit 74; one
damaged run record does not break `list`; a password in an endpoint URL is never printed; a run id in use is
never written over. The runs are built cheaply: fake stages published through the store, no training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tunectl.errors import EXIT_ENVIRONMENT, TunectlError, redact
from tunectl.local import LocalBackend
from tunectl.recipe import load_recipe
from tunectl.stores import LocalStore, open_store
from tunectl.stores.manifest import sha256_file

VICTIM = b"precious data that is not tunectl's\n"
CONTRACT = {
    "eos_token": "</s>",
    "eos_token_id": 2,
    "stop_token_ids": [2],
    "stop_tokens": ["</s>"],
    "pad_token": "<pad>",
    "pad_token_id": 0,
    "prompt_template": "### Instruction:\n{instruction}\n\n### Response:\n{output}",
}


def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The error line, the last on stderr and the only one (a pull's progress label may come before it)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert [ln for ln in lines if not ln.startswith("error: ")] in ([], [lines[0]]), proc.stderr[-3000:]
    assert lines[0].startswith("error: ") or " files, " in lines[0], proc.stderr[-3000:]
    return lines[-1]


def make_run(store, tmp: Path, run: str = "r1", size: int = 256 * 2**10) -> dict[str, dict]:
    """A completed run of one train stage and a merge stage laid out like a merged export; returns manifests."""
    store.write_json(
        f"runs/{run}/run.json",
        {"run": run, "recipe": "fake", "backend": "local", "created": "2026-01-01T00:00:00+00:00", "stages": ["train"]},
    )
    store.write_json(f"runs/{run}/state.json", {"train": {"state": "succeeded"}})
    src = tmp / f"src-{run}"
    (src / "train" / "adapter").mkdir(parents=True)
    (src / "train" / "adapter" / "weights.bin").write_bytes(os.urandom(size))
    (src / "train" / "loss.json").write_text("[3.0, 2.0]\n")
    merged = src / "merge" / "merged-16bit"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(os.urandom(1024))
    (merged / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 2, "content": "</s>"}]}))
    (merged / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    (merged / "config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    return {
        "train": store.publish(run, "train", src / "train", {"contract": CONTRACT}),
        "merge": store.publish(run, "merge", src / "merge", {"contract": CONTRACT}),
    }


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def assert_pulled(dest: Path, manifest: dict) -> None:
    assert not (dest / "manifest.json").is_symlink()
    assert json.loads((dest / "manifest.json").read_text())["files"] == manifest["files"]
    for rel, meta in manifest["files"].items():
        assert not (dest / rel).is_symlink() and sha256_file(dest / rel) == meta["sha256"], rel


# -- item 4: links already in the destination ---------------------------------------------------------------------


def test_pull_replaces_planted_links_and_never_writes_their_targets(tunectl, store, tmp_path):
    manifests = make_run(LocalStore(store), tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    dest = tmp_path / "out"
    plant(dest / "train" / "manifest.json", victim)
    plant(dest / "train" / "loss.json", victim)  # a link where a pulled file goes
    plant(dest / "train" / "adapter" / "weights.bin.part", victim)  # the copy's old, predictable temp name
    proc = tunectl("pull", "r1", str(dest), "--stage", "train")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == VICTIM
    assert_pulled(dest / "train", manifests["train"])


@pytest.mark.parametrize("linked", ["train/adapter", "train"])
def test_pull_refuses_a_linked_directory_inside_the_destination(tunectl, store, tmp_path, linked):
    make_run(LocalStore(store), tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights.bin").write_bytes(VICTIM)
    (elsewhere / "manifest.json").write_bytes(VICTIM)
    dest = tmp_path / "out"
    plant(dest / linked, elsewhere)
    line = one_line(tunectl("pull", "r1", str(dest), "--stage", "train"), EXIT_ENVIRONMENT)
    assert f"{dest / linked} is a symbolic link: tunectl writes only into real directories under {dest}" in line
    assert sorted(p.name for p in elsewhere.iterdir()) == ["manifest.json", "weights.bin"]
    assert all(p.read_bytes() == VICTIM for p in elsewhere.iterdir())


def test_pull_to_vllm_never_writes_through_links_at_its_temp_names(tunectl, store, tmp_path):
    make_run(LocalStore(store), tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    dest = tmp_path / "vllm"
    for name in ("chat_template.jinja.tmp", "config.json.tmp", "tokenizer_config.json.tmp", "config.json"):
        plant(dest / name, victim)
    proc = tunectl("pull", "r1", "--to", "vllm", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == VICTIM
    assert not (dest / "config.json").is_symlink()
    assert json.loads((dest / "config.json").read_text()) == {"eos_token_id": 2, "pad_token_id": 0}
    assert "### Instruction:" in (dest / "chat_template.jinja").read_text()


def test_s3_pull_replaces_planted_part_files_and_never_writes_their_targets(tunectl, bucket, tmp_path):
    s3 = open_store(f"s3://{bucket}")
    manifest = make_run(s3, tmp_path, size=3 * 2**20)["train"]
    victims = {name: tmp_path / f"victim-{name}" for name in ("part", "resumed", "ident", "manifest")}
    for v in victims.values():
        v.write_bytes(VICTIM)
    dest = tmp_path / "out" / "train"
    # A .part link with no record of what it holds (pull starts afresh) ...
    plant(dest / "adapter" / "weights.bin.part", victims["part"])
    # ... one whose record says it is a prefix of this very object (pull would resume, appending) ...
    (dest / "loss.json.part.json").write_text(json.dumps(manifest["files"]["loss.json"]))
    plant(dest / "loss.json.part", victims["resumed"])
    # ... a linked record, and a linked manifest.
    plant(dest / "adapter" / "weights.bin.part.json", victims["ident"])
    plant(dest / "manifest.json", victims["manifest"])
    proc = tunectl("--store", f"s3://{bucket}", "pull", "r1", str(tmp_path / "out"), "--stage", "train")
    assert proc.returncode == 0, proc.stderr
    assert all(v.read_bytes() == VICTIM for v in victims.values())
    assert_pulled(dest, manifest)
    assert not list(dest.rglob("*.part*"))


# -- item 9: the machine's problems are one line, exit 74 ---------------------------------------------------------


def _can_mount_privately(tmp_path: Path) -> bool:
    """Whether this process may mount a tmpfs in a mount namespace of its own (root with CAP_SYS_ADMIN)."""
    if not shutil.which("unshare"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=4k", "x", str(probe)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def tunectl_on(mount: Path, options: str, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tunectl` with a tmpfs mounted (with `options`) on `mount`, seen by that process only."""
    script = 'mount -t tmpfs -o "$1" tunectl-test "$2" && shift 2 && exec "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", options, str(mount)]
    env = {**os.environ, "TUNECTL_STORE": str(store), "TUNECTL_BACKEND": "local"}
    return subprocess.run(
        [*cmd, sys.executable, "-m", "tunectl.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_pull_into_a_read_only_destination_is_one_line(tunectl, store, tmp_path):
    make_run(LocalStore(store), tmp_path)
    dest = tmp_path / "ro"
    dest.mkdir()
    if _can_mount_privately(tmp_path):
        proc = tunectl_on(dest, "ro", store, "pull", "r1", str(dest))
    elif os.geteuid() != 0:  # without privileges a mode is enough (root would ignore it)
        dest.chmod(0o555)
        proc = tunectl("pull", "r1", str(dest))
    else:
        pytest.skip("root without CAP_SYS_ADMIN: no way to make a directory read-only for this process")
    line = one_line(proc, EXIT_ENVIRONMENT)
    assert str(dest) in line and ("Read-only file system" in line or "Permission denied" in line), line


@pytest.mark.parametrize("kind", ["dir", pytest.param("s3", marks=pytest.mark.minio)])
def test_pull_into_a_full_destination_is_one_line_naming_the_file(tunectl, store, tmp_path, request, kind):
    if not _can_mount_privately(tmp_path):
        pytest.skip("needs a private tmpfs mount (root with CAP_SYS_ADMIN) to fill a file system")
    if kind == "s3":
        bucket = request.getfixturevalue("bucket")
        make_run(open_store(f"s3://{bucket}"), tmp_path, size=2 * 2**20)
        where: Path | str = f"s3://{bucket}"
    else:
        make_run(LocalStore(store), tmp_path, size=2 * 2**20)
        where = store
    dest = tmp_path / "full"
    dest.mkdir()
    proc = tunectl_on(dest, "size=256k", where, "pull", "r1", str(dest), "--stage", "train")
    line = one_line(proc, EXIT_ENVIRONMENT)
    assert "No space left on device" in line and str(dest / "train" / "adapter" / "weights.bin") in line, line


@pytest.mark.parametrize("args", [["list"], ["status", "r1"], ["pull", "r1", "{tmp}/out"]])
def test_a_store_path_that_is_a_file_is_one_line(tunectl, tmp_path, args):
    not_a_dir = tmp_path / "store.txt"
    not_a_dir.write_text("a file\n")
    args = [a.format(tmp=tmp_path) for a in args]
    for store in (not_a_dir, not_a_dir / "sub"):
        line = one_line(tunectl("--store", str(store), *args), EXIT_ENVIRONMENT)
        assert f"{not_a_dir} is a file, not a directory" in line, line
    assert not_a_dir.read_text() == "a file\n"


DAMAGE = {
    "bad-record": ("run.json", b'{"run": "bad-record", "stages": ["tr'),
    "bad-state": ("state.json", b"\x00\x00\x00\x00"),  # a crash's zero-filled block
}


def _damage(store: Path, run: str) -> None:
    name, data = DAMAGE[run]
    (store / "runs" / run / name).write_bytes(data)


def test_one_corrupt_run_record_does_not_break_list(tunectl, store, tmp_path):
    s = LocalStore(store)
    for run in ("good", "bad-record", "bad-state"):
        make_run(s, tmp_path, run, size=1024)
    _damage(store, "bad-record")
    _damage(store, "bad-state")
    proc = tunectl("list")
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines()[1:]}
    assert rows == {"bad-record": "unknown", "bad-state": "unknown", "good": "succeeded"}
    doc = json.loads(tunectl("list", "-o", "json", check=True).stdout)
    assert [(r["run"], r["state"]) for r in doc] == [
        ("bad-record", "unknown"),
        ("bad-state", "unknown"),
        ("good", "succeeded"),
    ]


@pytest.mark.parametrize(("run", "file"), [("bad-record", "run.json"), ("bad-state", "state.json")])
def test_status_of_a_run_with_a_corrupt_record_names_the_file(tunectl, store, tmp_path, run, file):
    make_run(LocalStore(store), tmp_path, run, size=1024)
    _damage(store, run)
    line = one_line(tunectl("status", run), 1)
    assert f"{store / 'runs' / run / file} is corrupt (not valid JSON" in line, line


# -- item 10: secrets and run ids ---------------------------------------------------------------------------------


def test_redact_removes_user_and_password_from_every_url():
    text = "at http://admin:s3cr3t@minio:9000/b and https://tok@host/x, not s3://bucket/a@b or mail a@b.c"
    assert redact(text) == "at http://***@minio:9000/b and https://***@host/x, not s3://bucket/a@b or mail a@b.c"
    assert redact("http://u:p@ss@host:1/") == "http://***@host:1/"  # an unescaped @ in the password


@pytest.mark.parametrize("server", [pytest.param("minio", marks=pytest.mark.minio), "nothing listening"])
def test_a_password_in_the_endpoint_url_is_never_printed(tunectl, tmp_path, monkeypatch, request, server):
    secret = "pw-7f3a91c2e5"
    if server == "minio":
        minio = request.getfixturevalue("minio")
        for k, v in minio.env().items():
            monkeypatch.setenv(k, v)
        port = minio.port
    else:
        from minio_server import free_port

        port = free_port()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "something")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://admin:{secret}@127.0.0.1:{port}")
    monkeypatch.setenv("TUNECTL_S3_RETRY_SECONDS", "1")
    for args in (["list"], ["pull", "r1", str(tmp_path / "out")]):
        proc = tunectl("--store", "s3://no-such-bucket-here", *args, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert secret not in proc.stderr + proc.stdout, proc.stderr
        assert f"error: S3 store http://***@127.0.0.1:{port} bucket" in proc.stderr, proc.stderr


def test_a_password_in_the_ollama_host_is_never_printed():
    from minio_server import free_port

    from tunectl.ollama import generate

    with pytest.raises(TunectlError) as e:
        generate(f"http://admin:pw-7f3a91c2e5@127.0.0.1:{free_port()}", "m", "hi", "", 1, timeout=5)
    assert "pw-7f3a91c2e5" not in str(e.value) and "http://***@127.0.0.1:" in str(e.value)


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_run_id_in_use_is_never_written_over(store):
    backend = LocalBackend(LocalStore(store))
    run = backend.create(load_recipe("ruozhiba-tiny", ["export.gguf=[]"]), run_id="same-id")
    before = _tree(store / "runs" / run)
    other = load_recipe("ruozhiba-tiny", ["export.gguf=[]", "export.merged_16bit=false", "export.lora=false"])
    with pytest.raises(TunectlError, match=f"run {run} already exists in file://.*: choose another id"):
        backend.create(other, run_id=run)
    assert _tree(store / "runs" / run) == before
    assert backend.run_record(run)["stages"] == ["train", "merge"]


@pytest.mark.parametrize("kind", ["dir", pytest.param("s3", marks=pytest.mark.minio)])
def test_of_two_simultaneous_claims_of_one_run_id_exactly_one_wins(store, request, kind):
    s = open_store(f"s3://{request.getfixturevalue('bucket')}") if kind == "s3" else LocalStore(store)
    barrier, won = threading.Barrier(8), []

    def claim() -> None:
        barrier.wait()
        won.append(s.claim_run("r-same-second"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]
    assert s.claim_run("r-same-second") is False
