"""The EchoAtt P V kernel (a reusing layer: its source's probabilities times its own V), run on
the CPU under mslsim. Tolerances against a float64 numpy reference as in test_kernels.py."""

import mlx.core as mx
import numpy as np
import pytest

import mslsim
from echo_mlx.kernels import apply_probabilities as ap
from mslsim.testing import mutated, require_clang
from test_kernels import assert_close


@pytest.fixture
def clang():
    require_clang()


def reference(p, v):
    p, v = np.asarray(p, np.float64), np.asarray(v, np.float64)
    B, Hkv, G, L, S = p.shape
    return (p @ v[:, :, None]).reshape(B, Hkv * G, L, -1)


def random_pv(B, Hkv, G, L, S, D, dtype, seed=0, capacity=None):
    """Probabilities as a softmax writes them (rows sum to 1, masked keys exactly 0) and a
    strided V view: the valid part of a preallocated cache."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((B, Hkv, G, L, S)) * 3
    scores[..., S - L + np.arange(L)[:, None] < np.arange(S)] = -np.inf  # causal, newest queries
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(dtype)
    v = rng.standard_normal((B, Hkv, capacity or S, D)).astype(dtype)[:, :, :S]
    return p, v


@pytest.fixture(scope="module")
def apply():
    return ap.build(mslsim.metal_kernel)


# (B, Hkv, G, L, S, D, dtype, options)
SHAPES = {
    "one key": (1, 3, 3, 1, 1, 64, np.float32, {}),
    "SmolLM2 decode": (1, 3, 3, 1, 300, 64, np.float32, {}),
    "fewer keys than a SIMD group, float16": (1, 1, 4, 2, 17, 80, np.float16, {}),
    "keys not a multiple of 32, head dim 96": (2, 1, 8, 1, 333, 96, np.float32, {}),
    "gqa 8, head dim 128": (1, 2, 8, 1, 70, 128, np.float16, {}),
    "no gqa, 8 queries": (2, 2, 1, 8, 100, 128, np.float32, {}),
    "long context, two passes": (1, 3, 3, 1, 3001, 64, np.float32, {}),
    "two passes, float16, 3 queries": (1, 2, 3, 3, 1100, 96, np.float16, {}),
    "small forced key blocks": (2, 1, 3, 2, 200, 80, np.float32, dict(keys_per_block=48)),
    "head dim below a SIMD width": (1, 2, 2, 2, 50, 16, np.float32, {}),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_float64_reference(case, apply, clang):
    B, Hkv, G, L, S, D, dtype, options = SHAPES[case]
    p, v = random_pv(B, Hkv, G, L, S, D, dtype, capacity=S + 13)
    out = apply(p, v, **options)
    assert out.shape == (B, Hkv * G, L, D) and out.dtype == dtype
    assert_close(out, reference(p, v), dtype)


@pytest.mark.parametrize("L", range(1, 9))
def test_every_query_count_up_to_8(L, apply, clang):
    p, v = random_pv(1, 3, 3, L, 41, 64, np.float32, seed=L)
    assert_close(apply(p, v), reference(p, v), np.float32)


def test_bfloat16(apply, clang):
    p, v = (mx.array(a).astype(mx.bfloat16) for a in random_pv(1, 3, 3, 2, 77, 64, np.float32))
    out = apply(p, v)
    ref = reference(*(np.array(a.astype(mx.float32)) for a in (p, v)))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_equals_the_models_ops_path(apply, clang):
    """The model's _apply_probabilities on the probabilities its _probabilities computes."""
    from echo_mlx.models.model import _apply_probabilities, _probabilities

    rng = np.random.default_rng(3)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32)) for shape in
               [(1, 9, 1, 64), (1, 3, 90, 64), (1, 3, 90, 64)])
    probabilities = _probabilities(q, k, 0.125, None, None)
    np.testing.assert_allclose(apply(probabilities, v), _apply_probabilities(probabilities, v, None), rtol=1e-5, atol=1e-6)


def test_output_is_schedule_and_poison_independent(apply, clang):
    p, v = random_pv(1, 3, 3, 2, 700, 64, np.float32)
    out = mslsim.run_schedules(lambda: apply(p, v, keys_per_block=256))
    assert_close(out, reference(p, v), np.float32)


