"""Wheels for the GPU test machine: the training packages it lacks, at tunectl's pins, installable offline.

The GPU test machine (docs/gpu.md) runs Python 3.12 on x86-64 with torch 2.11 (CUDA 13.0), transformers, peft and
accelerate installed, but has no Unsloth, TRL, datasets or bitsandbytes, reaches no package registry, and takes at
most 64 MiB of files per call. This script runs here, where PyPI answers, and writes a directory of wheels for it:

    ~/.cache/tunectl/venv/bin/python benchmarks/gpu_bundle.py build            # -> .gpu/wheels/ (git ignores .gpu/)

and there, from the repository root, with `.gpu` carried:

    python3 -m pip install -q --no-index --no-deps --find-links .gpu/wheels --target /tmp/site \\
        -r .gpu/wheels/requirements.txt
    export PYTHONPATH=/tmp/site:$PWD/controller:$PWD/jobs
    python3 benchmarks/gpu_bundle.py check .gpu/wheels       # every pin and requirement met, or exit 1

What goes in: the closure of the stage programs' requirements (pyproject.toml's `train` extra, pydantic and PyYAML,
which the stages import) plus unsloth and bitsandbytes, minus what the machine has. Versions, first found wins:
`--pin NAME==VERSION`; versions.env; constraints.txt (the lock); pyproject.toml's `==` pins; the images' ARG
defaults (UNSLOTH_VERSION, BITSANDBYTES_VERSION); else the newest release that meets every requirement on it (listed
as `unpinned` in bundle.json). A package the machine has is taken from it (and checked there), unless a pin of
pyproject.toml or versions.env names another version than the machine's or a requirement rules out the version known
to be there (HOST_VERSIONS); torch, its CUDA libraries, triton and torchvision are always the machine's, and
xformers is left out (the machine has none; Unsloth trains without it). Requirements that contradict a pin stop the
build (`--allow-conflicts` builds anyway and records them). bitsandbytes keeps only its CPU and CUDA 13.0 libraries
and unsloth leaves out `studio/` (its web UI, which `import unsloth` never loads), so the wheels fit in a call.

`build` needs `packaging` and pip (the project's venv has both) and Python 3.11+; `check` only the standard
library and `packaging` (the GPU machine has it).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".gpu" / "wheels"
DOWNLOADS = Path.home() / ".cache" / "tunectl" / "gpu-bundle-downloads"

# The GPU test machine, as read there (package names 2026-11-17; versions from its `pip list` on an H200 on
# 2026-12-06, peft's from the GPU results in docs/results/). Names are PEP 503-normalised. A version listed here
# that a requirement rules out (certifi and fsspec, today) makes the bundle carry that package.
TARGET_PYTHON = "3.12"
TARGET_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "platform_release": "",
    "platform_version": "",
}
TARGET_CUDA = "130"  # torch 2.11.0+cu130: bitsandbytes loads libbitsandbytes_cuda130.so
# glibc there is at least 2.28; a wheel for a newer glibc is not taken.
TARGET_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
HOST_VERSIONS = {
    "accelerate": "1.15.0",
    "certifi": "2026.7.22",
    "einops": "0.8.2",
    "fsspec": "2026.7.0",
    "httpx": "0.28.1",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "packaging": "26.3",
    "peft": "0.21.0",
    "protobuf": "7.36.2",
    "pyarrow": "25.0.1",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
    "typer": "0.27.2",
    "zipp": "4.1.0",
}
HOST_PACKAGES = set(HOST_VERSIONS) | set(
    """absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
    joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
    nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
    opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu scikit-build-core scikit-image scikit-learn scipy seaborn
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm toolz torchaudio
    torchdiffeq torch-geometric torchmetrics tqdm treescope typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# Never carried, whatever the pins say: the machine's own builds for its GPU (and far over the size limit).
