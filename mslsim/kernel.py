"""`mslsim.metal_kernel`: mx.fast.metal_kernel's signature, run on the CPU.

    kernel = mslsim.metal_kernel(name, input_names, output_names, source)
    outputs = kernel(inputs=[...], template=[...], grid=..., threadgroup=...,
                     output_shapes=[...], output_dtypes=[...])   # numpy arrays

How a launch runs (mode, schedule, poison...) comes from `settings()`, so code
written against mx.fast.metal_kernel runs unchanged; keyword arguments of the
same names override it for one call.
"""

import contextlib
import contextvars
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from . import build, launch
from .errors import ScheduleDependence
from .generate import InputInfo, buffer_layout, dtype_name, generate, to_cpp, type_string, verbose_text
from .launch import Buffer, Options

MAX_THREADS_PER_THREADGROUP = 1024


@dataclass
class LaunchRecord:
    """What one kernel launch did; collected by `settings()` sessions."""

    name: str
    kernel_name: str
    grid: tuple
    threadgroup: tuple
    options: Options
    bytes_loaded: Dict[str, int]
    warnings: str


@dataclass
class Session:
    options: Options
    launches: List[LaunchRecord] = field(default_factory=list)


_sessions: contextvars.ContextVar = contextvars.ContextVar("mslsim_sessions", default=())


@contextlib.contextmanager
def settings(**overrides):
    """Run the launches inside with these Options; yields a Session whose
    `launches` lists each launch (with bytes loaded when count_loads=True)."""
    base = current_options()
    session = Session(dataclasses.replace(base, **overrides))
    token = _sessions.set(_sessions.get() + (session,))
    try:
        yield session
    finally:
        _sessions.reset(token)


def current_options() -> Options:
    stack = _sessions.get()
    return stack[-1].options if stack else Options()


def _to_numpy(x):
    """(array, MLX type string) for numpy/mx arrays and Python scalars, as MLX converts them."""
    if isinstance(x, (bool, np.bool_)):
        a = np.array(bool(x))
    elif isinstance(x, int):
        a = np.array(x, dtype=np.int32)
    elif isinstance(x, float):
        a = np.array(x, dtype=np.float32)
    elif isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
    elif type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        if x.dtype == mx.bfloat16:
            return np.array(x.view(mx.uint16)), "bfloat16_t"
        a = np.array(x)
    else:
        raise TypeError(f"[metal_kernel] unsupported input type {type(x).__name__}")
    return a, type_string(a.dtype)


def _numpy_dtype(dtype) -> np.dtype:
    name = dtype_name(dtype)
    if name == "bfloat16":
        return np.dtype(np.uint16)  # stored as bits; converted on the way out
    return np.dtype("bool" if name == "bool_" else name)


