"""Use OpenBLAS for MLX's float32 matmuls on Linux.

The Linux CPU build of MLX links a reference BLAS (~5 GFLOP/s on the dev box);
OpenBLAS runs the same matmuls ~35x faster. Loading OpenBLAS with RTLD_GLOBAL
*before* ``mlx.core`` is imported makes the dynamic linker resolve MLX's BLAS
symbols to it, which is what ``LD_PRELOAD`` would do, without a re-exec. So
``echo_mlx`` must be imported before ``mlx`` for the fast path; ``status()``
says whether it took effect.
"""

import ctypes
import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install libopenblas0-pthread"

_state = {"library": None, "effective": False, "reason": "not attempted"}


def find_openblas():
    override = os.environ.get("ECHO_MLX_OPENBLAS")
    for path in ([override] if override else []) + list(CANDIDATES):
        if path and Path(path).exists():
            return path
    return None


def preload() -> None:
    """Load OpenBLAS globally if we are on Linux and MLX is not loaded yet."""
    if not sys.platform.startswith("linux"):
        _state.update(reason="not Linux: MLX uses Accelerate/Metal")
        return
    if os.environ.get("ECHO_MLX_OPENBLAS") == "0":
        _state.update(reason="disabled by ECHO_MLX_OPENBLAS=0")
        return
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "openblas" in p]
    if preloaded:
        _state.update(library=preloaded[0], effective=True, reason="LD_PRELOAD")
        return
    path = find_openblas()
    if path is None:
        _state.update(reason=f"OpenBLAS not found: {INSTALL_HINT}")
        return
    if "mlx.core" in sys.modules:
        _state.update(library=path, reason="mlx was imported before echo_mlx")
        return
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _state.update(library=path, effective=True, reason="loaded before mlx")


def status() -> str:
    """One line for `echo-mlx info`."""
    if not sys.platform.startswith("linux"):
        return "platform BLAS (" + _state["reason"] + ")"
    if _state["effective"]:
        return f"OpenBLAS {_state['library']} ({_state['reason']})"
    return f"reference BLAS, slow float32 matmul ({_state['reason']})"
