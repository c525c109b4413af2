"""Quantized sliding-window KV caches (echo_mlx.models.cache) against mlx-lm's float
RotatingKVCache: same window, same row order, same masks, same trimming."""

import echo_mlx  # noqa: F401  first: loads OpenBLAS before mlx

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import pytest
from conftest import TINY
from mlx.utils import tree_flatten
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models import llama
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import (
    RotatingKVCache,
    can_trim_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from echo_mlx.errors import EchoError
from echo_mlx.models.cache import (
    QuantizableRotatingKVCache,
    QuantizedRotatingKVCache,
    check_kv_quantization,
)

B, KV_HEADS, Q_HEADS, D = 1, 2, 4, 64
MAX, KEEP = 16, 4

# Chunk lengths fed one after another: a prefill shorter / longer than / equal
# to the window, single-token steps well past it (ring buffer wraps), then
# more multi-token chunks (concatenate + trim) and steps again.
SCHEDULES = {
    "short-prefill": dict(keep=KEEP, step=256, chunks=[5] + [1] * 20 + [7] + [1] * 3),
    "long-prefill": dict(keep=KEEP, step=256, chunks=[23] + [1] * 18 + [9, 1, 1]),
    "window-prefill-no-keep": dict(keep=0, step=256, chunks=[16] + [1] * 19 + [20, 1]),
    # step < max_size: the ring buffer grows in several allocations first.
    "token-by-token": dict(keep=2, step=4, chunks=[1] * 21 + [4] + [1] * 3),
}


def chunk(i, n, seed=0):
    k1, k2 = mx.random.split(mx.random.key(1000 * seed + i))
    keys = 2 * mx.random.normal((B, KV_HEADS, n, D), key=k1) + 0.5
    values = mx.random.normal((B, KV_HEADS, n, D), key=k2)
    return keys, values


def make_pair(schedule, group_size, bits, cls=QuantizedRotatingKVCache):
    s = SCHEDULES[schedule]
    floats = RotatingKVCache(MAX, keep=s["keep"])
    quant = (
        cls(MAX, keep=s["keep"], group_size=group_size, bits=bits)
        if cls is QuantizedRotatingKVCache
        else cls(MAX, keep=s["keep"])
    )
    floats.step = quant.step = s["step"]
    return floats, quant


def dq(t, group_size, bits):
    return mx.dequantize(*t, group_size=group_size, bits=bits)


def qdq(x, group_size, bits):
    """Quantize then dequantize row-wise (groups along the last axis)."""
    return dq(mx.quantize(x, group_size=group_size, bits=bits), group_size, bits)


def same_mask(a, b):
    if isinstance(a, mx.array) or isinstance(b, mx.array):
        return a.shape == b.shape and mx.array_equal(a, b).item()
    return a == b


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_window_and_order_match_float_rotating_cache(schedule, bits, group_size):
    floats, quant = make_pair(schedule, group_size, bits)
    for i, n in enumerate(SCHEDULES[schedule]["chunks"]):
        assert same_mask(quant.make_mask(n), floats.make_mask(n))
        keys, values = chunk(i, n)
        fk, fv = floats.update_and_fetch(keys, values)
        qk, qv = quant.update_and_fetch(keys, values)
        assert isinstance(qk, tuple) and len(qk) == 3 and qk[0].dtype == mx.uint32
        assert (quant.offset, quant._idx, quant.size()) == (
            floats.offset,
            floats._idx,
            floats.size(),
        )
        for q, f in ((qk, fk), (qv, fv)):
            # Quantization is row-wise, so quantizing on the way in equals
            # quantizing the float cache's output: same rows, same order.
            assert mx.array_equal(dq(q, group_size, bits), qdq(f, group_size, bits)).item()
            if bits == 8:
                # Affine 8-bit: error at most one quantization step, i.e. the
                # group's (max - min) / 255.
                g = f.reshape(*f.shape[:-1], D // group_size, group_size)
                step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / 255
                err = mx.abs(dq(q, group_size, bits) - f).reshape(g.shape)
                assert mx.all(err <= step + 1e-6).item()
    assert quant.nbytes == sum(a.nbytes for a in quant.keys + quant.values)
    assert quant.nbytes < floats.nbytes


# (max, mean) |difference| allowed between attention outputs with the
# quantized and the float rotating cache, for values ~ N(0, 1), keys ~
# N(0.5, 2^2), group size 64; measured maxima (means) are 0.03 (0.006) at 8
# bits and 0.5 (0.09) at 4 bits. The quantized kernel itself must match float
# attention over the dequantized K/V to 1e-4.
ATTENTION_TOL = {8: (0.06, 0.01), 4: (1.0, 0.15)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("schedule", ["short-prefill", "long-prefill"])
def test_attention_matches_float_rotating_cache(schedule, bits):
    group_size = 64
    floats, quant = make_pair(schedule, group_size, bits)
    for i, n in enumerate(SCHEDULES[schedule]["chunks"]):
        mask = quant.make_mask(n)
        keys, values = chunk(i, n)
        fk, fv = floats.update_and_fetch(keys, values)
        qk, qv = quant.update_and_fetch(keys, values)
        queries = mx.random.normal((B, Q_HEADS, n, D), key=mx.random.key(7 + i))
        scale = D**-0.5
        # (mlx-lm's quantized path scales its queries argument in place: copy.)
        out_q = scaled_dot_product_attention(queries + 0, qk, qv, quant, scale=scale, mask=mask)
        out_f = scaled_dot_product_attention(queries, fk, fv, floats, scale=scale, mask=mask)
        out_dq = mx.fast.scaled_dot_product_attention(
            queries, dq(qk, group_size, bits), dq(qv, group_size, bits), scale=scale, mask=mask
        )
        assert out_q.shape == out_f.shape == (B, Q_HEADS, n, D)
        assert mx.abs(out_q - out_dq).max().item() < 1e-4
        err = mx.abs(out_q - out_f)
        assert (err.max().item(), err.mean().item()) < ATTENTION_TOL[bits]


def test_llama_forward_with_quantized_rotating_cache():
    """A whole mlx-lm llama, prompt then tokens past the window: 8-bit logits
    stay within 0.05 of the float rotating cache's (logit scale ~1)."""
    args = llama.ModelArgs(**dict(TINY, hidden_size=128, num_attention_heads=2, num_key_value_heads=1))
    mx.random.seed(3)
    model = llama.Model(args)
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 40), key=mx.random.key(4))
    layers = range(args.num_hidden_layers)
    floats = [RotatingKVCache(MAX, keep=KEEP) for _ in layers]
    quant = [QuantizedRotatingKVCache(MAX, keep=KEEP, group_size=64, bits=8) for _ in layers]
    pieces = [tokens[:, :10]] + [tokens[:, t : t + 1] for t in range(10, 34)] + [tokens[:, 34:]]
    for piece in pieces:
        lf, lq = model(piece, cache=floats), model(piece, cache=quant)
        assert mx.abs(lf - lq).max().item() < 0.05
    assert quant[0].offset == 40 and quant[0].size() == MAX


# Index of the chunk before which the cache gets quantized: while empty,
# before the window is full, with the ring wrapped, just before and just after
# a multi-token chunk (the buffer then holds max_size + 6 rows).
SWITCH_POINTS = {"empty": 0, "filling": 3, "ring-wrapped": 14, "before-chunk": 21, "after-chunk": 22}


@pytest.mark.parametrize("switch", SWITCH_POINTS)
def test_to_quantized_midstream_equals_quantized_from_start(switch):
    schedule, group_size, bits = "short-prefill", 32, 4
    chunks = SCHEDULES[schedule]["chunks"]
    _, reference = make_pair(schedule, group_size, bits)
    _, cache = make_pair(schedule, group_size, bits, cls=QuantizableRotatingKVCache)
    caches = [cache]
    start = sum(chunks[: SWITCH_POINTS[switch]])
    for i, n in enumerate(chunks):
        # What generate_step does before each forward pass.
        maybe_quantize_kv_cache(caches, start, group_size, bits)
        converted = isinstance(caches[0], QuantizedRotatingKVCache)
        assert converted == (caches[0].offset >= start)
        if converted:
            if reference.keys is not None:
                assert all(
                    mx.array_equal(a[1], b[1]).item()
                    for a, b in zip(
                        tree_flatten(caches[0].keys_and_values()),
                        tree_flatten(reference.keys_and_values()),
                    )
                )
        keys, values = chunk(i, n)
        got = caches[0].update_and_fetch(keys, values)
        want = reference.update_and_fetch(keys, values)
        if converted:
            assert all(
                a[1].shape == b[1].shape and mx.array_equal(a[1], b[1]).item()
                for a, b in zip(tree_flatten(got), tree_flatten(want))
            )
            assert (caches[0].offset, caches[0]._idx) == (reference.offset, reference._idx)
    converted_cache = caches[0]
    maybe_quantize_kv_cache(caches, 0, group_size, bits)
    assert caches[0] is converted_cache  # an already quantized cache is left alone
    assert not hasattr(converted_cache, "to_quantized")
    assert (converted_cache.group_size, converted_cache.bits) == (group_size, bits)


LOAD_SCRIPT = textwrap.dedent(
    """
    import echo_mlx  # OpenBLAS before mlx; does not import echo_mlx.models.cache
    import json, sys
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import load_prompt_cache

    path, next_path, state_path, out_path = sys.argv[1:5]
    try:
        load_prompt_cache(path)
        plain = "loaded"
    except KeyError as e:
        plain = "KeyError: " + str(e)

    import echo_mlx.models.cache  # registers the classes with mlx_lm.models.cache

    caches, metadata = load_prompt_cache(path, return_metadata=True)
    steps = mx.load(next_path)
    states, arrays, info = {}, {}, []
    for i, c in enumerate(caches):
        flat = tree_flatten(c.state)
        states.update({f"{i}.{k}": v for k, v in flat if isinstance(v, mx.array)})
        info.append(dict(
            cls=type(c).__name__,
            keys_type=type(c.keys).__name__,
            scalars=[[k, v] for k, v in flat if not isinstance(v, mx.array)],
        ))
    # Saved before updating: updates write into the state's arrays in place.
    mx.save_safetensors(state_path, states)
    for i, c in enumerate(caches):
        for s in ("a", "b"):
            out = c.update_and_fetch(steps[s + ".k"], steps[s + ".v"])
            arrays.update({f"{i}.{s}.{k}": v for k, v in tree_flatten(out)})
    mx.save_safetensors(out_path, arrays)
    print(json.dumps(dict(plain=plain, metadata=metadata, info=info)))
    """
)


def test_save_load_round_trip_in_fresh_process(tmp_path):
    _, rotated = make_pair("short-prefill", 32, 4)
    _, floating = make_pair("long-prefill", 64, 8, cls=QuantizableRotatingKVCache)
    empty = QuantizedRotatingKVCache(MAX, keep=KEEP, group_size=32, bits=8)
    for i, n in enumerate(SCHEDULES["short-prefill"]["chunks"][:15]):
        rotated.update_and_fetch(*chunk(i, n))
    for i, n in enumerate(SCHEDULES["long-prefill"]["chunks"][:4]):
        floating.update_and_fetch(*chunk(i, n, seed=1))
    caches = [rotated, floating, empty]
    assert rotated.offset > MAX and rotated._idx < MAX  # mid-ring, not temporal order

    files = [str(tmp_path / f"{name}.safetensors") for name in ("cache", "next", "state", "out")]
    path, next_path, state_path, out_path = files
    save_prompt_cache(path, caches, metadata={"model": "tiny"})
    (ka, va), (kb, vb) = chunk(100, 1), chunk(101, 3)
    mx.save_safetensors(next_path, {"a.k": ka, "a.v": va, "b.k": kb, "b.v": vb})

    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # Why echo_mlx.models.cache registers itself: mlx-lm looks the class name up in
    # its own module globals and knows nothing of classes defined elsewhere.
    assert report["plain"] == "KeyError: 'QuantizedRotatingKVCache'"
    assert report["metadata"] == {"model": "tiny"}
    states, loaded = mx.load(state_path), mx.load(out_path)

    for i, c in enumerate(caches):
        info = report["info"][i]
        assert info["cls"] == type(c).__name__
        assert info["keys_type"] == type(c.keys).__name__  # tuples stay tuples
        flat = tree_flatten(c.state)
        assert info["scalars"] == [[k, v] for k, v in flat if not isinstance(v, mx.array)]
        for k, v in flat:
            if isinstance(v, mx.array):
                got = states[f"{i}.{k}"]
                assert got.dtype == v.dtype and mx.array_equal(got, v).item()
    # The loaded caches then behave exactly like the originals.
    for i, c in enumerate(caches):
        for s, (k, v) in (("a", (ka, va)), ("b", (kb, vb))):
            for key, want in tree_flatten(c.update_and_fetch(k, v)):
                assert mx.array_equal(loaded[f"{i}.{s}.{key}"], want).item()


def test_trim_like_rotating_cache():
    floats, quant = make_pair("short-prefill", 64, 8)
    both = [floats, quant]

    def feed(i, n):
        fk, _ = floats.update_and_fetch(*chunk(i, n))
        qk, _ = quant.update_and_fetch(*chunk(i, n))
        assert mx.array_equal(dq(qk, 64, 8), qdq(fk, 64, 8)).item()

    feed(0, 6)
    assert quant.is_trimmable() and floats.is_trimmable() and can_trim_prompt_cache(both)
    assert quant.trim(2) == floats.trim(2) == 2
    feed(1, 1)
    feed(2, 3)
    assert trim_prompt_cache(both, 3) == 3
    assert (quant.offset, quant._idx) == (floats.offset, floats._idx) == (5, 5)
    for i in range(3, 3 + MAX):
        feed(i, 1)
        assert quant.is_trimmable() == floats.is_trimmable()
    assert not quant.is_trimmable() and not can_trim_prompt_cache(both)
    assert trim_prompt_cache(both, 2) == 0
    fresh = QuantizedRotatingKVCache(MAX, keep=KEEP)
    assert fresh.is_trimmable() and fresh.trim(5) == 0 and fresh.nbytes == 0 and fresh.empty()


@pytest.mark.parametrize(
    "bits,group_size,head_dim,words",
    [
        (7, 64, None, ["bits 7", "1, 2, 3, 4, 5, 6, 8"]),
        (16, 64, None, ["bits 16", "use one of"]),
        (4, 48, None, ["group size 48", "32, 64, 128"]),
        (4, 64, 96, ["96", "group size 64", "use group size 32"]),
    ],
)
def test_check_kv_quantization_errors_are_one_line(bits, group_size, head_dim, words):
    with pytest.raises(EchoError) as err:
        check_kv_quantization(bits, group_size, head_dim)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words)


def test_check_kv_quantization_accepts_what_mx_quantize_supports():
    for bits in (2, 3, 4, 5, 6, 8):
        for group_size in (32, 64, 128):
            check_kv_quantization(bits, group_size, head_dim=128)
    with pytest.raises(EchoError):
        QuantizedRotatingKVCache(MAX, bits=7)
    with pytest.raises(EchoError):
        QuantizableRotatingKVCache(MAX).to_quantized(group_size=48)
    cache = QuantizedRotatingKVCache(MAX, group_size=128, bits=4)
    with pytest.raises(EchoError, match="head dimension 64"):
        cache.update_and_fetch(*chunk(0, 2))
