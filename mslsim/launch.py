"""Buffers in, run, buffers out: the fast (ctypes) and sanitizer (executable) paths.

Fast mode puts every buffer between guard bytes in one shared mapping:
inputs are followed by poison (NaN for 0xFF), outputs by a canary that is
checked afterwards. With isolate=True the launch runs in a forked child, so a
crash becomes an exception and the outputs still come back through the
shared mapping.
"""

import ctypes
import faulthandler
import mmap
import os
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import KernelCrash, KernelFault, SanitizerReport, SimulatorError

GUARD = 256
ALIGN = 64
CANARY = 0xA5
MSG_LEN = 8192
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:exitcode=23:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=24",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
}


class LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_int32 * 3),
        ("threadgroup", ctypes.c_int32 * 3),
        ("schedule", ctypes.c_int32),
        ("poison", ctypes.c_int32),
        ("strict", ctypes.c_int32),
        ("workers", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("nbuffers", ctypes.c_int32),
        ("ncount", ctypes.c_int32),
    ]


@dataclass
class Buffer:
    """One kernel argument as bytes: an input's contents or an output's initial fill."""

    name: str
    data: np.ndarray  # uint8
    is_output: bool
    counted: bool = False  # report the bytes the kernel loads from it


@dataclass
class Options:
    mode: str = "fast"
    schedule: str = "forward"
    seed: int = 0
    poison: int = 0xFF
    strict: bool = False
    isolate: bool = False
    workers: int = 2
    count_loads: bool = False
    timeout: float = 300.0


@dataclass
class Result:
    outputs: List[np.ndarray]  # uint8, one per output buffer
    bytes_loaded: Dict[str, int] = field(default_factory=dict)
    warnings: str = ""


def make_config(grid, threadgroup, opts: Options, nbuffers: int, ncount: int) -> LaunchConfig:
    cfg = LaunchConfig()
    cfg.grid[:] = list(grid)
    cfg.threadgroup[:] = list(threadgroup)
    cfg.schedule = SCHEDULES[opts.schedule]
    cfg.poison = opts.poison
    cfg.strict = int(opts.strict)
    cfg.workers = opts.workers
    cfg.seed = opts.seed
    cfg.nbuffers = nbuffers
    cfg.ncount = ncount
    return cfg


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def run_fast(library: Path, buffers: List[Buffer], grid, threadgroup, opts: Options) -> Result:
    """In-process (or forked) run of a fast-mode shared library."""
    layout, offset = [], 0
    for b in buffers:
        start = offset + GUARD
        layout.append(start)
        offset = _padded(start + len(b.data) + GUARD)
    counted = [i for i, b in enumerate(buffers) if b.counted]
    status_bytes = 8 + 8 * len(counted) + MSG_LEN
    region = mmap.mmap(-1, offset + status_bytes)  # shared with a forked child
    mem = np.frombuffer(region, dtype=np.uint8)
    try:
        for b, start in zip(buffers, layout):
            fill = CANARY if b.is_output else opts.poison
            mem[start - GUARD:start] = fill
            mem[start + len(b.data):start + len(b.data) + GUARD] = fill
            mem[start:start + len(b.data)] = b.data
        base = mem.ctypes.data
        ptrs = (ctypes.c_void_p * len(buffers))(*[base + s for s in layout])
        ranges = (ctypes.c_uint64 * max(1, 2 * len(counted)))()
        for j, i in enumerate(counted):
            ranges[2 * j] = base + layout[i] - GUARD
            ranges[2 * j + 1] = base + layout[i] + len(buffers[i].data) + GUARD
        cfg = make_config(grid, threadgroup, opts, len(buffers), len(counted))
        status = base + offset
        def call():
            _call_library(library, cfg, ptrs, ranges, len(counted), status)

        if opts.isolate:
            _in_child(call, opts.timeout)
        else:
            call()
        rc = int(mem[offset:offset + 8].view(np.int64)[0])
        counts = mem[offset + 8:offset + 8 + 8 * len(counted)].view(np.uint64)
        msg = bytes(mem[offset + 8 + 8 * len(counted):offset + status_bytes]).split(b"\0")[0].decode()
        if rc != 0:
            raise KernelFault(msg)
        for b, start in zip(buffers, layout):
            if b.is_output:
                end = start + len(b.data)
                for lo, hi, where in ((start - GUARD, start, "before"), (end, end + GUARD, "after")):
                    if np.any(mem[lo:hi] != CANARY):
                        raise KernelFault(f"output '{b.name}' was written {where} its end (guard bytes changed)")
        outputs = [mem[s:s + len(b.data)].copy() for b, s in zip(buffers, layout) if b.is_output]
        loaded = {buffers[i].name: int(counts[j]) for j, i in enumerate(counted)}
        return Result(outputs, loaded, msg)
    finally:
        del mem  # the mapping closes when the last view of it goes away


