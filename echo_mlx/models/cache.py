"""A sliding-window (rotating) KV cache that stores keys and values quantized.

mlx-lm's ``RotatingKVCache`` raises ``NotImplementedError`` from
``to_quantized``, so mlx-lm cannot combine ``--max-kv-size`` with
``--kv-bits`` (mlx-lm issue #1573). This module fills that gap:

* ``QuantizedRotatingKVCache`` has exactly ``RotatingKVCache``'s windowing
  (``keep``, ``max_size``, ring buffer for one-token steps, concatenate and
  trim for longer chunks, ``make_mask``, ``trim``) but holds K/V as
  ``mx.quantize`` tuples ``(packed uint32, scales, biases)`` like
  ``QuantizedKVCache``. Its ``bits``/``group_size`` attributes make
  ``mlx_lm.models.base.scaled_dot_product_attention`` take the quantized path.
* ``QuantizableRotatingKVCache`` is a float ``RotatingKVCache`` whose
  ``to_quantized`` returns the equivalent ``QuantizedRotatingKVCache``, so
  ``mlx_lm.generate.maybe_quantize_kv_cache`` (``--quantized-kv-start``) works
  with a window.
* ``check_kv_quantization`` validates bits / group size with a one-line
  ``EchoError``.

Importing this module registers both classes in ``mlx_lm.models.cache`` (see
``_register``) so ``load_prompt_cache`` can rebuild them from a file.
"""

import mlx.core as mx
import mlx_lm.models.cache as _mlx_cache
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.cache import RotatingKVCache

from ..errors import EchoError

# What mx.quantize accepts for the (default) affine mode in mlx 0.32.
SUPPORTED_KV_BITS = (1, 2, 3, 4, 5, 6, 8)
SUPPORTED_KV_GROUP_SIZES = (32, 64, 128)


def check_kv_quantization(bits, group_size, head_dim=None):
    """Raise a one-line EchoError unless K/V can be quantized with these settings.

    ``head_dim``, when given, must be a multiple of ``group_size`` (mx.quantize
    groups along the last axis).
    """
    if isinstance(bits, bool) or bits not in SUPPORTED_KV_BITS:
        raise EchoError(
            f"KV cache bits {bits!r} is not supported by mx.quantize; "
            f"use one of {', '.join(map(str, SUPPORTED_KV_BITS))} (4 or 8 are typical)"
        )
    if isinstance(group_size, bool) or group_size not in SUPPORTED_KV_GROUP_SIZES:
        raise EchoError(
            f"KV cache group size {group_size!r} is not supported by mx.quantize; "
            f"use one of {', '.join(map(str, SUPPORTED_KV_GROUP_SIZES))}"
        )
    if head_dim is not None and head_dim % group_size:
        fits = [g for g in SUPPORTED_KV_GROUP_SIZES if head_dim % g == 0]
        fix = f"use group size {fits[-1]}" if fits else "KV quantization cannot be used"
        raise EchoError(
            f"head dimension {head_dim} is not a multiple of KV group size {group_size}; {fix}"
        )


