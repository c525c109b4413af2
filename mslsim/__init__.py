"""mslsim: run mx.fast.metal_kernel bodies on the CPU (Linux, clang >= 17).

A development tool for echo-mlx's Metal kernels, not part of the wheel.
The kernel text is generated exactly as MLX generates it, compiled as C++
against a small MSL shim, and run with one fiber per GPU thread: barriers
and SIMD operations really synchronise, threadgroup memory and outputs start
poisoned, buffers are guarded, and the thread order can be varied.

    import mslsim
    kernel = mslsim.metal_kernel(name, input_names, output_names, source)
    (out,) = kernel(inputs=[x], grid=..., threadgroup=..., output_shapes=[x.shape],
                    output_dtypes=[x.dtype])          # numpy in, numpy out
    with mslsim.settings(mode="asan"): ...            # or "tsan"; schedule=, poison=
    mslsim.run_schedules(lambda: ...)                 # 3 schedules x 2 poisons, bit-identical
"""

from .build import cache_dir, clang_available
from .errors import (
    ClangMissing,
    CompileError,
    KernelCrash,
    KernelFault,
    SanitizerReport,
    ScheduleDependence,
    SimulatorError,
)
from .kernel import LaunchRecord, MetalKernel, current_options, metal_kernel, run_schedules, settings
from .launch import Options

__all__ = [
    "ClangMissing",
    "CompileError",
    "KernelCrash",
    "KernelFault",
    "LaunchRecord",
    "MetalKernel",
    "Options",
    "SanitizerReport",
    "ScheduleDependence",
    "SimulatorError",
    "cache_dir",
    "clang_available",
    "current_options",
    "metal_kernel",
    "run_schedules",
    "settings",
]