@pytest.mark.parametrize("mode", ["asan", "tsan"])
def test_small_case_is_clean_under_sanitizers(mode, clang):
    apply = ap.build(mslsim.metal_kernel, simd_groups=4)
    p, v = random_pv(1, 2, 2, 2, 45, 80, np.float16, capacity=50)
    with mslsim.settings(mode=mode, strict=True):
        single = apply(p, v)
        split = apply(p, v, keys_per_block=16)
    assert_close(single, reference(p, v), np.float16)
    assert_close(split, reference(p, v), np.float16)


# ------------------------------------------------------------- planted bugs

BUGS = {
    "missing barrier before summing the SIMD groups' rows": (
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    const int l = l0", "    const int l = l0"),
    "missing barrier before the next row overwrites the sums": (
        "    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n", "    }\n  }\n"),
    "off-by-one key tail": ("t <= last; t += NSG", "t <= last + 1; t += NSG"),
    "key blocks overlap by one key": ("min(first + keys_per_block, n_keys)", "min(first + keys_per_block + 1, n_keys)"),
    "another row's probability": ("simd_shuffle(mine, r)", "simd_shuffle(mine, r / LQ)"),
}


def survives(factory):
    """True if the kernel passes every check the correct one passes."""
    apply = ap.build(factory, simd_groups=4)
    p, v = random_pv(1, 2, 3, 3, 150, 80, np.float32, capacity=150)
    try:
        for options in (dict(), dict(keys_per_block=64)):
            out = mslsim.run_schedules(lambda: apply(p, v, **options), strict=True)
            np.testing.assert_allclose(out, reference(p, v), rtol=1e-5, atol=1e-6)
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


@pytest.mark.parametrize("dtype, S", [(np.float32, 100), (np.float16, 1500)])
def test_v_and_p_are_read_once_and_no_keys_at_all(dtype, S, apply, clang):
    """V once per kv head (not once per query head), P once, and K is not an input."""
    B, Hkv, G, D = 2, 3, 3, 64
    p, v = random_pv(B, Hkv, G, 1, S, D, dtype)
    with mslsim.settings(count_loads=True) as session:
        apply(p, v)
    launch = session.launches[0]  # a long context adds a second launch that sums the key blocks
    itemsize = np.dtype(dtype).itemsize
    assert launch.bytes_loaded["v"] == B * Hkv * S * D * itemsize
    assert launch.bytes_loaded["p"] == B * Hkv * G * S * itemsize
    assert set(launch.bytes_loaded) <= {"p", "v", "keys_per_block"}  # no keys: K is not even an input
    assert len(session.launches) == (2 if S > 512 else 1)


# ------------------------------------------------------------ quantized V


def quantized_v(v, bits, group_size):
    """mx.quantize's tuple of v, and what it dequantizes to (the reference's V)."""
    packed = mx.quantize(mx.array(v), group_size=group_size, bits=bits)
    return packed, np.array(mx.dequantize(*packed, group_size=group_size, bits=bits))


# (B, Hkv, G, L, S, D, bits, group size, options)
QUANTIZED = {
    "SmolLM2 decode, 8-bit": (1, 3, 3, 1, 300, 64, 8, 64, {}),
    "SmolLM2 decode, 4-bit groups of 32": (1, 3, 3, 1, 300, 64, 4, 32, {}),
    "head dim 128, gqa 4, 3 queries": (2, 2, 4, 3, 90, 128, 4, 64, {}),
    "head dim 32, 8 queries": (1, 1, 2, 8, 40, 32, 8, 32, {}),
    "head dim 256, 4-bit groups of 128": (1, 1, 2, 1, 50, 256, 4, 128, {}),
    "two passes": (1, 3, 3, 1, 1500, 64, 8, 64, {}),
    "small forced key blocks": (1, 2, 3, 2, 200, 64, 4, 64, dict(keys_per_block=48)),
}


@pytest.mark.parametrize("case", list(QUANTIZED))
def test_quantized_v_matches_float64_reference(case, apply, clang):
    B, Hkv, G, L, S, D, bits, group_size, options = QUANTIZED[case]
    p, v = random_pv(B, Hkv, G, L, S, D, np.float32)
    packed, dequantized = quantized_v(v, bits, group_size)
    out = apply(p, packed, bits=bits, group_size=group_size, **options)
    assert out.shape == (B, Hkv * G, L, D)
    np.testing.assert_allclose(out, reference(p, dequantized), rtol=1e-5, atol=1e-5)


def test_quantized_v_equals_the_models_ops_path(apply, clang):
    """mlx-lm's quantized cache layout through the model's _apply_probabilities (quantized_matmul)."""
    from types import SimpleNamespace

    from echo_mlx.models.model import _apply_probabilities

    p, v = random_pv(1, 3, 3, 2, 120, 64, np.float32)
    packed, _ = quantized_v(v, 4, 64)
    ops = _apply_probabilities(mx.array(p), packed, SimpleNamespace(bits=4, group_size=64))
    np.testing.assert_allclose(apply(p, packed, bits=4, group_size=64), ops, rtol=1e-5, atol=1e-5)


def test_quantized_small_case_is_clean_under_sanitizers(clang):
    apply = ap.build(mslsim.metal_kernel, simd_groups=4)
    p, v = random_pv(1, 2, 2, 2, 45, 64, np.float32)
    packed, dequantized = quantized_v(v, 8, 32)
    for mode in ("asan", "tsan"):
        with mslsim.settings(mode=mode, strict=True):
            out = apply(p, packed, bits=8, group_size=32, keys_per_block=16)
        np.testing.assert_allclose(out, reference(p, dequantized), rtol=1e-5, atol=1e-5)


QUANTIZED_BUGS = {
    "probability from the first walker's lanes": ("walker_lane0 + r % LPK", "r % LPK"),
    "missing barrier before summing the walkers' rows": (
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    const int l = l0 + r % LQ;\n    const int q_row = (b * Hq + h * G + r / LQ) * L + l;\n    if",
        "    const int l = l0 + r % LQ;\n    const int q_row = (b * Hq + h * G + r / LQ) * L + l;\n    if"),
    "off-by-one key tail": ("const bool live = t <= last;", "const bool live = t <= last + 1;"),
}


def quantized_survives(factory):
    apply = ap.build(factory, simd_groups=4)
    p, v = random_pv(1, 2, 3, 3, 150, 64, np.float32)
    packed, dequantized = quantized_v(v, 4, 32)
    try:
        for options in (dict(), dict(keys_per_block=64)):
            out = mslsim.run_schedules(lambda: apply(p, packed, bits=4, group_size=32, **options), strict=True)
            np.testing.assert_allclose(out, reference(p, dequantized), rtol=1e-5, atol=1e-5)
    except (mslsim.SimulatorError, AssertionError):
        return False
    return True


def test_the_quantized_bug_checks_pass_the_correct_kernel(clang):
    assert quantized_survives(mslsim.metal_kernel)


@pytest.mark.parametrize("bug", list(QUANTIZED_BUGS))
def test_planted_quantized_bug_is_caught(bug, clang):
    factory = mutated(mslsim.metal_kernel, *QUANTIZED_BUGS[bug])
    assert not quantized_survives(factory)
    assert factory.hits, "the planted bug no longer matches the kernel source"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_v_words_scales_and_biases_are_read_once(bits, apply, clang):
    B, Hkv, G, S, D, group_size = 2, 3, 3, 100, 64, 32
    p, v = random_pv(B, Hkv, G, 1, S, D, np.float32)
    packed, _ = quantized_v(v, bits, group_size)
    with mslsim.settings(count_loads=True) as session:
        apply(p, packed, bits=bits, group_size=group_size)
    loaded = session.launches[0].bytes_loaded
    assert loaded["v"] == B * Hkv * S * D * bits // 8
    assert loaded["v_scales"] == loaded["v_biases"] == B * Hkv * S * (D // group_size) * 4
    assert loaded["p"] == B * Hkv * G * S * 4
    assert set(loaded) <= {"p", "v", "v_scales", "v_biases", "keys_per_block"}


def test_plan_splits_long_contexts_and_refuses_mismatches():
    assert ap.plan((1, 3, 3, 1, 512), (1, 3, 512, 64)).blocks == 1
    long = ap.plan((1, 3, 3, 1, 32768), (1, 3, 32768, 64))
    assert long.blocks > 1 and long.blocks * long.keys_per_block >= 32768
    assert ap.plan((1, 8, 8, 8, 100), (1, 8, 100, 128)).queries_per_group * 8 <= ap.MAX_ROWS
    with pytest.raises(ValueError, match="do not fit values"):
        ap.plan((1, 3, 3, 1, 10), (1, 3, 11, 64))
