"""tunectl's llama.cpp build (jobs/tunectl_jobs/llamabuild.py): portable, proven, and buildable offline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunectl_jobs import llamabuild, llamacpp, llamarun
from tunectl_jobs.models import cache_dir


@pytest.mark.ml
def test_the_installed_llama_cpp_is_portable():
    """The venv's llama.cpp chooses its CPU code at run time: variant libraries for each x86-64 level, none with
    AMX, the one chosen named; the libraries every CPU loads carry no AVX at all, the x64 variant neither, and the
    Haswell (AVX2) variant no AVX-512."""
    variants = llamarun.cpu_variants()
    assert {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4"} <= set(variants), variants
    assert "sapphirerapids" not in variants
    chosen = subprocess.run(
        [sys.executable, "-m", "tunectl_jobs.llamarun", "variant"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert chosen in variants

    lib = llamarun.lib_dir()

    def registers(name: str) -> set[str]:
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib / name)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return {r for r in ("%ymm", "%zmm") if r in out.stdout}

    for common in ("libggml-base.so", "libllama.so", "libggml-cpu-x64.so"):
        assert registers(common) == set(), f"{common} uses AVX registers: it would not run on every x86-64 CPU"
    assert registers("libggml-cpu-haswell.so") == {"%ymm"}


@pytest.mark.ml
def test_the_converter_is_fetched_offline_from_the_kept_sdist(tmp_path, monkeypatch):
    """What an air-gapped image build does: the converter from a local sdist file or wheelhouse, no index."""
    kept = cache_dir() / "wheels" / "sdist"
    sdist = kept / f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    assert sdist.is_file(), f"{sdist}: `make setup` keeps the sdist it built from there"
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/nothing-here")  # any use of an index would fail
    tree = llamacpp.fetch(tmp_path / "from-file", sdist_file=sdist)
    assert (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py" / "gguf").is_dir()
    tree = llamacpp.fetch(tmp_path / "from-dir", find_links=kept)
    assert (tree / "convert_hf_to_gguf.py").is_file()


def test_a_missing_or_wrong_sdist_is_one_line(tmp_path):
    with pytest.raises(llamabuild.BuildError, match="no such sdist"):
        llamabuild.sdist("0.3.36", tmp_path, path=tmp_path / "nope.tar.gz")
    wrong = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    wrong.write_bytes(b"")
    with pytest.raises(llamabuild.BuildError, match="is not the pinned sdist llama_cpp_python-0.3.36.tar.gz"):
        llamabuild.sdist("0.3.36", tmp_path, path=wrong)
    with pytest.raises(llamabuild.BuildError, match="has no llama_cpp_python-0.3.36.tar.gz"):
        llamabuild.sdist("0.3.36", tmp_path, find_links=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "tunectl_jobs.llamacpp", "fetch", "--dest", str(tmp_path / "t"), "--sdist", str(wrong)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "is not the pinned sdist" in proc.stderr


def test_the_build_key_follows_the_configuration(tmp_path, monkeypatch):
    """A cached wheel is reused only for the same version, CMake arguments and variant list (pip's own wheel
    cache, keyed by the sdist alone, would hand back a wheel of another configuration)."""
    key = llamabuild.config_key("0.3.36")
    assert key.startswith("0.3.36-") and key == llamabuild.config_key("0.3.36")
    assert llamabuild.config_key("0.3.37") != key
    monkeypatch.setattr(llamabuild, "CMAKE_ARGS", (*llamabuild.CMAKE_ARGS[1:], "-DGGML_NATIVE=ON"))
    assert llamabuild.config_key("0.3.36") != key
    monkeypatch.undo()
    variants = tmp_path / "variants.cmake"
    variants.write_text(llamabuild.CMAKE_INCLUDE.read_text().replace('"sapphirerapids;', '"'))
    monkeypatch.setattr(llamabuild, "CMAKE_INCLUDE", variants)
    assert llamabuild.config_key("0.3.36") != key
