"""The images as built by `make images-local`: non-root, labelled, and their exit codes are the contract the
chart's podFailurePolicy relies on (78 = configuration error, fatal; anything else may be retried)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tunectl import __version__
from tunectl.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

ENTRYPOINT = {
    "controller": ["tunectl"],
    "train": ["python", "-m", "tunectl_jobs.train"],
    "export": ["python", "-m", "tunectl_jobs.merge"],
    "gguf": ["python", "-m", "tunectl_jobs.gguf"],
}


def run_stage(images, image: str, recipe: Path, store: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A stage container as the chart runs it: its user, read-only root, no capabilities, the recipe mounted."""
    # emptyDirs as world-writable host directories (this Docker ignores tmpfs modes on a read-only root).
    scratch, tmp = recipe.parent.parent / "scratch", recipe.parent.parent / "tmp"
    for d in (scratch, tmp):
        d.mkdir(exist_ok=True)
        d.chmod(0o1777)
    cmd = [images.docker, "run", "--rm", "--network", "host", "--user", "1000:1000", "--read-only"]
    cmd += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-v", f"{scratch}:/scratch"]
    cmd += ["-v", f"{tmp}:/tmp", "-v", f"{recipe.parent}:/etc/tunectl:ro", *extra]
    cmd += [f"tunectl-{image}:{images.tag}", "--recipe", f"/etc/tunectl/{recipe.name}", "--store", store, "--run", "r1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _pin(name: str) -> str:
    out = subprocess.run(
        ["python3", "images/requirements.py", "--version-of", name], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("dockerfile", "arg", "package"),
    [("torch", "TORCH_VERSION", "torch"), ("gguf", "LLAMA_CPP_PYTHON_VERSION", "llama-cpp-python")],
)
def test_dockerfile_defaults_match_the_pins(dockerfile, arg, package):
    """build.sh passes the pins from pyproject.toml; a plain `docker build` gets the Dockerfile's default."""
    text = (REPO / "images" / dockerfile / "Dockerfile").read_text()
    assert re.search(rf"^ARG {arg}=(\S+)$", text, re.M).group(1) == _pin(package)


@pytest.mark.docker
def test_stage_images_share_the_torch_layers(images):
    """torch is most of each stage image: train, export and gguf must store and pull it once, not three times."""

    def layers(image: str) -> list[str]:
        out = subprocess.run(
            [images.docker, "image", "inspect", "-f", "{{json .RootFS.Layers}}", f"tunectl-{image}:{images.tag}"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    torch = layers("torch")
    for image in ("train", "export", "gguf"):
        assert layers(image)[: len(torch)] == torch, image
    # train and export install the same packages: their dependency layer is one layer too
    train, export = layers("train"), layers("export")
    assert train[: len(train) - 1] == export[: len(export) - 1]


@pytest.mark.docker
@pytest.mark.parametrize("image", sorted(ENTRYPOINT))
def test_image_is_non_root_exec_form_and_labelled(images, image):
    out = subprocess.run(
        [images.docker, "image", "inspect", f"tunectl-{image}:{images.tag}"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)[0]["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ENTRYPOINT[image]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.title"] == f"tunectl-{image}"


@pytest.mark.docker
def test_bad_config_exits_78(images, tmp_path):
    bad = tmp_path / "recipe" / "recipe.yaml"
    bad.parent.mkdir()
    bad.write_text(load_recipe("ruozhiba-tiny").to_yaml().replace("max_steps: 40", "max_stepz: 40"))
    proc = run_stage(images, "train", bad, "/scratch/store")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "error: recipe /etc/tunectl/recipe.yaml: unknown key 'training.max_stepz'; did you mean 'max_steps'?" in (
        proc.stderr
    )


@pytest.mark.docker
def test_unreachable_store_is_a_transient_failure(images, tmp_path):
    recipe = tmp_path / "recipe" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(load_recipe("ruozhiba-tiny").to_yaml())
    env = ["-e", "AWS_ENDPOINT_URL=http://127.0.0.1:9", "-e", "AWS_ACCESS_KEY_ID=x", "-e", "AWS_SECRET_ACCESS_KEY=y"]
    env += ["-e", "AWS_REGION=us-east-1", "-e", "TUNECTL_S3_RETRY_SECONDS=2", "-e", "HOME=/scratch/home"]
    proc = run_stage(images, "export", recipe, "s3://artifacts/tunectl", *env)
    assert proc.returncode not in (0, 78), proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "error: " in proc.stderr and "127.0.0.1:9" in proc.stderr


# Run inside a GPU image: the versions it installed, and what torch's CUDA library would load on a GPU node.
_GPU_STACK = """
import importlib.metadata as md, json, os, subprocess, torch
import bitsandbytes, datasets, peft, transformers, trl  # the training stack imports (Unsloth needs a GPU to)
lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")
ldd = subprocess.run(["ldd", lib], capture_output=True, text=True, check=True).stdout
names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "unsloth", "unsloth-zoo", "datasets", "accelerate")
print(json.dumps({
    "versions": {n: md.version(n) for n in names},
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "missing": sorted({line.split()[0] for line in ldd.splitlines() if "not found" in line}),
    "loaded": sorted({line.split()[0] for line in ldd.splitlines() if "=> /" in line and "/nvidia/" in line}),
}))
"""


@pytest.mark.docker
@pytest.mark.parametrize("image", ["train", "export"])
def test_the_gpu_images_carry_the_pinned_training_stack_and_the_cuda_libraries(gpu_images, image):
    """Built here without a registry (the Debian base made here, PyPI's CUDA torch wheels): every package at the
    version the GPU benchmarks ran (docs/gpu-benchmarks.md), and every library torch's CUDA code links resolved
    inside the image but the driver's own `libcuda.so.1`, which the node's NVIDIA runtime mounts."""
    ref = f"tunectl-{image}:{gpu_images.tag}"
    proc = subprocess.run(
        [gpu_images.docker, "run", "--rm", "--network", "none", "--entrypoint", "python", ref, "-c", _GPU_STACK],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["versions"] == {n: _pin(n) for n in found["versions"]}, found["versions"]
    assert found["cuda"].startswith("13.") and found["cudnn"], found
    assert set(found["missing"]) <= {"libcuda.so.1"}, found["missing"]
    assert any(n.startswith("libcudart") for n in found["loaded"]) and any("cublas" in n for n in found["loaded"])