MACHINE_ONLY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# Required by unsloth on Linux but not installed there; Unsloth runs without it (the GPU results had none).
LEFT_OUT = {"xformers": "not on the GPU machine; Unsloth uses PyTorch's attention without it"}
# The packages the stage programs need besides the `train` extra (tunectl's own dependencies they import).
STAGE_DEPENDENCIES = ("pydantic", "pyyaml")
GPU_ONLY = ("unsloth", "bitsandbytes")
# Parts of wheels the training never loads, left out to fit the 64 MiB a call carries.
TRIMS = {
    "bitsandbytes": (
        rf"bitsandbytes/libbitsandbytes_(?!cpu\.so$|cuda{TARGET_CUDA}\.so$)[^/]*\.so$",
        f"libraries for other CUDA, ROCm and XPU versions than CUDA {TARGET_CUDA[:2]}.{TARGET_CUDA[2:]}",
    ),
    "unsloth": (r"studio/", "studio/, the web UI (`import unsloth` never loads it)"),
}
# What a call to the GPU machine carries, working tree included; the bundle is refused above this.
DEFAULT_LIMIT_MIB = 56


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class BundleError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------- the pins


def read_pins(overrides: list[str]) -> tuple[dict[str, tuple[str, str]], list[str], list[str]]:
    """{name: (version, source)} with the first source that names a package winning; the sources read; notes
    where two sources disagree. Primary pins (--pin, versions.env, pyproject's ==) are marked by their source."""
    import tomllib

    layers: list[tuple[str, dict[str, str]]] = []
    layers.append(("--pin", dict(_split_pin(p) for p in overrides)))
    env = REPO / "versions.env"
    if env.is_file():
        pins = {}
        for line in env.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#") and key.endswith("_VERSION"):
                pins[norm(key.removesuffix("_VERSION").replace("_", "-"))] = value.strip()
        layers.append(("versions.env", pins))
    lock = REPO / "constraints.txt"
    if lock.is_file():
        pins = {}
        for line in lock.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = _split_pin(line)
                pins[name] = version
        layers.append(("constraints.txt", pins))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;,]+)", req)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    layers.append(("pyproject.toml", pins))
    pins = {}
    for dockerfile in ("images/train/Dockerfile", "images/export/Dockerfile"):
        path = REPO / dockerfile
        if path.is_file():
            for arg, value in re.findall(r"^ARG (UNSLOTH|BITSANDBYTES)_VERSION=(\S+)$", path.read_text(), re.M):
                pins.setdefault(norm(arg), value)
    layers.append(("images/*/Dockerfile", pins))

    out: dict[str, tuple[str, str]] = {}
    notes = []
    for source, pins in layers:
        for name, version in pins.items():
            if name not in out:
                out[name] = (version, source)
            elif out[name][0] != version:
                notes.append(
                    f"{name}: {out[name][1]} says {out[name][0]}, {source} says {version}; using {out[name][0]}"
                )
    return out, [source for source, pins in layers if pins or source == "pyproject.toml"], notes


def _split_pin(text: str) -> tuple[str, str]:
    name, sep, version = text.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise BundleError(f"{text!r} is not NAME==VERSION")
    return norm(name.strip()), version.strip()


def primary(source: str) -> bool:
    """A pin the project chose (not a version the lock merely recorded)."""
    return source in ("--pin", "versions.env", "pyproject.toml", "images/*/Dockerfile")


def roots() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [
        r for r in project["dependencies"] if norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) in STAGE_DEPENDENCIES
    ]
    return [*project["optional-dependencies"]["train"], *deps, *GPU_ONLY]


# ------------------------------------------------------------------------------------------------ the download


