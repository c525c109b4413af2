"""The shared-KV decode attention kernel, run on the CPU under mslsim.

Tolerances against a float64 numpy reference: float32 kernels 1e-5 relative
(plus 1e-6 absolute), float16 2e-3 (the output itself is rounded to half).
"""

import mlx.core as mx
import numpy as np
import pytest

import mslsim
from echo_mlx.kernels import decode_attention as da
from mslsim.testing import mutated, require_clang, verbose_factory


@pytest.fixture
def clang():
    require_clang()


def reference(q, k, v, scale, mask_kind="causal", window=None, offset=None):
    """Grouped-query attention in float64, masks as in the model."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _, Hq, L, _ = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    offset = T - L if offset is None else offset
    k, v = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)
    scores = scale * q @ k.transpose(0, 1, 3, 2)
    t = np.arange(T)
    visible = np.ones((L, T), bool)
    for row in range(L):
        pos = offset + row
        if mask_kind != "none":
            visible[row] &= t <= pos - (mask_kind == "no_diagonal")
        if window:
            visible[row] &= t > pos - window
    scores = np.where(visible, scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(-1, keepdims=True)
    return np.where(total > 0, weights @ v / np.where(total > 0, total, 1), 0.0)  # no key: zeros


def random_qkv(B, Hq, Hkv, L, T, D, dtype, seed=0, capacity=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, D)).astype(dtype)
    # A preallocated cache: the kernel reads a strided view of its first T rows.
    cache = rng.standard_normal((2, B, Hkv, capacity or T, D)).astype(dtype)
    return q, cache[0][:, :, :T], cache[1][:, :, :T]


def assert_close(out, ref, dtype):
    if dtype == np.float16:
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def attention():
    return da.build(mslsim.metal_kernel)


# (B, Hq, Hkv, L, T, D, dtype, options): every tail the kernel has.
SHAPES = {
    "one key": (1, 9, 3, 1, 1, 64, np.float32, {}),
    "fewer keys than a SIMD group": (1, 4, 1, 2, 17, 80, np.float16, {}),
    "keys not a multiple of 32": (1, 8, 1, 1, 333, 96, np.float32, {}),
    "gqa 8 head dim 128": (1, 16, 2, 1, 70, 128, np.float16, {}),
    "no gqa, batch 2, 8 queries": (2, 2, 2, 8, 100, 128, np.float32, {}),
    "long context, two passes": (1, 9, 3, 1, 3001, 64, np.float32, {}),
    "two passes, float16, 3 queries": (1, 6, 2, 3, 1100, 96, np.float16, {}),
    "small forced key blocks": (2, 3, 1, 2, 200, 80, np.float32, dict(keys_per_block=48)),
    "sliding window": (1, 8, 2, 4, 200, 64, np.float32, dict(window=32)),
    "window over split blocks": (1, 3, 3, 2, 1500, 64, np.float16, dict(window=700)),
    "producer above: no diagonal, first tokens": (
        1, 6, 2, 5, 5, 64, np.float32, dict(mask_kind="no_diagonal", offset=0)),
    "producer above: no diagonal, decode": (1, 6, 2, 1, 77, 64, np.float32, dict(mask_kind="no_diagonal")),
    "no mask": (2, 4, 2, 3, 45, 64, np.float32, dict(mask_kind="none")),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_float64_reference(case, attention, clang):
    B, Hq, Hkv, L, T, D, dtype, options = SHAPES[case]
    q, k, v = random_qkv(B, Hq, Hkv, L, T, D, dtype, capacity=T + 13)
    out = attention(q, k, v, scale=D**-0.5, **options)
    assert out.shape == q.shape and out.dtype == dtype
    options.pop("keys_per_block", None)
    assert_close(out, reference(q, k, v, D**-0.5, **options), dtype)


@pytest.mark.parametrize("L", range(1, 9))
def test_every_query_count_up_to_8(L, attention, clang):
    q, k, v = random_qkv(1, 6, 2, L, 41, 64, np.float32, seed=L)
    assert_close(attention(q, k, v, scale=0.125), reference(q, k, v, 0.125), np.float32)


def test_bfloat16(attention, clang):
    """The default dtype on Apple silicon; numpy has no bfloat16, so mx arrays go in.
    Tolerance 1e-2: the output is rounded to bfloat16."""
    q, k, v = (mx.array(a).astype(mx.bfloat16) for a in random_qkv(1, 9, 3, 2, 77, 64, np.float32))
    out = attention(q, k, v, scale=0.125)
    ref = reference(*(np.array(a.astype(mx.float32)) for a in (q, k, v)), 0.125)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_first_token_of_a_no_diagonal_layer_attends_to_nothing(attention, clang):
    q, k, v = random_qkv(1, 4, 2, 3, 3, 64, np.float32)
    out = attention(q, k, v, scale=0.125, mask_kind="no_diagonal", offset=0)
    assert (out[:, :, 0] == 0).all()
    np.testing.assert_allclose(out[:, :, 1], np.repeat(v[:, :, 0], 2, axis=1), rtol=1e-6)


def test_masks_agree_with_the_model(attention, clang):
    """no_diagonal is the model's _attend_to_earlier_tokens; window is mlx-lm's sliding-window mask."""
    from types import SimpleNamespace

    from mlx_lm.models.base import create_causal_mask

    from echo_mlx.models.model import Attention

    q, k, v = random_qkv(1, 6, 2, 3, 40, 64, np.float32)
    offset = 37
    earlier = Attention._attend_to_earlier_tokens(SimpleNamespace(scale=0.125), *map(mx.array, (q, k, v)), None, offset)
    np.testing.assert_allclose(attention(q, k, v, scale=0.125, mask_kind="no_diagonal"), earlier, rtol=1e-5, atol=1e-6)
    mask = create_causal_mask(3, offset, window_size=16)
    windowed = mx.fast.scaled_dot_product_attention(*map(mx.array, (q, k, v)), scale=0.125, mask=mask)
    np.testing.assert_allclose(attention(q, k, v, scale=0.125, window=16), windowed, rtol=1e-5, atol=1e-6)


def test_output_is_schedule_and_poison_independent(attention, clang):
    q, k, v = random_qkv(1, 9, 3, 2, 700, 64, np.float32)
    out = mslsim.run_schedules(lambda: attention(q, k, v, scale=0.125, keys_per_block=256))
    assert_close(out, reference(q, k, v, 0.125), np.float32)


@pytest.mark.parametrize("mode", ["asan", "tsan"])
def test_small_case_is_clean_under_sanitizers(mode, clang):
    # 4 SIMD groups = 128 threads: ThreadSanitizer misses races above ~200 fibers.
    attention = da.build(mslsim.metal_kernel, simd_groups=4)
    q, k, v = random_qkv(1, 4, 2, 2, 45, 80, np.float16, capacity=50)
    with mslsim.settings(mode=mode, strict=True):
        single = attention(q, k, v, scale=0.1)
        split = attention(q, k, v, scale=0.1, keys_per_block=16)
    assert_close(single, reference(q, k, v, 0.1), np.float16)
    assert_close(split, reference(q, k, v, 0.1), np.float16)


# ------------------------------------------------------------- planted bugs

BUGS = {
    "missing barrier before the cross-SIMD merge": (
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (int r = 0; r < R; r++) {",
        "  for (int r = 0; r < R; r++) {"),
    "missing barrier before summing the SIMD groups' outputs": (
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    const int l = l0", "    const int l = l0"),
    "off-by-one key tail": ("t <= last; t += NSG", "t <= last + 1; t += NSG"),
    "off-by-one head-dim tail": ("kr[i] = d < D ?", "kr[i] = d <= D ?"),
    "window one key too wide": ("pos - mask[3] + 1", "pos - mask[3]"),
    "barrier inside divergent code": (  # only lane 0 of each SIMD group gets there
        "      group_sum[sg][r] = s[r];\n",
        "      group_sum[sg][r] = s[r];\n      threadgroup_barrier(mem_flags::mem_threadgroup);\n"),
}


def survives(factory):
    """True if the kernel passes every check the correct one passes."""
    attention = da.build(factory, simd_groups=4)
    q, k, v = random_qkv(1, 6, 2, 3, 150, 80, np.float32, capacity=150)
    try:
        for options in (dict(window=40), dict(keys_per_block=64)):
            out = mslsim.run_schedules(lambda: attention(q, k, v, scale=0.1, **options), strict=True)
            options.pop("keys_per_block", None)
            np.testing.assert_allclose(out, reference(q, k, v, 0.1, **options), rtol=1e-5, atol=1e-6)
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


def sdpa_vector_kv_bytes(B, Hq, L, T, D, itemsize):
    """K+V bytes MLX's sdpa_vector reads: every query head and position re-reads its kv head."""
    return B * Hq * L * T * D * 2 * itemsize


