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
