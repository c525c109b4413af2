"""Decode attention over an affine-quantized K/V cache, run on the CPU under mslsim.

The reference is test_kernels.reference (float64) over `mx.dequantize` of the
very tuples the kernel reads. Tolerances: float32 1e-5 relative plus 1e-6
absolute (the kernel dequantizes in fp32, as mx.dequantize does for fp32
scales); float16 2e-3 (mx.dequantize rounds the values to half, the kernel
keeps fp32, and the output is half); bfloat16 1e-2 (the output is bfloat16).
"""

import mlx.core as mx
import numpy as np
import pytest
from test_kernels import assert_close, reference

import mslsim
from echo_mlx.kernels import decode_attention as da
from echo_mlx.kernels import quantized_decode_attention as qa
from mslsim.testing import mutated, require_clang, verbose_factory


@pytest.fixture
def clang():
    require_clang()


def quantized_qkv(B, Hq, Hkv, L, T, D, bits, group_size, dtype=np.float32, seed=0, capacity=None):
    """Queries and a QuantizedKVCache-like cache: mx.quantize tuples of a
    preallocated buffer, of which the kernel reads a strided view of T rows.
    Returns q, the key and value tuples (numpy) and their float64 dequantization."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, D)).astype(dtype)
    buffers = rng.standard_normal((2, B, Hkv, capacity or T, D)).astype(dtype)
    tuples, dense = [], []
    for x in buffers:
        parts = mx.quantize(mx.array(x), group_size=group_size, bits=bits)
        view = tuple(np.array(a)[:, :, :T] for a in parts)
        tuples.append(view)
        dense.append(np.array(mx.dequantize(*map(mx.array, view), group_size=group_size, bits=bits), np.float64))
    return q, tuples[0], tuples[1], dense[0], dense[1]


@pytest.fixture(scope="module")
def attention():
    return qa.build(mslsim.metal_kernel)


# (B, Hq, Hkv, L, T, D, bits, group size, dtype, options): every tail and layout.
SHAPES = {
    "one key, 4 bits": (1, 9, 3, 1, 1, 64, 4, 64, np.float32, {}),
    "fewer keys than the walkers, 8 bits": (1, 3, 1, 2, 17, 64, 8, 32, np.float32, {}),
    "keys not a multiple of 32": (1, 9, 3, 1, 333, 64, 4, 32, np.float32, {}),
    "no gqa, batch 2, 8 queries": (2, 2, 2, 8, 100, 128, 8, 64, np.float32, {}),
    "gqa 8, head dim 128, 4 bits, group 128": (1, 16, 2, 1, 70, 128, 4, 128, np.float32, {}),
    "gqa 8, head dim 64, 8 bits": (1, 8, 1, 1, 45, 64, 8, 64, np.float16, {}),
    "float16, group 32, head dim 128": (1, 6, 2, 3, 61, 128, 4, 32, np.float16, {}),
    "long context, two passes": (1, 9, 3, 1, 3001, 64, 4, 64, np.float32, {}),
    "two passes, float16, 8 bits": (1, 6, 2, 3, 1100, 128, 8, 128, np.float16, {}),
    "small forced key blocks": (2, 3, 1, 2, 200, 64, 4, 32, np.float32, dict(keys_per_block=48)),
    "sliding window": (1, 8, 2, 4, 200, 64, 8, 64, np.float32, dict(window=32)),
    "window over split blocks": (1, 3, 3, 2, 1500, 128, 4, 64, np.float32, dict(window=700)),
    "producer above: no diagonal, first tokens": (
        1, 6, 2, 5, 5, 64, 4, 64, np.float32, dict(mask_kind="no_diagonal", offset=0)),
    "producer above: no diagonal, decode": (1, 6, 2, 1, 77, 64, 8, 32, np.float32, dict(mask_kind="no_diagonal")),
    "no mask": (2, 4, 2, 3, 45, 64, 4, 64, np.float32, dict(mask_kind="none")),
    "head dim 32": (1, 4, 2, 1, 50, 32, 4, 32, np.float32, {}),
    "head dim 256": (1, 4, 2, 2, 50, 256, 8, 128, np.float32, {}),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_float64_reference_of_the_dequantized_cache(case, attention, clang):
    B, Hq, Hkv, L, T, D, bits, group, dtype, options = SHAPES[case]
    q, k, v, k_ref, v_ref = quantized_qkv(B, Hq, Hkv, L, T, D, bits, group, dtype, capacity=T + 13)
    out = attention(q, k, v, scale=D**-0.5, bits=bits, group_size=group, **options)
    assert out.shape == q.shape and out.dtype == dtype
    options.pop("keys_per_block", None)
    assert_close(out, reference(q, k_ref, v_ref, D**-0.5, **options), dtype)


@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_query_counts_up_to_8(L, attention, clang):
    q, k, v, k_ref, v_ref = quantized_qkv(1, 6, 2, L, 41, 64, 8, 64, seed=L)
    out = attention(q, k, v, scale=0.125, bits=8, group_size=64)
    assert_close(out, reference(q, k_ref, v_ref, 0.125), np.float32)


def test_bfloat16_cache(attention, clang):
    """The default dtype on Apple silicon; numpy has no bfloat16, so mx arrays go in."""
    q, k, v, _, _ = quantized_qkv(1, 9, 3, 1, 90, 64, 4, 64)
    q, k, v = mx.array(q, mx.bfloat16), [mx.array(a) for a in k], [mx.array(a) for a in v]
    k, v = ([x[0], x[1].astype(mx.bfloat16), x[2].astype(mx.bfloat16)] for x in (k, v))
    out = attention(q, k, v, scale=0.125, bits=4, group_size=64)
    dense = [np.array(mx.dequantize(*x, group_size=64, bits=4).astype(mx.float32), np.float64) for x in (k, v)]
    ref = reference(np.array(q.astype(mx.float32)), *dense, 0.125)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_agrees_with_mlx_lm_on_a_quantized_kv_cache(attention, clang):
    """The tuples QuantizedKVCache.update_and_fetch returns (views of its buffers)
    give what mlx-lm's quantized attention gives."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
    from mlx_lm.models.cache import QuantizedKVCache

    cache = QuantizedKVCache(group_size=64, bits=8)
    rng = np.random.default_rng(3)
    keys, values = (mx.array(rng.standard_normal((1, 3, 37, 64)).astype(np.float32)) for _ in range(2))
    cache.update_and_fetch(keys[:, :, :34], values[:, :, :34])
    q = mx.array(rng.standard_normal((1, 9, 3, 64)).astype(np.float32))
    k, v = cache.update_and_fetch(keys[:, :, 34:], values[:, :, 34:])
    out = attention(q, k, v, scale=0.125, bits=8, group_size=64)
    # mlx-lm scales its queries in place (queries *= scale): give it its own copy.
    expected = quantized_scaled_dot_product_attention(mx.array(np.array(q)), k, v, scale=0.125, mask="causal",
                                                      group_size=64, bits=8)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_output_is_schedule_and_poison_independent(attention, clang):
    q, k, v, k_ref, v_ref = quantized_qkv(1, 9, 3, 2, 700, 64, 4, 32)
    out = mslsim.run_schedules(lambda: attention(q, k, v, scale=0.125, bits=4, group_size=32, keys_per_block=256))
    assert_close(out, reference(q, k_ref, v_ref, 0.125), np.float32)


