from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tunectl(store: Path):
    """Run the real `tunectl` command against a store of the test's own."""

    def run(*args: str, check: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TUNECTL_STORE": str(store)}
        proc = subprocess.run(
            [sys.executable, "-m", "tunectl.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"tunectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    return run


@pytest.fixture(scope="session")
def minio(tmp_path_factory):
    """One real MinIO for the session (tests take a bucket each)."""
    from minio_server import MinioServer

    server = MinioServer(tmp_path_factory.mktemp("minio") / "data")
    server.start()
    yield server
    server.stop()


def new_bucket(minio, hint: str) -> str:
    import re
    import secrets

    name = re.sub(r"[^a-z0-9-]", "-", hint.lower())[:40].strip("-") + "-" + secrets.token_hex(3)
    minio.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(minio, request, monkeypatch) -> str:
    """A fresh bucket, with the standard AWS variables pointing at the test MinIO."""

    name = new_bucket(minio, request.node.name)
    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TUNECTL_S3_CACHE", str(Path(request.getfixturevalue("tmp_path")) / "s3-cache"))
    return name