def _input_bytes(a: np.ndarray, row_contiguous: bool):
    """Bytes handed to the kernel and the strides (in elements) it sees."""
    if not row_contiguous and a.ndim > 0 and a.size > 0:
        itemsize = a.itemsize
        if all(s >= 0 and s % itemsize == 0 for s in a.strides):
            strides = [s // itemsize for s in a.strides]
            extent = 1 + sum((n - 1) * s for n, s in zip(a.shape, strides))
            flat = np.lib.stride_tricks.as_strided(a, shape=(extent,), strides=(itemsize,))
            return np.ascontiguousarray(flat).view(np.uint8).reshape(-1), strides
    a = np.ascontiguousarray(a)
    strides = [s // a.itemsize for s in a.strides] if a.ndim else []
    return a.view(np.uint8).reshape(-1), strides


class MetalKernel:
    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs

    def generate(self, inputs, output_dtypes, template=None):
        """MLX's source text (and call layout) for these inputs."""
        infos = []
        for name, x in zip(self.input_names, inputs):
            a, tstring = _to_numpy(x)
            infos.append(InputInfo(name, tstring, a.ndim, int(a.size)))
        out_types = [type_string(d) for d in output_dtypes]
        return generate(self.name, self.output_names, self.source, self.header, infos, out_types,
                        template, self.atomic_outputs)

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value: Optional[float] = None, verbose=False, stream=None, **options):
        expected = (("inputs", inputs, self.input_names), ("output_shapes", output_shapes, self.output_names),
                    ("output_dtypes", output_dtypes, self.output_names))
        for what, got, want in expected:
            if len(got) != len(want):
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {len(want)} but got size {len(got)}.")
        opts = dataclasses.replace(current_options(), **options)
        arrays = [_to_numpy(x) for x in inputs]
        gen = self.generate(inputs, output_dtypes, template)
        if verbose:
            sys.stdout.write(verbose_text(self.name, gen.text))
            sys.stdout.flush()

        group = tuple(min(int(t), int(g)) for t, g in zip(threadgroup, grid))
        if np.prod(group) > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"Thread group size ({int(np.prod(group))}) is greater than  the maximum allowed "
                             f"threads per threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
        buffers = self._buffers(gen, arrays, output_shapes, output_dtypes, init_value, opts)
        out_dtypes = [_numpy_dtype(d) for d in output_dtypes]
        if min(grid) <= 0:  # nothing to run
            raw = [b.data for b in buffers if b.is_output]
            result = launch.Result(raw)
        else:
            artifact = build.build_kernel(to_cpp(gen), opts.mode, opts.count_loads, label=self.name)
            result = launch.run(artifact, buffers, tuple(int(g) for g in grid), group, opts)

        record = LaunchRecord(self.name, gen.kernel_name, tuple(grid), group, opts, result.bytes_loaded,
                              result.warnings)
        for session in _sessions.get():
            session.launches.append(record)
        if result.warnings.strip():
            import warnings

            warnings.warn(f"mslsim {self.name}: {result.warnings.strip()}", stacklevel=2)

        outputs = []
        for raw, shape, dtype, want in zip(result.outputs, output_shapes, out_dtypes, output_dtypes):
            out = raw.view(dtype).reshape(tuple(shape))
            if dtype_name(want) == "bfloat16":
                out = (out.astype(np.uint32) << 16).view(np.float32)
            outputs.append(out)
        return outputs

    def _buffers(self, gen, arrays, output_shapes, output_dtypes, init_value, opts) -> List[Buffer]:
        by_name = {}
        for name, (a, _) in zip(self.input_names, arrays):
            data, strides = _input_bytes(a, self.ensure_row_contiguous)
            by_name[name] = Buffer(name, data, False, counted=True)
            by_name[name + "_shape"] = Buffer(name + "_shape", np.array(a.shape, np.int32).view(np.uint8), False)
            by_name[name + "_strides"] = Buffer(name + "_strides", np.array(strides, np.int64).view(np.uint8), False)
            ndim = np.array([a.ndim], np.int32).view(np.uint8)
            by_name[name + "_ndim"] = Buffer(name + "_ndim", ndim, False)
        for name, shape, dtype in zip(self.output_names, output_shapes, output_dtypes):
            np_dtype = _numpy_dtype(dtype)
            nbytes = int(np.prod(shape)) * np_dtype.itemsize
            if init_value is None:
                data = launch.poisoned(nbytes, opts.poison)
            elif dtype_name(dtype) == "bfloat16":
                bits = (np.array(init_value, np.float32).view(np.uint32) >> 16).astype(np.uint16)
                data = np.full(nbytes // 2, bits, np.uint16).view(np.uint8)
            else:
                data = launch.filled(nbytes, np_dtype, init_value)
            by_name[name] = Buffer(name, data, True)
        return [by_name[what] for _, _, what in buffer_layout(gen)]


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None) -> MetalKernel:
    """Same arguments as mx.fast.metal_kernel; the kernel runs on the CPU."""
    return MetalKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                       atomic_outputs, compile_options)


def _as_tuple(out):
    if isinstance(out, (list, tuple)):
        return tuple(np.asarray(o) for o in out)
    return (np.asarray(out),)


def run_schedules(fn, *, schedules=("forward", "reverse", "random"), poisons=(0xFF, 0x7F), seed=1234, **options):
    """Call `fn()` (which launches kernels) under every schedule x poison and
    require bit-identical outputs; returns the first run's result."""
    runs = []
    for poison in poisons:
        for schedule in schedules:
            with settings(schedule=schedule, poison=poison, seed=seed, **options):
                runs.append((f"{schedule} schedule, poison 0x{poison:02X}", fn()))
    (label0, first), ref = runs[0], _as_tuple(runs[0][1])
    for label, out in runs[1:]:
        for i, (a, b) in enumerate(zip(ref, _as_tuple(out))):
            if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
                where = ""
                if a.shape == b.shape:
                    diff = np.flatnonzero(a.view(np.uint8).reshape(-1) != b.view(np.uint8).reshape(-1))
                    where = f"; {len(diff)} bytes differ, first at byte {diff[0]}"
                raise ScheduleDependence(f"output {i} differs between the {label0} and the {label}{where}")
    return first
