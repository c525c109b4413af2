"""Compiling kernels with clang, cached by content outside the source tree.

Modes:
  fast  -O2 shared library loaded with ctypes (optionally counting loads);
  asan  executable with AddressSanitizer + UndefinedBehaviorSanitizer;
  tsan  executable with ThreadSanitizer (GPU threads registered as fibers).
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import ClangMissing, CompileError

SHIM = Path(__file__).parent / "shim"
MODES = ("fast", "asan", "tsan")
CLANG_CANDIDATES = ("clang++-19", "clang++-20", "clang++-21", "clang++-18", "clang++-17", "clang++")
INSTALL_HINT = "install it with: apt-get install -y clang-19 libclang-rt-19-dev (or set MSLSIM_CLANG)"

COMMON_FLAGS = [
    "-std=c++20",
    # Round every half/bfloat operation to its type, as the GPU does.
    "-Xclang", "-ffloat16-excess-precision=none",
    "-Xclang", "-fbfloat16-excess-precision=none",
    "-Wno-unknown-attributes",
    "-Wno-ignored-attributes",
    "-I", str(SHIM),
    "-I", str(SHIM / "include"),
]
MODE_FLAGS = {
    "fast": ["-O2", "-fPIC"],
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", "-DMSL_ASAN"],
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-DMSL_TSAN"],
}
# The runtime under TSan stays uninstrumented: its bookkeeping is not GPU memory.
RUNTIME_FLAGS = {
    "fast": ["-O2", "-fPIC"],
    "asan": MODE_FLAGS["asan"],
    "tsan": ["-O2", "-g", "-DMSL_TSAN"],
}
LINK_FLAGS = {"fast": [], "asan": ["-fsanitize=address,undefined"], "tsan": ["-fsanitize=thread"]}
# Every load in the kernel calls __sanitizer_cov_loadN: exact bytes per buffer.
COUNT_FLAGS = ["-fsanitize-coverage=func,trace-loads"]


@lru_cache(maxsize=None)
def find_clang():
    """Path of a clang++ >= 17, or None."""
    names = [os.environ["MSLSIM_CLANG"]] if os.environ.get("MSLSIM_CLANG") else CLANG_CANDIDATES
    for name in names:
        path = shutil.which(name)
        if not path:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"clang version (\d+)", out)
        if m and int(m.group(1)) >= 17:
            return path
    return None


@lru_cache(maxsize=None)
def builtins_library() -> list:
    """compiler-rt's builtins archive, linked into every kernel: libgcc before
    GCC 13 lacks the float <-> bfloat conversions (__truncsfbf2) clang emits."""
    out = subprocess.run([clang(), "-rtlib=compiler-rt", "-print-libgcc-file-name"],
                         capture_output=True, text=True).stdout.strip()
    return [out] if out and Path(out).is_file() else []


def clang_available() -> bool:
    return find_clang() is not None


def clang() -> str:
    path = find_clang()
    if path is None:
        raise ClangMissing(f"mslsim needs clang >= 17 to compile kernels; {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    if os.environ.get("MSLSIM_CACHE"):
        root = Path(os.environ["MSLSIM_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "echo-mlx" / "mslsim"
    root.mkdir(parents=True, exist_ok=True)
    return root


@lru_cache(maxsize=None)
def shim_digest() -> str:
    h = hashlib.sha256(clang().encode())
    for path in sorted(SHIM.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"clang failed on {what}:\n{proc.stderr[-6000:]}")


def _cached(name: str, make) -> Path:
    """Build `name` in the cache once; concurrent builders race harmlessly."""
    path = cache_dir() / name
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        try:
            make(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def runtime_object(mode: str, source: str = "msl_rt.cpp") -> Path:
    flags = COMMON_FLAGS + RUNTIME_FLAGS[mode]
    key = hashlib.sha256((shim_digest() + source + " ".join(flags)).encode()).hexdigest()[:20]
    stem = Path(source).stem
    return _cached(
        f"{stem}-{mode}-{key}.o",
        lambda out: _run([clang(), *flags, "-c", str(SHIM / source), "-o", out], f"{source} ({mode})"),
    )


def build_kernel(cpp: str, mode: str, count_loads: bool = False, label: str = "kernel") -> Path:
    """A shared library (fast) or an executable (asan, tsan) running `cpp`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    count_loads = count_loads and mode == "fast"
    flags = COMMON_FLAGS + MODE_FLAGS[mode] + (COUNT_FLAGS if count_loads else [])
    key = hashlib.sha256((shim_digest() + cpp + " ".join(flags + builtins_library())).encode()).hexdigest()[:24]
    objects = [runtime_object(mode)]
    if mode != "fast":
        objects.append(runtime_object(mode, "msl_main.cpp"))

    def make(out):
        src = Path(out).with_suffix(".cpp")
        src.write_text(cpp)
        try:
            shape = ["-shared"] if mode == "fast" else []
            _run(
                [clang(), *flags, *shape, "-x", "c++", str(src), "-x", "none", *map(str, objects),
                 *LINK_FLAGS[mode], *builtins_library(), "-lpthread", "-o", out],
                label,
            )
        finally:
            src.unlink()

    return _cached(f"{label[:60]}-{mode}{'-count' if count_loads else ''}-{key}{'.so' if mode == 'fast' else ''}", make)
