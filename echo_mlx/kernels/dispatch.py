"""Which attention a call runs: echo's decode kernels or MLX's ops.

The model calls `decode_attention(...)` once per layer; it returns the
kernel's output, or None when the model should run its ops path
(mx.fast.scaled_dot_product_attention, or mlx-lm's quantized attention). The
kernels run when all of these hold, in this order:

  ECHO_MLX_ATTENTION is not `ops`       (or set_mode(); auto | kernel | ops)
  MLX has a Metal GPU as default device (or a factory from set_factory())
  the model is not training            (no gradient flows through the kernels)
  there is a cache and at most 8 new query tokens (decode, short chunks)
  the mask is None or "causal"         (mask arrays: rotating or batched caches)
  dtype float32/float16/bfloat16, and a head-dim / GQA / quantization layout
  the kernel supports (its plan() says why not)

EchoAtt layers that reuse their source's probabilities ask
`apply_probabilities(...)` for P V (apply_probabilities.py) under the same
conditions, float or 4/8-bit V.

`kernel` differs from `auto` in one way: without a Metal GPU it raises an
EchoError instead of falling back. Every call is counted by path and reason
(`usage`), which `summary()` turns into the line generate prints.
"""

import os
from collections import Counter
from typing import Optional

import mlx.core as mx

from . import apply_probabilities as probabilities_kernel
from . import decode_attention as float_kernel
from . import quantized_decode_attention as quantized_kernel
from ..errors import EchoError

ENV = "ECHO_MLX_ATTENTION"
MODES = ("auto", "kernel", "ops")
MAX_QUERIES = 8
DTYPES = (mx.float32, mx.float16, mx.bfloat16)

_mode: Optional[str] = None  # set_mode(): overrides the environment
_factory = None  # set_factory(): a kernel factory that runs on this machine
_built = {}  # factory -> (float attention, quantized attention, P V)
usage: Counter = Counter()  # (path, reason) -> calls since reset_usage()


def mode() -> str:
    chosen = _mode or os.environ.get(ENV, "auto").strip().lower() or "auto"
    if chosen not in MODES:
        raise EchoError(f"{ENV}={chosen!r} is not a mode: use auto, kernel or ops")
    return chosen


def set_mode(mode: Optional[str]):
    """Force `kernel` or `ops` (or `auto`) from Python; None goes back to the environment."""
    global _mode
    if mode is not None and mode not in MODES:
        raise EchoError(f"attention mode {mode!r} is not one of auto, kernel, ops")
    _mode = mode


def set_factory(factory):
    """Make the kernels with `factory` instead of mx.fast.metal_kernel (None
    restores it). Its kernels must take and return mx arrays; tests pass
    mslsim.testing.mlx_outputs(mslsim.metal_kernel) to run them on the CPU."""
    global _factory
    _factory = factory


def no_metal() -> Optional[str]:
    """Why mx.fast.metal_kernel cannot run here, or None if it can."""
    if _factory is not None:
        return None
    if not (hasattr(mx, "metal") and mx.metal.is_available()):
        return "this MLX has no Metal GPU"
    if mx.default_device() != mx.gpu:
        return f"the default device is {mx.default_device()}"
    return None


def check():
    """Raise the EchoError a forced `kernel` mode meets on this machine, if any."""
    problem = no_metal() if mode() == "kernel" else None
    if problem:
        raise EchoError(
            f"{ENV}=kernel needs MLX's Metal GPU, but {problem}: run on Apple silicon with the GPU "
            f"as default device, or set {ENV}=auto to fall back to MLX ops"
        )


def describe() -> str:
    """The path this machine takes and why, for `echo-mlx info`."""
    chosen = mode()
    if chosen == "ops":
        return f"ops (forced by {ENV}=ops)"
    problem = no_metal()
    if problem and chosen == "kernel":
        try:
            check()
        except EchoError as e:
            return f"error: {e}"
    if problem:
        return f"ops ({problem}; the decode kernels need Apple silicon)"
    return (
        f"echo decode kernels for cached steps of <= {MAX_QUERIES} tokens, float or 4/8-bit K/V "
        f"({ENV}={chosen}); ops for longer prompts and training"
    )


def reset_usage():
    usage.clear()


def summary() -> str:
    """What ran since reset_usage(), e.g. 'kernel for 870 calls (float K/V); ops for
    30 calls (prompt chunks of more than 8 tokens)'."""
    if not usage:
        return "no attention calls"
    parts = [f"{path} for {n} calls ({reason})" for (path, reason), n in usage.most_common()]
    return "; ".join(parts)


