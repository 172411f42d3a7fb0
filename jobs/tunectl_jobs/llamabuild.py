"""Build llama-cpp-python from its pinned sdist into a wheel that runs on any x86-64 CPU, and prove it runs here.

One build for every place tunectl uses llama.cpp (the Makefile's venv, the gguf image): no -march=native. The
CPU backend is built once per x86-64 level and chosen at load time, as llama.cpp's own release builds do
(GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS); llamacpp_cpu_variants.cmake installs those modules beside libggml and
leaves out the AMX variant (it crashes at the pinned version: docs/llama-cpp-builds.md).

The build ends with its proof: the wheel is installed into a scratch directory and, in child processes, a small
GGUF is quantized to q8_0 and q4_k_m and each answers a prompt of a few dozen tokens. A wheel that cannot is a
failed build. Wheels are kept in DEST/<version>-<config hash>/, so an unchanged build is not repeated.

    python jobs/tunectl_jobs/llamabuild.py --version 0.3.36 --dest DIR [--sdist FILE | --find-links DIR]
        [--check-gguf FILE]          # prints the wheel's path last

Standalone on purpose (no tunectl imports): the gguf image runs it before tunectl is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CMAKE_INCLUDE = HERE / "llamacpp_cpu_variants.cmake"
# GGML_NATIVE=OFF: nothing tuned to the build machine. The CPU variants (ggml installs loadable backends to the
# bin dir) and llama.cpp's own libraries go into the package's lib dir, where llama-cpp-python installs its copies:
# nothing lands in site-packages' top-level bin/ and lib/. No multimodal library: tunectl never loads it.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib",
    "-DCMAKE_INSTALL_LIBDIR=llama_cpp/lib",
    "-DLLAVA_BUILD=OFF",
)
PACKAGE = "llama-cpp-python"


class BuildError(Exception):
    pass


def sdist(version: str, work: Path, *, path: Path | None = None, find_links: Path | None = None) -> Path:
    """The pinned sdist: a given file, one found in a local wheelhouse, or downloaded from the package index."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if path is not None:
        if not path.is_file():
            raise BuildError(f"{path}: no such sdist")
        if path.name != name:
            raise BuildError(f"{path} is not the pinned sdist {name}")
        return path
    if find_links is not None:
        # Taken as it is: pip would prepare its metadata first, which needs the build backend from an index.
        if not (find_links / name).is_file():
            raise BuildError(f"{find_links} has no {name}")
        return find_links / name
    # --no-binary for this package only: its build dependencies, which pip prepares the metadata with, may be wheels.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, "-q", "-d", str(work)]
    proc = subprocess.run([*cmd, f"{PACKAGE}=={version}"], capture_output=True, text=True)
    found = work / name
    if proc.returncode != 0 or not found.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"could not download {name} ({last}); pass --sdist FILE or --find-links DIR offline")
    return found


def config_key(version: str) -> str:
    h = hashlib.sha256(version.encode())
    for arg in CMAKE_ARGS:
        h.update(arg.encode())
    h.update(CMAKE_INCLUDE.read_bytes())
    return f"{version}-{h.hexdigest()[:12]}"


def build_wheel(src: Path, out: Path) -> Path:
    args = [*CMAKE_ARGS, f"-DCMAKE_PROJECT_llama_cpp_INCLUDE={CMAKE_INCLUDE}"]
    env = {**os.environ, "CMAKE_ARGS": " ".join(args), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    # --no-cache-dir: pip's wheel cache is keyed by the sdist alone, not by CMAKE_ARGS, so a cached wheel of
    # another configuration (a native one) would be taken instead of this build.
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(out), str(src)]
    print(f"llamabuild: building {src.name} with {' '.join(CMAKE_ARGS)}", file=sys.stderr, flush=True)
    if subprocess.run(cmd, env=env, stdout=sys.stderr).returncode != 0:
        raise BuildError(f"pip wheel {src.name} failed (output above)")
    wheels = list(out.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"pip wheel left {len(wheels)} wheels in {out}")
    return wheels[0]


def prove(wheel: Path, gguf: Path) -> None:
    """Install the wheel into a scratch dir and run llamarun's check there; raise with its words if it fails."""
    with tempfile.TemporaryDirectory(prefix="llamabuild-check-") as tmp:
        site = Path(tmp) / "site"
        # With its dependencies (numpy, jinja2, diskcache): `import llama_cpp` needs them.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site), str(wheel)],
            check=True,
        )
        variants = sorted(p.name for p in (site / "llama_cpp" / "lib").glob("libggml-cpu-*.so"))
        if not variants:
            raise BuildError(f"{wheel.name} ships no ggml CPU variant libraries (libggml-cpu-*.so)")
        print(f"llamabuild: CPU variants in the wheel: {', '.join(v[12:-3] for v in variants)}", file=sys.stderr)
        env = {**os.environ, "PYTHONPATH": str(site)}
        cmd = [sys.executable, str(HERE / "llamarun.py"), "check", "--gguf", str(gguf), "--work", str(Path(tmp) / "w")]
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            said = [ln for ln in lines if ln.startswith("llama.cpp check:")]
            raise BuildError(" / ".join(said) or f"the check failed: {(lines or ['no output'])[-1]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llamabuild.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", required=True, help=f"the pinned {PACKAGE} version")
    p.add_argument("--dest", type=Path, help="wheel cache directory")
    p.add_argument("--print-key", action="store_true", help="print the cache key of this build and exit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sdist", type=Path, help="build from this sdist file (offline)")
    src.add_argument("--find-links", type=Path, help="take the sdist from this local directory (offline)")
    p.add_argument("--check-gguf", type=Path, help="small GGUF for the proof (skipped without one: say why)")
    args = p.parse_args(argv)
    if args.print_key:
        print(config_key(args.version))
        return 0
    if args.dest is None:
        p.error("--dest is required")
    try:
        if args.check_gguf is not None and not args.check_gguf.is_file():
            raise BuildError(f"--check-gguf {args.check_gguf}: no such file")
        # The sdist is kept beside the wheels: `python -m tunectl_jobs.llamacpp fetch --find-links DEST/sdist`
        # takes the converter from the very same file, with no second download.
        kept = args.dest / "sdist" / f"llama_cpp_python-{args.version}.tar.gz"
        if not kept.is_file():
            with tempfile.TemporaryDirectory(prefix="llamabuild-") as tmp:
                got = sdist(args.version, Path(tmp), path=args.sdist, find_links=args.find_links)
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(got, kept.with_suffix(".part"))
                os.replace(kept.with_suffix(".part"), kept)
        target = args.dest / config_key(args.version)
        wheel = next(target.glob("llama_cpp_python-*.whl"), None) if target.is_dir() else None
        if wheel is None:
            with tempfile.TemporaryDirectory(prefix="llamabuild-") as tmp:
                built = build_wheel(kept, Path(tmp) / "wheel")
                target.mkdir(parents=True, exist_ok=True)
                wheel = target / built.name
                shutil.move(str(built), wheel.with_suffix(".part"))
                os.replace(wheel.with_suffix(".part"), wheel)  # whole or absent: a killed build leaves no wheel
        else:
            print(f"llamabuild: {wheel} already built", file=sys.stderr)
        if args.check_gguf is not None:
            prove(wheel, args.check_gguf)
        else:
            print("llamabuild: no --check-gguf given: the wheel was not proven on this machine", file=sys.stderr)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"llamabuild: {e}", file=sys.stderr)
        return 1
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
