"""A real MinIO server for tests: the binary built from its Go module at the pinned version (`make tools`),
started on 127.0.0.1 with a free port, its own data directory and its own random root credentials."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

VERSIONS_ENV = Path(__file__).resolve().parents[1] / "versions.env"


def pinned(key: str) -> str:
    """A version from versions.env (KEY=VALUE lines), the file the Makefile builds the tools from."""
    for line in VERSIONS_ENV.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name == key and not name.startswith("#"):
            return value
    raise KeyError(f"{key} is not in {VERSIONS_ENV}")


MINIO_VERSION = pinned("MINIO_VERSION")
MC_VERSION = pinned("MC_VERSION")


def tool_path(name: str, version: str) -> Path:
    """Where `make tools` installs a Go tool: a bin dir keyed by version, outside the repo."""
    tools = Path(os.environ.get("TUNECTL_TOOLS") or Path.home() / ".cache" / "tunectl" / "bin")
    return tools / f"{name}-{version}" / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MinioServer:
    def __init__(self, data_dir: Path, binary: Path | None = None):
        self.binary = binary or tool_path("minio", MINIO_VERSION)
        if not self.binary.is_file():
            raise RuntimeError(f"MinIO is not built at {self.binary}: run `make tools`")
        self.data_dir = data_dir
        self.port = free_port()
        self.console_port = free_port()
        self.user = "tunectl-" + secrets.token_hex(4)
        self.password = secrets.token_hex(20)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"minio-{self.port}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the standard AWS variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.user,
            "AWS_SECRET_ACCESS_KEY": self.password,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.user,
            "MINIO_ROOT_PASSWORD": self.password,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "server",
                    str(self.data_dir),
                    "--address",
                    # 127.0.0.1 here; a cluster whose pods are not on this host's network (kind) needs 0.0.0.0 and
                    # TUNECTL_TEST_POD_S3_HOST (docs/kubernetes.md).
                    f"{os.environ.get('TUNECTL_TEST_MINIO_LISTEN') or '127.0.0.1'}:{self.port}",
                    "--console-address",
                    f"127.0.0.1:{self.console_port}",
                    "--quiet",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MinIO exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"MinIO did not become ready in {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.user,
            aws_secret_access_key=self.password,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