_libraries: Dict[str, ctypes.CDLL] = {}


def _call_library(library: Path, cfg, ptrs, ranges, ncount: int, status: int):
    lib = _libraries.get(str(library))
    if lib is None:
        lib = ctypes.CDLL(str(library))
        lib.msl_launch.restype = ctypes.c_int
        lib.msl_launch.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int]
        _libraries[str(library)] = lib
    counts = status + 8
    msg = counts + 8 * ncount
    rc = lib.msl_launch(ctypes.addressof(cfg), ctypes.addressof(ptrs), ctypes.addressof(ranges), counts, msg, MSG_LEN)
    ctypes.c_int64.from_address(status).value = rc


def _in_child(call, timeout: float):
    pid = os.fork()
    if pid == 0:  # child: never return into the parent's Python state
        faulthandler.disable()  # the crash is reported by the parent, not dumped here
        code = 0
        try:
            call()
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise KernelCrash(f"kernel ran longer than {timeout:.0f} s (infinite loop?)")
        time.sleep(0.0005)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise KernelCrash(f"kernel crashed with {name}")
    if os.WEXITSTATUS(status) != 0:
        raise SimulatorError("the isolated launch failed in the child process")


def run_executable(exe: Path, buffers: List[Buffer], grid, threadgroup, opts: Options) -> Result:
    """Sanitizer modes: exact-size buffers in a child process."""
    cfg = make_config(grid, threadgroup, opts, len(buffers), 0)
    with tempfile.TemporaryDirectory(prefix="mslsim-") as tmp:
        launch_file, out_file = Path(tmp) / "launch", Path(tmp) / "out"
        with open(launch_file, "wb") as f:
            f.write(b"MSLSIM01" + bytes(cfg))
            for b in buffers:
                f.write(struct.pack("<qq", len(b.data), int(b.is_output)))
                f.write(b.data.tobytes())
        env = dict(os.environ, **SANITIZER_ENV)
        try:
            proc = subprocess.run([str(exe), str(launch_file), str(out_file)], capture_output=True,
                                  text=True, env=env, timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            raise KernelCrash(f"kernel ran longer than {opts.timeout:.0f} s (infinite loop?)") from None
        err = proc.stderr
        if proc.returncode == 3:
            raise KernelFault(err.strip().removeprefix("mslsim: "))
        if "Sanitizer" in err or "runtime error:" in err:
            raise SanitizerReport(f"{opts.mode} run reported:\n{_excerpt(err)}")
        if proc.returncode < 0:
            raise KernelCrash(f"kernel crashed with {signal.Signals(-proc.returncode).name}:\n{_excerpt(err)}")
        if proc.returncode != 0:
            raise SimulatorError(f"{opts.mode} run exited with status {proc.returncode}:\n{_excerpt(err)}")
        raw = np.fromfile(out_file, dtype=np.uint8)
    outputs, at = [], 0
    for b in buffers:
        if b.is_output:
            outputs.append(raw[at:at + len(b.data)].copy())
            at += len(b.data)
    return Result(outputs, {}, err)


def _excerpt(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else text[:limit] + "\n..."


def run(artifact: Path, buffers: List[Buffer], grid, threadgroup, opts: Options) -> Result:
    if opts.mode == "fast":
        return run_fast(artifact, buffers, grid, threadgroup, opts)
    return run_executable(artifact, buffers, grid, threadgroup, opts)


def poisoned(nbytes: int, byte: int) -> np.ndarray:
    return np.full(nbytes, byte, dtype=np.uint8)


def filled(nbytes: int, dtype: np.dtype, value: Optional[float]) -> np.ndarray:
    count = nbytes // dtype.itemsize
    return np.full(count, value, dtype=dtype).view(np.uint8)