@pytest.mark.parametrize("dtype, T", [(np.float32, 100), (np.float16, 1500)])
def test_each_kv_byte_is_loaded_once_per_kv_head_group(dtype, T, attention, clang):
    B, Hq, Hkv, D = 2, 9, 3, 64
    q, k, v = random_qkv(B, Hq, Hkv, 1, T, D, dtype)
    with mslsim.settings(count_loads=True) as session:
        attention(q, k, v, scale=0.125)
    loaded = session.launches[0].bytes_loaded
    cache_bytes = B * Hkv * T * D * 2 * np.dtype(dtype).itemsize
    assert loaded["k"] + loaded["v"] == cache_bytes
    assert sdpa_vector_kv_bytes(B, Hq, 1, T, D, np.dtype(dtype).itemsize) == (Hq // Hkv) * cache_bytes


def test_a_sliding_window_loads_only_the_window(attention, clang):
    q, k, v = random_qkv(1, 4, 2, 1, 500, 64, np.float32)
    with mslsim.settings(count_loads=True) as session:
        attention(q, k, v, scale=0.125, window=64)
    loaded = session.launches[0].bytes_loaded
    assert loaded["k"] + loaded["v"] == 2 * 64 * 64 * 2 * 4


# ------------------------------------------------------- layout, MLX source


def test_plan_splits_long_contexts_and_many_rows():
    assert da.plan((1, 9, 1, 64), (1, 3, 512, 64)).blocks == 1
    long = da.plan((1, 9, 1, 64), (1, 3, 32768, 64))
    assert long.two_pass and long.blocks * long.keys_per_block >= 32768 and long.blocks <= da.MAX_BLOCKS
    rows = da.plan((1, 64, 8, 128), (1, 8, 100, 128))  # G 8 x L 8 rows do not fit at once
    assert rows.queries_per_group == 1 and rows.query_chunks == 8
    assert da.plan((1, 8, 1, 64), (1, 2, 4000, 64), window=100).blocks == 1  # only the window counts
    with pytest.raises(ValueError, match="multiple of kv heads"):
        da.plan((1, 9, 1, 64), (1, 2, 10, 64))
    with pytest.raises(ValueError, match="mask_kind"):
        da.plan((1, 2, 1, 64), (1, 2, 10, 64), mask_kind="bidirectional")


def test_generated_source_is_byte_identical_to_mlx(capfd, tmp_path, clang):
    q, k, v = random_qkv(1, 6, 2, 2, 700, 80, np.float16)
    split = dict(keys_per_block=256)
    mx_attention = da.build(verbose_factory(mx.fast.metal_kernel))
    try:
        mx.export_function(str(tmp_path / "f.mlxfn"), lambda *a: mx_attention(*a, scale=0.1, **split),
                           *(mx.array(a) for a in (q, k, v)))
    except RuntimeError as e:
        if "Metal" in str(e):
            pytest.skip(f"this mlx build cannot trace metal_kernel without Metal: {e}")
        raise
    expected = capfd.readouterr().out
    da.build(verbose_factory(mslsim.metal_kernel))(q, k, v, scale=0.1, **split)
    generated = capfd.readouterr().out
    assert expected.count("Generated source code") == 2  # key blocks, then the merge
    assert generated == expected