def pip_download(requirements: list[str], dest: Path) -> list[Path]:
    """Wheels for the GPU machine (no dependencies), newest that meets each requirement; the files pip wrote."""
    dest.mkdir(parents=True, exist_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.whl")}
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version"]
    cmd += [TARGET_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for platform in TARGET_PLATFORMS:
        cmd += ["--platform", platform]
    proc = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-3:]
        raise BundleError(f"pip download {' '.join(requirements)}: {' / '.join(lines)}")
    # pip names each file it saved or found already there ("File was already downloaded ...") only without -q;
    # match the requirements to wheels by name instead.
    wheels = {}
    for path in dest.glob("*.whl"):
        name, version = wheel_name_version(path.name)
        wheels.setdefault(name, []).append((version, path))
    found = []
    from packaging.requirements import Requirement
    from packaging.version import Version

    for text in requirements:
        req = Requirement(text)
        candidates = [
            (Version(v), p) for v, p in wheels.get(norm(req.name), []) if req.specifier.contains(v, prereleases=True)
        ]
        fresh = [c for c in candidates if before.get(c[1].name) != c[1].stat().st_mtime_ns]
        if not candidates:
            raise BundleError(f"pip download {text}: no wheel of it in {dest}")
        found.append(max(fresh or candidates)[1])
    return found


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[: -len(".whl")].split("-")
    return norm(parts[0]), parts[1]


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's METADATA."""
    from email.parser import HeaderParser

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = HeaderParser().parsestr(z.read(meta).decode("utf-8"))
    return norm(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def trim(src: Path, dest: Path, pattern: str) -> list[str]:
    """Copy a wheel leaving out the members matching `pattern` (and their RECORD lines); the names left out."""
    drop = re.compile(pattern)
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if drop.match(info.filename):
                dropped.append(info.filename)
                continue
            data = zin.read(info)
            if re.fullmatch(r"[^/]+\.dist-info/RECORD", info.filename):
                rows = [row for row in csv.reader(io.StringIO(data.decode("utf-8"))) if row and not drop.match(row[0])]
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(rows)
                data = buf.getvalue().encode("utf-8")
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data)
    return dropped


# -------------------------------------------------------------------------------------------------- resolving


def resolve(pins: dict[str, tuple[str, str]], downloads: Path) -> dict:
    """The closure of roots() for the GPU machine: which packages to carry (downloaded), which the machine
    provides, which are left out, and requirements that contradict a pin."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    wanted: dict[str, list[tuple[str, str]]] = {}  # name -> [(requirement, required by)]
    extras_of: dict[str, set[str]] = {}
    carried: dict[str, dict] = {}
    from_host: dict[str, list[str]] = {}
    left_out: dict[str, str] = {}
    todo: list[tuple[Requirement, str]] = [(Requirement(r), "tunectl") for r in roots()]

    def active(req: Requirement, extra: str) -> bool:
        return req.marker is None or Marker(str(req.marker)).evaluate({**TARGET_MARKERS, "extra": extra})

    while todo:
        batch: dict[str, str] = {}  # name -> requirement string to download
        for req, parent in todo:
            name = norm(req.name)
            wanted.setdefault(name, []).append((str(req), parent))
            extras_of.setdefault(name, set()).update(norm(e) for e in req.extras)
            if name in LEFT_OUT:
                left_out[name] = LEFT_OUT[name]
                continue
            pin = pins.get(name)
            spec = SpecifierSet()
            for text, _ in wanted[name]:
                spec &= Requirement(text).specifier
            # The machine's package serves unless the project pins another version of it or a requirement rules
            # out the version known to be there.
            host = HOST_VERSIONS.get(name)
            takes_host = (
                name in HOST_PACKAGES
                and not (pin and primary(pin[1]) and pin[0] != host)
                and (host is None or spec.contains(host, prereleases=True))
            )
            if MACHINE_ONLY.match(name) or takes_host:
                from_host.setdefault(name, []).append(f"{req} (from {parent})")
                continue
            want = f"{name}=={pin[0]}" if pin else f"{name}{spec}"
            have = carried.get(name)
            if have and (pin or spec.contains(have["version"], prereleases=True)):
                continue
            batch[name] = want
        todo = []
        if not batch:
            break
        print(f"gpu_bundle: downloading {', '.join(sorted(batch.values()))}", file=sys.stderr)
        for path in pip_download(list(batch.values()), downloads):
            name, version, requires = wheel_metadata(path)
            pin = pins.get(name)
            carried[name] = {
                "version": version,
                "wheel": path,
                "version_from": pin[1] if pin else "unpinned (newest that meets the requirements)",
                "requires": requires,
            }
        # Each carried package's own requirements (with the extras asked of it), once per (package, version).
        for name in batch:
            info = carried[name]
            for extra in ["", *sorted(extras_of.get(name, ()))]:
                for line in info["requires"]:
                    req = Requirement(line)
                    if active(req, extra):
                        todo.append((req, f"{name} {info['version']}"))

    conflicts = []
    for name, reqs in sorted(wanted.items()):
        version = carried[name]["version"] if name in carried else None
        if version is None:
            continue
        for text, parent in reqs:
            if not Requirement(text).specifier.contains(version, prereleases=True):
                conflicts.append(f"{parent} requires {text}, but the bundle carries {name} {version}")
    from_host = {name: reqs for name, reqs in from_host.items() if name not in carried}
    return {"carried": carried, "from_host": from_host, "left_out": left_out, "conflicts": conflicts}


# ------------------------------------------------------------------------------------------------------ build


def build(args: argparse.Namespace) -> int:
    pins, sources, notes = read_pins(args.pin)
    for note in notes:
        print(f"gpu_bundle: pins disagree: {note}", file=sys.stderr)
    plan = resolve(pins, args.downloads)
    if plan["conflicts"] and not args.allow_conflicts:
        raise BundleError(
            "requirements contradict the pins: " + "; ".join(plan["conflicts"]) + " (change the pin, e.g. "
            "--pin NAME==VERSION, or build anyway with --allow-conflicts)"
        )

    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    for old in [*dest.glob("*.whl"), dest / "requirements.txt", dest / "bundle.json"]:
        old.unlink(missing_ok=True)
    packages = {}
    for name, info in sorted(plan["carried"].items()):
        src: Path = info["wheel"]
        out = dest / src.name
        dropped: list[str] = []
        if name in TRIMS:
            dropped = trim(src, out, TRIMS[name][0])
        else:
            shutil.copyfile(src, out)
        packages[name] = {
            "version": info["version"],
            "version_from": info["version_from"],
            "wheel": out.name,
            "bytes": out.stat().st_size,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            **({"left_out": f"{len(dropped)} files: {TRIMS[name][1]}"} if dropped else {}),
        }
    host_pins = {
        name: version
        for name, (version, source) in pins.items()
        if primary(source) and name in plan["from_host"] and name not in plan["carried"]
    }
    total = sum(p["bytes"] for p in packages.values())
    (dest / "requirements.txt").write_text(
        "# The GPU bundle (benchmarks/gpu_bundle.py); install with: pip install --no-index --no-deps "
        "--find-links .gpu/wheels --target DIR -r .gpu/wheels/requirements.txt\n"
        + "".join(f"{name}=={p['version']}\n" for name, p in packages.items())
    )
    doc = {
        "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "for": {"python": TARGET_MARKERS["python_full_version"], "platforms": TARGET_PLATFORMS, "cuda": TARGET_CUDA},
        "pins_read_from": sources,
        "pin_notes": notes,
        "carried": packages,
        "bytes": total,
        # Checked there: the machine's version of each of these must equal the project's pin.
        "host_pins": host_pins,
        "from_host": dict(sorted(plan["from_host"].items())),
        "left_out": plan["left_out"],
        "conflicts_allowed": plan["conflicts"],
    }
    (dest / "bundle.json").write_text(json.dumps(doc, indent=1) + "\n")

    width, vwidth = max(len(n) for n in packages), max(len(p["version"]) for p in packages.values())
    for name, p in packages.items():
        trimmed = " (trimmed)" if "left_out" in p else ""
        print(f"{name:<{width}}  {p['version']:<{vwidth}} {p['bytes'] / 2**20:5.1f} MiB  {p['version_from']}{trimmed}")
    print(
        f"{len(packages)} wheels, {total / 2**20:.1f} MiB in {dest}; from the machine: {', '.join(host_pins)} "
        f"at the pins and {len(plan['from_host']) - len(host_pins)} more; left out: {', '.join(plan['left_out'])}"
    )
    for line in plan["conflicts"]:
        print(f"gpu_bundle: conflict allowed: {line}", file=sys.stderr)
    if total > args.limit_mib * 2**20:
        raise BundleError(f"the wheels are {total / 2**20:.1f} MiB, over --limit-mib {args.limit_mib}")
    return 0


# ------------------------------------------------------------------------------------------------------ check


def check(args: argparse.Namespace) -> int:
    """On the GPU machine, after the install: the bundle's packages are the ones imported, the machine's packages
    are at the project's pins, and every requirement of the carried packages is met."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    doc = json.loads((args.bundle / "bundle.json").read_text())
    problems, lines = [], []

    def installed(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    for name, p in doc["carried"].items():
        version = installed(name)
        if version != p["version"]:
            problems.append(f"{name}: the bundle has {p['version']}, Python imports {version or 'nothing'}")
    for name, pin in doc["host_pins"].items():
        version = installed(name)
        lines.append(f"{name} {version} (this machine's)")
        if version is None or version.split("+")[0] != pin:
            problems.append(f"{name}: the project pins {pin}, this machine has {version or 'none'}")
    env = default_environment()
    allowed = set(doc["conflicts_allowed"])
    for name, p in doc["carried"].items():
        dist = md.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = norm(req.name)
            if dep in doc["left_out"]:
                continue
            version = installed(dep)
            if version is None or not req.specifier.contains(version, prereleases=True):
                text = f"{name} {p['version']} requires {req}, but the bundle carries {dep} {version}"
                if text in allowed:
                    continue
                problems.append(f"{name} {p['version']} requires {req}; installed: {dep} {version or 'none'}")
    for mod in filter(None, args.imports.split(",")):
        try:
            __import__(mod)
            lines.append(f"import {mod}: ok")
        except Exception as e:  # reported with the rest
            problems.append(f"import {mod}: {type(e).__name__}: {e}")
    for line in lines:
        print(f"gpu_bundle check: {line}")
    for line in doc["conflicts_allowed"]:
        print(f"gpu_bundle check: allowed at build time: {line}")
    for line in problems:
        print(f"gpu_bundle check: PROBLEM: {line}")
    print(
        f"gpu_bundle check: {len(doc['carried'])} packages from the bundle, {len(doc['host_pins'])} pinned ones "
        f"from this machine: {'ok' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the wheels here (needs PyPI)")
    b.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"default {DEFAULT_DEST.relative_to(REPO)}")
    b.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION", help="overrides every pin file")
    b.add_argument("--allow-conflicts", action="store_true", help="carry the pins even where a requirement says no")
    b.add_argument("--downloads", type=Path, default=DOWNLOADS, help=f"pip's downloads, kept (default {DOWNLOADS})")
    b.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB, help="refuse a bundle larger than this")
    c = sub.add_parser("check", help="on the GPU machine, after installing: pins and requirements met")
    c.add_argument("bundle", type=Path, nargs="?", default=DEFAULT_DEST)
    c.add_argument("--imports", default="", metavar="MOD,...", help="also import these modules")
    args = ap.parse_args(argv)
    try:
        return build(args) if args.cmd == "build" else check(args)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        print(f"error: {e.name} is missing: run this with ~/.cache/tunectl/venv/bin/python", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