class QuantizedRotatingKVCache(RotatingKVCache):
    """``RotatingKVCache`` with keys/values stored as ``mx.quantize`` tuples.

    ``update_and_fetch`` takes float keys/values of shape (B, heads, S, dim)
    and returns ``(packed, scales, biases)`` tuples for keys and values, with
    the rows (axis 2) in exactly the order ``RotatingKVCache`` would return
    its float arrays, so ``RotatingKVCache.make_mask`` stays valid.
    """

    def __init__(self, max_size, keep=0, group_size=64, bits=8):
        check_kv_quantization(bits, group_size)
        super().__init__(max_size, keep=keep)
        self.group_size = group_size
        self.bits = bits

    def _quantize(self, x):
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            check_kv_quantization(self.bits, self.group_size, keys.shape[-1])
            check_kv_quantization(self.bits, self.group_size, values.shape[-1])
        qkeys, qvalues = self._quantize(keys), self._quantize(values)
        # RotatingKVCache's update only slices, concatenates, allocates (using
        # the incoming array's trailing dim and dtype) and assigns along axis 2,
        # and its bookkeeping depends only on lengths along axis 2, which all
        # three components share. So run the unchanged parent update once per
        # component (packed, scales, biases), each time from the same starting
        # bookkeeping; every run ends in the same bookkeeping state.
        start = {k: v for k, v in vars(self).items() if k not in ("keys", "values")}
        old_k, old_v = self.keys, self.values
        stored, fetched = [], []
        for i in range(len(qkeys)):
            vars(self).update(start)
            self.keys = None if old_k is None else old_k[i]
            self.values = None if old_v is None else old_v[i]
            fetched.append(RotatingKVCache.update_and_fetch(self, qkeys[i], qvalues[i]))
            stored.append((self.keys, self.values))
        self.keys, self.values = (tuple(c) for c in zip(*stored))
        return tuple(tuple(c) for c in zip(*fetched))

    def keys_and_values(self):
        # The parent's version indexes ``self.keys.shape``; here it runs inside
        # the per-component update above (a single array) or on the tuples.
        if isinstance(self.keys, mx.array):
            return super().keys_and_values()
        n = min(self.offset, self.keys[0].shape[2])
        return tree_map(lambda x: x[..., :n, :], (self.keys, self.values))

    @property
    def state(self):
        return (*super().state, self.group_size, self.bits)

    @state.setter
    def state(self, v):
        *base, self.group_size, self.bits = v
        # load_prompt_cache rebuilds the tuples as lists; store tuples again.
        base[0], base[1] = (None if x is None else tuple(x) for x in base[:2])
        RotatingKVCache.state.fset(self, base)

    @property
    def to_quantized(self):
        # Already quantized. mlx-lm's maybe_quantize_kv_cache converts every
        # cache that has ``to_quantized`` on every step; QuantizedKVCache has
        # none, and the AttributeError makes hasattr() False here too.
        raise AttributeError("QuantizedRotatingKVCache is already quantized")

    @classmethod
    def merge(cls, caches):
        raise NotImplementedError("batched generation with QuantizedRotatingKVCache is not supported")

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return tree_reduce(lambda a, x: a + x.nbytes, (self.keys, self.values), 0)


class QuantizableRotatingKVCache(RotatingKVCache):
    """A float ``RotatingKVCache`` that can be converted to a quantized one."""

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedRotatingKVCache:
        quant = QuantizedRotatingKVCache(
            self.max_size, keep=self.keep, group_size=group_size, bits=bits
        )
        quant.offset, quant._idx = self.offset, self._idx
        if self.keys is not None:
            check_kv_quantization(bits, group_size, self.keys.shape[-1])
            check_kv_quantization(bits, group_size, self.values.shape[-1])
            quant.keys, quant.values = quant._quantize(self.keys), quant._quantize(self.values)
        return quant


def _register(*classes):
    """Make the classes loadable by ``mlx_lm.models.cache.load_prompt_cache``.

    save_prompt_cache records only ``type(cache).__name__``, and
    load_prompt_cache turns that name back into a class with
    ``globals()[name]`` -- the namespace of ``mlx_lm.models.cache`` itself. A
    class defined anywhere else raises KeyError there, so each class is set
    as an attribute of that module (the module's globals). Importing
    ``echo_mlx.models.cache`` before loading a saved prompt cache is therefore
    required. A different class mlx-lm may one day define under the same
    name is left alone.
    """
    for cls in classes:
        existing = getattr(_mlx_cache, cls.__name__, None)
        if existing is None or getattr(existing, "__module__", None) == __name__:
            setattr(_mlx_cache, cls.__name__, cls)


_register(QuantizedRotatingKVCache, QuantizableRotatingKVCache)