@pytest.mark.parametrize("mode", ["asan", "tsan"])
def test_small_case_is_clean_under_sanitizers(mode, clang):
    # 4 SIMD groups = 128 threads: ThreadSanitizer misses races above ~200 fibers.
    attention = qa.build(mslsim.metal_kernel, simd_groups=4)
    q, k, v, k_ref, v_ref = quantized_qkv(1, 4, 2, 2, 45, 64, 4, 32, np.float16, capacity=50)
    with mslsim.settings(mode=mode, strict=True):
        single = attention(q, k, v, scale=0.1, bits=4, group_size=32)
        split = attention(q, k, v, scale=0.1, bits=4, group_size=32, keys_per_block=16)
    assert_close(single, reference(q, k_ref, v_ref, 0.1), np.float16)
    assert_close(split, reference(q, k_ref, v_ref, 0.1), np.float16)


# ------------------------------------------------------------- planted bugs

BUGS = {
    "4-bit unpack shifted by values per word instead of bits": ("(word >> (BITS * e))", "(word >> (E * e))"),
    "scale and bias of the next quantization group": (
        "scales[(w / WPG) * scale_stride]), float(biases[(w / WPG) * bias_stride]",
        "scales[(w / WPG + 1) * scale_stride]), float(biases[(w / WPG + 1) * bias_stride]"),
    "scale broadcast from the walker's first lane": ("lane - sub % WPG", "lane - sub"),
    "missing barrier before summing the walkers' outputs": (
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    const int l = l0", "    const int l = l0"),
    "walkers past the last key still count": ("const bool live = t <= last;", "const bool live = true;"),
}


def survives(factory):
    """True if the kernel passes every check the correct one passes."""
    attention = qa.build(factory, simd_groups=4)
    cases = [
        # 4 keys per SIMD group step, 2 scales per row, 41 keys per query: a partial last step
        (quantized_qkv(1, 6, 2, 3, 150, 64, 4, 32), dict(bits=4, group_size=32, window=41)),
        # 2 keys per step, key blocks of an odd size
        (quantized_qkv(1, 3, 1, 2, 150, 64, 8, 64, seed=1), dict(bits=8, group_size=64, keys_per_block=63)),
    ]
    try:
        for (q, k, v, k_ref, v_ref), options in cases:
            out = mslsim.run_schedules(lambda: attention(q, k, v, scale=0.1, **options), strict=True)
            window = options.get("window")
            np.testing.assert_allclose(out, reference(q, k_ref, v_ref, 0.1, window=window), rtol=1e-5, atol=1e-6)
    except (mslsim.SimulatorError, AssertionError):
        return False
    return True


def test_the_bug_checks_pass_the_correct_kernel(clang):
    assert survives(mslsim.metal_kernel)


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_is_caught(bug, clang):
    factory = mutated(mslsim.metal_kernel, *BUGS[bug])
    assert not survives(factory)
    assert factory.hits, "the planted bug no longer matches the kernel source"


# ------------------------------------------------------------ bytes moved


@pytest.mark.parametrize("Hq, Hkv, T, D, bits, group", [
    (9, 3, 100, 64, 4, 32),      # gqa 3, one pass
    (16, 2, 1500, 128, 8, 64),   # gqa 8, two passes
    (2, 2, 77, 128, 8, 128),     # no gqa
])
def test_each_packed_word_scale_and_bias_is_loaded_once_per_kv_head_group(Hq, Hkv, T, D, bits, group,
                                                                           attention, clang):
    B = 2
    q, k, v, _, _ = quantized_qkv(B, Hq, Hkv, 1, T, D, bits, group, np.float16)
    with mslsim.settings(count_loads=True) as session:
        attention(q, k, v, scale=0.125, bits=bits, group_size=group)
    loaded = session.launches[0].bytes_loaded
    rows = B * Hkv * T
    for x in "kv":
        assert loaded[x] == rows * D * bits // 8
        assert loaded[f"{x}_scales"] == loaded[f"{x}_biases"] == rows * (D // group) * 2


def test_a_sliding_window_loads_only_the_window(attention, clang):
    q, k, v, _, _ = quantized_qkv(1, 4, 2, 1, 500, 64, 8, 64)
    with mslsim.settings(count_loads=True) as session:
        attention(q, k, v, scale=0.125, bits=8, group_size=64, window=64)
    loaded = session.launches[0].bytes_loaded
    assert loaded["k"] + loaded["v"] == 2 * 2 * 64 * 64
    assert loaded["k_scales"] == 2 * 64 * 4


# ------------------------------------------------------- layout, MLX source


def test_unsupported_layouts_are_refused_with_the_reason():
    assert qa.values_per_lane(64, 4, 64) == 8 and qa.values_per_lane(128, 8, 32) == 4
    assert qa.values_per_lane(256, 8, 128) == 8  # two words per lane
    for args, words in [((64, 3, 64), "3-bit"), ((64, 2, 64), "2-bit"), ((96, 4, 32), "head dim 96"),
                        ((64, 4, 128), "group size 128"), ((80, 8, 48), "group size 48")]:
        with pytest.raises(ValueError, match=words):
            qa.values_per_lane(*args)
    with pytest.raises(ValueError, match="too many registers"):  # 16 heads per kv head x 8 values per lane
        qa.plan((1, 16, 1, 64), (1, 1, 10, 8), bits=4, group_size=64)
    with pytest.raises(ValueError, match="do not hold 8-bit rows"):
        qa.plan((1, 4, 1, 64), (1, 1, 10, 8), bits=8, group_size=64)


def test_generated_source_is_byte_identical_to_mlx(capfd, tmp_path, clang):
    q, k, v, _, _ = quantized_qkv(1, 6, 2, 2, 700, 64, 4, 32, np.float16)
    split = dict(bits=4, group_size=32, keys_per_block=256)
    mx_attention = qa.build(verbose_factory(mx.fast.metal_kernel))
    arrays = [mx.array(a) for a in (q, *k, *v)]
    mx.export_function(str(tmp_path / "f.mlxfn"),
                       lambda q, *kv: mx_attention(q, kv[:3], kv[3:], scale=0.1, **split), *arrays)
    expected = capfd.readouterr().out
    qa.build(verbose_factory(mslsim.metal_kernel))(q, k, v, scale=0.1, **split)
    generated = capfd.readouterr().out
    assert expected.count("Generated source code") == 2  # key blocks, then the merge
    assert generated == expected