def decode_attention(queries, keys, values, cache, scale: float, mask, earlier_only: bool = False,
                     training: bool = False) -> Optional[mx.array]:
    """The attention output from echo's kernel, or None: run the ops path.

    `keys`/`values` are what the producer's cache returned (arrays, or
    mx.quantize tuples when the cache has `bits`). `earlier_only`: the query
    at position p sees keys < p (a consumer whose producer sits above it).
    """
    reason, run = _choose(queries, keys, values, cache, scale, mask, earlier_only, training)
    usage[("kernel" if run else "ops", reason)] += 1
    return run() if run else None


def _why_not_a_cached_step(cache, n_queries: int, training: bool) -> Optional[str]:
    """Why neither kernel may run this call (mode, machine, training, cache, query count), or None."""
    if mode() == "ops":
        return f"forced by {ENV}=ops"
    problem = no_metal()
    if problem:
        check()  # raises when forced
        return problem
    if training:
        return "training"
    if cache is None:
        return "no cache"
    if not isinstance(cache.offset, int):
        return "batched cache"
    if n_queries > MAX_QUERIES:
        return f"prompt chunks of more than {MAX_QUERIES} tokens"
    return None


def _choose(queries, keys, values, cache, scale, mask, earlier_only, training):
    """(reason, run or None)."""
    problem = _why_not_a_cached_step(cache, queries.shape[2], training)
    if problem:
        return problem, None
    if not (mask is None or isinstance(mask, str) and mask == "causal"):
        return "mask array (rotating or batched cache)", None
    if queries.dtype not in DTYPES:
        return f"dtype {queries.dtype}", None
    if earlier_only:
        mask_kind = "no_diagonal"
    else:
        mask_kind = "none" if mask is None else "causal"  # None: every cached key is visible
    bits = getattr(cache, "bits", None)
    if bits is None and keys.dtype != queries.dtype:
        return f"keys {keys.dtype}, queries {queries.dtype}", None
    try:  # the layout, or why the kernel cannot take these shapes
        if bits is None:
            float_kernel.plan(queries.shape, keys.shape, mask_kind=mask_kind)
        else:
            quantized_kernel.plan(queries.shape, keys[0].shape, bits=bits, group_size=cache.group_size,
                                  mask_kind=mask_kind)
    except ValueError as e:
        return str(e), None
    float_attention, quantized_attention, _ = _kernels()
    if bits is None:
        return "float K/V", lambda: float_attention(queries, keys, values, scale=scale, mask_kind=mask_kind)
    return f"{bits}-bit K/V", lambda: quantized_attention(queries, keys, values, scale=scale, bits=bits,
                                                          group_size=cache.group_size, mask_kind=mask_kind)


def apply_probabilities(probabilities, values, cache, training: bool = False) -> Optional[mx.array]:
    """An EchoAtt layer's P V from echo's kernel, or None: run the ops path.

    `probabilities` (B, Hkv, G, L, S) are the source layer's, `values` what
    the layer's own cache returned. Counted in `usage` with reasons that
    start with "P V"."""
    reason, run = _choose_probabilities(probabilities, values, cache, training)
    usage[("kernel" if run else "ops", "P V: " + reason)] += 1
    return run() if run else None


def _choose_probabilities(probabilities, values, cache, training):
    problem = _why_not_a_cached_step(cache, probabilities.shape[3], training)
    if problem:
        return problem, None
    bits = getattr(cache, "bits", None)
    dtype = values[1].dtype if bits else values.dtype  # quantized: the scales'
    if dtype not in DTYPES:
        return f"dtype {dtype}", None
    try:
        if bits is None:
            probabilities_kernel.plan(probabilities.shape, values.shape)
        else:
            head_dim = values[0].shape[3] * 32 // bits
            probabilities_kernel.plan(probabilities.shape, (*values[0].shape[:3], head_dim),
                                      lane_values=quantized_kernel.values_per_lane(head_dim, bits, cache.group_size))
    except ValueError as e:
        return str(e), None
    kernel = _kernels()[2]
    if bits is None:
        return "float V", lambda: kernel(probabilities, values)
    return f"{bits}-bit V", lambda: kernel(probabilities, values, bits=bits, group_size=cache.group_size)


def _kernels():
    factory = _factory or mx.fast.metal_kernel
    if factory not in _built:
        _built[factory] = (float_kernel.build(factory), quantized_kernel.build(factory),
                           probabilities_kernel.build(factory))
    return _built[factory]
