"""The train and merge stage programs with Unsloth on a CUDA GPU (skipped where there is none).

Runs tests/gpu/unsloth_stages.py: a random-initialised Llama of SmolLM2's shape with SmolLM2's real
tokenizer, loaded in 4-bit by the reference recipe's settings, a few steps, then the merge.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (see docs/gpu.md)")
def test_unsloth_train_and_merge_write_manifests(tmp_path: Path):
    from tunectl.recipe import load_recipe
    from tunectl_jobs.models import base_model_path

    shape = base_model_path(load_recipe("ruozhiba-tiny").model.name)
    script = Path(__file__).parent / "gpu" / "unsloth_stages.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--shape-from",
            shape,
            "--steps",
            "3",
            "--out",
            str(tmp_path),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train"]["metrics"]["backend"] == "unsloth" and summary["train"]["metrics"]["steps"] == 3
    assert "adapter/adapter_model.safetensors" in summary["train"]["files"]
    assert "merged-16bit/model.safetensors" in summary["merge"]["files"]
    assert any(f.startswith("merged-4bit/") and f.endswith(".safetensors") for f in summary["merge"]["files"])
