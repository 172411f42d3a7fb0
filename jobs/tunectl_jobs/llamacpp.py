"""llama.cpp at one pinned version: the converter and gguf-py from the `llama-cpp-python` sdist, the quantizer
and inference from the installed `llama-cpp-python` package built from that same sdist.

The gguf image unpacks the sdist at build time (`python -m tunectl_jobs.llamacpp fetch`), so nothing is
downloaded at run time; on a workstation the same command fills the cache once. Offline (an air-gapped image
build), it takes the sdist from a file or a local wheelhouse instead of the package index.

    python -m tunectl_jobs.llamacpp fetch [--dest DIR] [--sdist FILE | --find-links DIR]
    python -m tunectl_jobs.llamacpp where                # print where it is
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from tunectl.errors import ConfigError

from .llamabuild import BuildError, sdist
from .models import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_KEEP = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE", "requirements")


def _installed_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"llama-cpp-python is not installed: pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'"
        ) from None


def tree_dir() -> Path:
    env = os.environ.get("TUNECTL_LLAMA_CPP_DIR")
    return Path(env) if env else cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def converter() -> Path:
    """The pinned `convert_hf_to_gguf.py`, checked against the installed quantizer's version."""
    installed = _installed_version()
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise ConfigError(
            f"llama-cpp-python {installed} is installed but tunectl pins {LLAMA_CPP_PYTHON_VERSION}: "
            f"pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'"
        )
    script = tree_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConfigError(f"llama.cpp converter not found in {tree_dir()}: run `python -m tunectl_jobs.llamacpp fetch`")
    return script


def fetch(dest: Path | None = None, *, sdist_file: Path | None = None, find_links: Path | None = None) -> Path:
    """Keep the converter part of the pinned sdist's llama.cpp tree: from the package index, or offline from
    `sdist_file` or a `find_links` directory."""
    dest = dest or tree_dir()
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        try:
            src = sdist(LLAMA_CPP_PYTHON_VERSION, Path(tmp), path=sdist_file, find_links=find_links)
        except BuildError as e:
            raise ConfigError(str(e)) from None
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        staging = Path(tmp) / "tree"
        with tarfile.open(src) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].split("/")[0] in _KEEP
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            # Python < 3.11.4 (Debian bookworm's 3.11.2) has no extraction filters: keep plain files and dirs only.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            members = [m for m in members if (m.isfile() or m.isdir()) and ".." not in m.name.split("/")]
            tar.extractall(staging, members=members, **safe)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(staging), dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunectl_jobs.llamacpp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="unpack the pinned llama.cpp converter")
    f.add_argument("--dest", type=Path)
    offline = f.add_mutually_exclusive_group()
    offline.add_argument("--sdist", type=Path, help="the pinned llama-cpp-python sdist file (offline)")
    offline.add_argument("--find-links", type=Path, help="a directory holding that sdist (offline)")
    sub.add_parser("where", help="print the converter's directory")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        try:
            print(fetch(args.dest, sdist_file=args.sdist, find_links=args.find_links))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        print(tree_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
