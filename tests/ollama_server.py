"""A real Ollama server for the pull tests: the pinned build from tests/ollama/build.sh (make test builds it),
on 127.0.0.1 with a free port, its own model directory and its own HOME (it writes a key pair there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from minio_server import free_port, pinned

OLLAMA_VERSION = pinned("OLLAMA_VERSION")


def ollama_binary() -> str | None:
    """TUNECTL_TEST_OLLAMA (set by `make test-slow`; must exist then), else the pinned build where the Makefile puts
    it (TUNECTL_TOOLS), else `ollama` on PATH."""
    given = os.environ.get("TUNECTL_TEST_OLLAMA")
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"TUNECTL_TEST_OLLAMA={given} does not exist: run tests/ollama/build.sh")
        return given
    tools = Path(os.environ.get("TUNECTL_TOOLS") or Path.home() / ".cache" / "tunectl" / "bin")
    built = tools / f"ollama-{OLLAMA_VERSION}" / "bin" / "ollama"
    return str(built) if built.is_file() else shutil.which("ollama")


class OllamaServer:
    def __init__(self, binary: str, root: Path):
        self.binary, self.root = binary, root
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "OLLAMA_HOST": self.url, "HOME": str(self.root / "home")}

    def start(self, timeout: float = 60) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        env = {**self.env(), "OLLAMA_MODELS": str(self.root / "models"), "OLLAMA_NO_CLOUD": "1", "GIN_MODE": "release"}
        self.log = open(self.root / "serve.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([self.binary, "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ollama serve exited {self.proc.returncode}: {(self.root / 'serve.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/api/version", timeout=2) as r:
                    self.version = json.loads(r.read())["version"]
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"ollama serve did not answer on {self.url} within {timeout}s")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ollama client against this server."""
        return subprocess.run([self.binary, *args], env=self.env(), capture_output=True, text=True, timeout=300)

    def ask(self, endpoint: str, name: str, max_tokens: int = 128, **body: object) -> dict:
        """One greedy, non-streamed request to /api/ENDPOINT (generate or chat) for the model `name`; `body` adds
        the prompt: system and prompt, raw=True for text sent as it is, or messages."""
        options = {"temperature": 0, "top_k": 1, "repeat_penalty": 1.0, "num_predict": max_tokens}
        request = {"model": name, "stream": False, "options": options, **body}
        req = urllib.request.Request(f"{self.url}/api/{endpoint}", data=json.dumps(request).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=300) as resp:
            return dict(json.loads(resp.read()))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
