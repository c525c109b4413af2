"""mslsim, the CPU simulator for mx.fast.metal_kernel bodies: its generated
source, GPU semantics, poison, guards, sanitizers and failure reports."""

import mlx.core as mx
import numpy as np
import pytest

import mslsim
from mslsim.generate import verbose_text
from mslsim.testing import require_clang


@pytest.fixture
def clang():
    require_clang()


def kernel(source, inputs=("x",), outputs=("out",), **kwargs):
    return mslsim.metal_kernel("t", list(inputs), list(outputs), source, **kwargs)


def run1(k, inputs, n, dtype=np.float32, threadgroup=64, grid=None, **kwargs):
    grid = grid or (n, 1, 1)
    return k(inputs=inputs, grid=grid, threadgroup=(threadgroup, 1, 1), output_shapes=[(n,)],
             output_dtypes=[dtype], **kwargs)[0]


# ---------------------------------------------------------------- generation


def mlx_text(capfd, tmp_path, make_kernel, call, *args):
    """What MLX prints for verbose=True while mx.export_function traces `call`."""
    k = make_kernel(mx.fast)
    try:
        mx.export_function(str(tmp_path / "f.mlxfn"), lambda *a: call(k, *a, verbose=True), *args)
    except RuntimeError as e:  # older mlx cannot trace a Metal kernel without Metal
        if "Metal" in str(e):
            pytest.skip(f"this mlx build cannot trace metal_kernel without Metal: {e}")
        raise
    return capfd.readouterr().out


GENERATION_CASES = {
    # the example in mx.fast.metal_kernel's docstring
    "docs example": (
        dict(name="myexp", input_names=["inp"], output_names=["out"],
             source="uint elem = thread_position_in_grid.x;\nT tmp = inp[elem];\nout[elem] = metal::exp(tmp);"),
        dict(template=[("T", mx.float16)], grid=(64, 1, 1), threadgroup=(32, 1, 1)),
        [((64,), mx.float16)],
    ),
    # all three template kinds, scalars, a small (constant) array, shape/strides/ndim, header
    "everything": (
        dict(name="mix", input_names=["a", "b", "c", "n"], output_names=["out", "out2"], header="// helpers\n",
             source="uint i = thread_position_in_grid.x + simdgroup_index_in_threadgroup;\n"
                    "out[i] = a[i] * b + c[0] + a_shape[0] + a_strides[0] + a_ndim + n + threads_per_simdgroup;\n"
                    "out2[i] = c_shape[0];"),
        dict(template=[("T", mx.float32), ("N", 3), ("F", True)], grid=(32, 1, 1), threadgroup=(32, 1, 1)),
        [((8, 4), mx.float16), 2.5, ((4,), mx.int32), 7],
    ),
    # no template, no attributes, two outputs after shape buffers (MLX's comma logic), atomics
    "atomic outputs": (
        dict(name="plain", input_names=["x"], output_names=["out", "count"], atomic_outputs=True,
             source="atomic_fetch_add_explicit(&out[0], x[0] + x_shape[0], memory_order_relaxed);"),
        dict(grid=(1, 1, 1), threadgroup=(1, 1, 1)),
        [((16,), mx.float32)],
    ),
}


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generated_source_is_byte_identical_to_mlx(case, capfd, tmp_path):
    make_args, call_args, specs = GENERATION_CASES[case]
    outs = len(make_args["output_names"])
    mx_inputs = [mx.zeros(s[0], dtype=s[1]) if isinstance(s, tuple) else s for s in specs]
    np_inputs = [np.zeros(s[0], dtype=str(s[1]).split(".")[-1]) if isinstance(s, tuple) else s for s in specs]
    out_dtypes = [mx.float32, mx.int32][:outs]

    def call(k, *arrays, verbose):
        return k(inputs=list(arrays), output_shapes=[(16,)] * outs, output_dtypes=out_dtypes,
                 verbose=verbose, **call_args)

    array_args = [a for a in mx_inputs if isinstance(a, mx.array)]
    scalars = [a for a in mx_inputs if not isinstance(a, mx.array)]

    def traced(k, *arrays, verbose):  # export_function takes arrays only: put the scalars back
        it, full = iter(arrays), []
        for a in mx_inputs:
            full.append(next(it) if isinstance(a, mx.array) else a)
        return call(k, *full, verbose=verbose)

    assert len(scalars) + len(array_args) == len(mx_inputs)
    expected = mlx_text(capfd, tmp_path, lambda fast: fast.metal_kernel(**make_args), traced, *array_args)
    generated = mslsim.metal_kernel(**make_args).generate(np_inputs, out_dtypes, call_args.get("template"))
    assert verbose_text(make_args["name"], generated.text) == expected


# ------------------------------------------------------------ GPU semantics


def test_elementwise_kernel_matches_numpy_in_partial_edge_groups(clang):
    k = kernel("uint i = thread_position_in_grid.x;\nout[i] = T(metal::exp(float(x[i])));")
    for dtype in (np.float32, np.float16):
        x = np.linspace(-3, 3, 100).astype(dtype)
        out = run1(k, [x], 100, dtype, template=[("T", dtype)])  # groups of 64 and 36
        expected = np.exp(x.astype(np.float32)).astype(dtype)
        np.testing.assert_allclose(out, expected, rtol=1e-3 if dtype == np.float16 else 1e-6)


def test_thread_attributes_describe_partial_edge_groups(clang):
    source = """
    uint i = thread_position_in_grid.x;
    device int* row = out + i * 8;
    row[0] = thread_index_in_threadgroup;
    row[1] = simdgroup_index_in_threadgroup;
    row[2] = thread_index_in_simdgroup;
    row[3] = threads_per_threadgroup.x;
    row[4] = dispatch_threads_per_threadgroup.x;
    row[5] = threadgroup_position_in_grid.x;
    row[6] = simdgroups_per_threadgroup;
    row[7] = threadgroups_per_grid.x;
    """
    k = kernel(source, inputs=())
    out = k(inputs=[], grid=(100, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(100, 8)], output_dtypes=[np.int32])[0]
    i = np.arange(100)
    np.testing.assert_array_equal(out[:, 0], i % 64)
    np.testing.assert_array_equal(out[:, 1], (i % 64) // 32)
    np.testing.assert_array_equal(out[:, 2], i % 32)
    np.testing.assert_array_equal(out[:, 3], np.where(i < 64, 64, 36))  # the edge group is partial
    np.testing.assert_array_equal(out[:, 4], 64)
    np.testing.assert_array_equal(out[:, 5], i // 64)
    np.testing.assert_array_equal(out[:, 6], 2)  # 36 threads still make 2 SIMD groups
    np.testing.assert_array_equal(out[:, 7], 2)


def test_simd_operations_match_numpy(clang):
    source = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    device float* row = out + i * 7;
    row[0] = simd_sum(v);
    row[1] = simd_max(v);
    row[2] = simd_prefix_exclusive_sum(v);
    row[3] = simd_shuffle_down(v, 1);
    row[4] = simd_shuffle_xor(v, 5);
    row[5] = simd_broadcast(v, 3);
    row[6] = quad_sum(v);
    """
    x = np.random.default_rng(0).integers(-50, 50, 96).astype(np.float32)  # exact sums
    out = kernel(source)(inputs=[x], grid=(96, 1, 1), threadgroup=(96, 1, 1), output_shapes=[(96, 7)],
                         output_dtypes=[np.float32])[0]
    lanes = x.reshape(3, 32)
    lane = np.arange(32)
    expect = np.stack([
        np.repeat(lanes.sum(1), 32),
        np.repeat(lanes.max(1), 32),
        (np.cumsum(lanes, 1) - lanes).ravel(),
        np.where(lane + 1 < 32, lanes[:, np.minimum(lane + 1, 31)], lanes).ravel(),
        lanes[:, lane ^ 5].ravel(),
        np.repeat(lanes[:, 3], 32),
        np.repeat(lanes.reshape(3, 8, 4).sum(2), 4),
    ], axis=1)
    np.testing.assert_array_equal(out, expect)


def test_simd_sum_in_divergent_code_sums_the_active_lanes_only(clang):
    source = """
    uint lane = thread_index_in_simdgroup;
    out[lane] = lane < 10 ? simd_sum(x[lane]) : -1.0f;
    """
    x = np.arange(32, dtype=np.float32)
    out = run1(kernel(source), [x], 32, threadgroup=32)
    np.testing.assert_array_equal(out, np.where(np.arange(32) < 10, x[:10].sum(), -1))


def test_half_arithmetic_rounds_each_operation_like_numpy(clang):
    k = kernel("uint i = thread_position_in_grid.x;\nout[i] = x[i] * y[i] + z[i];", inputs=("x", "y", "z"))
    rng = np.random.default_rng(1)
    x, y, z = (rng.standard_normal(256).astype(np.float16) for _ in range(3))
    out = run1(k, [x, y, z], 256, np.float16)
    assert out.tobytes() == (x * y + z).tobytes()


def test_bfloat16_inputs_and_outputs_round_like_mlx(clang):
    # float -> bfloat16 needs compiler-rt's __truncsfbf2 (absent from libgcc before GCC 13).
    k = kernel("uint i = thread_position_in_grid.x;\nout[i] = x[i] * x[i] + 1.0f;")
    x = mx.random.normal((256,)).astype(mx.bfloat16)
    out = run1(k, [x], 256, mx.bfloat16)
    assert out.dtype == np.float32  # bfloat16 values come back as float32
    np.testing.assert_array_equal(out, np.array((x * x + 1.0).astype(mx.float32)))


def test_atomic_outputs_count_across_threadgroups(clang):
    source = "atomic_fetch_add_explicit(&hist[x[thread_position_in_grid.x]], 1, memory_order_relaxed);"
    x = np.random.default_rng(2).integers(0, 10, 1000).astype(np.int32)
    k = kernel(source, outputs=("hist",), atomic_outputs=True)
    hist = run1(k, [x], 10, np.int32, threadgroup=128, grid=(1000, 1, 1), init_value=0)
    np.testing.assert_array_equal(hist, np.bincount(x, minlength=10))


def test_strided_inputs_pass_their_strides_when_not_made_contiguous(clang):
    source = """
    uint r = thread_position_in_grid.y, c = thread_position_in_grid.x;
    out[r * x_shape[1] + c] = x[r * x_strides[0] + c * x_strides[1]];
    """
    big = np.arange(8 * 10, dtype=np.float32).reshape(8, 10)
    x = big[1:7, ::3]
    k = kernel(source, ensure_row_contiguous=False)
    out = k(inputs=[x], grid=(x.shape[1], x.shape[0], 1), threadgroup=(4, 4, 1), output_shapes=[x.shape],
            output_dtypes=[np.float32])[0]
    np.testing.assert_array_equal(out, x)


def test_load_counting_is_exact_per_buffer(clang):
    k = kernel("uint i = thread_position_in_grid.x;\nout[i] = x[i] + x[(i + 1) % 100];", inputs=("x", "unused"))
    x = np.ones(100, np.float32)
    with mslsim.settings(count_loads=True) as session:
        run1(k, [x, np.ones(50, np.float32)], 100)
    assert session.launches[0].bytes_loaded == {"x": 2 * 100 * 4, "unused": 0}


# ------------------------------------------------------------------ poison

UNWRITTEN_THREADGROUP_READ = """
    threadgroup float scratch[64];
    uint i = thread_index_in_threadgroup;
    if (i < 32) scratch[i] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = scratch[63 - i];  // the upper half was never written
"""


def test_threadgroup_memory_starts_poisoned(clang):
    k = kernel(UNWRITTEN_THREADGROUP_READ)
    x = np.ones(64, np.float32)
    assert np.isnan(run1(k, [x], 64)[:32]).all()
    with mslsim.settings(poison=0x7F):
        assert (run1(k, [x], 64)[:32] > 1e38).all()
    with pytest.raises(mslsim.ScheduleDependence, match="poison 0x7F"):
        mslsim.run_schedules(lambda: run1(k, [x], 64))


def test_outputs_are_poisoned_unless_init_value(clang):
    k = kernel("uint i = thread_position_in_grid.x;\nif (i % 2 == 0) out[i] = 1.0f;")
    out = run1(k, [np.ones(1, np.float32)], 8)
    assert np.isnan(out[1::2]).all() and (out[::2] == 1).all()
    np.testing.assert_array_equal(run1(k, [np.ones(1, np.float32)], 8, init_value=5.0)[1::2], 5)


# --------------------------------------------------------- faults reported

REVERSE = """
    threadgroup float buf[128];
    uint i = thread_index_in_threadgroup, n = threads_per_threadgroup.x;
    buf[i] = x[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = buf[n - 1 - i];
"""


def reverse_in_groups(source, n=256, tg=128):
    x = np.arange(n, dtype=np.float32)
    return run1(kernel(source), [x], n, threadgroup=tg)


def test_correct_barrier_kernel_is_schedule_independent(clang):
    out = mslsim.run_schedules(lambda: reverse_in_groups(REVERSE))
    np.testing.assert_array_equal(out, np.arange(256).reshape(2, 128)[:, ::-1].ravel())


def test_missing_barrier_is_caught_by_schedules_and_by_tsan(clang):
    racy = REVERSE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    with pytest.raises(mslsim.ScheduleDependence):
        mslsim.run_schedules(lambda: reverse_in_groups(racy))
    with mslsim.settings(mode="tsan"), pytest.raises(mslsim.SanitizerReport, match="data race"):
        reverse_in_groups(racy)


def test_tsan_sees_that_a_mem_none_barrier_orders_no_memory(clang):
    weak = REVERSE.replace("mem_flags::mem_threadgroup", "mem_flags::mem_none")
    mslsim.run_schedules(lambda: reverse_in_groups(weak))  # execution order alone hides it
    with mslsim.settings(mode="tsan"):
        reverse_in_groups(REVERSE)  # no false positive
        with pytest.raises(mslsim.SanitizerReport, match="data race"):
            reverse_in_groups(weak)


def test_divergent_barrier_is_an_error(clang):
    source = REVERSE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);",
                             "if (i < 32) { threadgroup_barrier(mem_flags::mem_threadgroup); }\n"
                             "    threadgroup_barrier(mem_flags::mem_threadgroup);")
    with pytest.raises(mslsim.KernelFault, match="divergent threadgroup_barrier"):
        reverse_in_groups(source)


def test_barrier_after_an_early_return_warns_and_fails_when_strict(clang):
    source = "uint i = thread_index_in_threadgroup;\nif (i >= 40) return;\n" \
             "threadgroup_barrier(mem_flags::mem_threadgroup);\nout[i] = 1.0f;"
    with pytest.warns(UserWarning, match="returned threads never reach"):
        run1(kernel(source), [np.ones(1, np.float32)], 64)
    with mslsim.settings(strict=True), pytest.raises(mslsim.KernelFault, match="never reach"):
        run1(kernel(source), [np.ones(1, np.float32)], 64)


def test_spinning_on_a_flag_nobody_sets_is_a_deadlock(clang):
    source = "while (atomic_load_explicit(&flag[0], memory_order_relaxed) == 0) {}"
    k = kernel(source, inputs=(), outputs=("flag",), atomic_outputs=True)
    with pytest.raises(mslsim.KernelFault, match="deadlock"):
        k(inputs=[], grid=(2, 1, 1), threadgroup=(2, 1, 1), output_shapes=[(1,)], output_dtypes=[np.int32],
          init_value=0)


def test_writing_past_an_output_hits_its_guard_and_asan(clang):
    k = kernel("uint i = thread_position_in_grid.x;\nout[i + 1] = x[i];")
    x = np.ones(64, np.float32)
    with pytest.raises(mslsim.KernelFault, match="written after its end"):
        run1(k, [x], 64)
    with mslsim.settings(mode="asan"), pytest.raises(mslsim.SanitizerReport, match="heap-buffer-overflow"):
        run1(k, [x], 64)


def test_reading_past_an_input_reads_poison_and_trips_asan(clang):
    k = kernel("uint i = thread_position_in_grid.x;\nout[i] = x[i + 1];")
    x = np.ones(64, np.float32)
    assert np.isnan(run1(k, [x], 64)[-1])
    with mslsim.settings(mode="asan"), pytest.raises(mslsim.SanitizerReport, match="heap-buffer-overflow"):
        run1(k, [x], 64)


def test_threadgroup_array_overrun_is_reported(clang):
    source = "threadgroup float buf[32];\nuint i = thread_index_in_threadgroup;\nbuf[i] = 1.0f;\n" \
             "threadgroup_barrier(mem_flags::mem_threadgroup);\nout[i] = buf[i % 32];"
    with pytest.raises(mslsim.KernelFault, match="written past its end"):
        run1(kernel(source), [np.ones(1, np.float32)], 40)
    with mslsim.settings(mode="asan"), pytest.raises(mslsim.SanitizerReport):
        run1(kernel(source), [np.ones(1, np.float32)], 40)


def test_more_than_32_kib_of_threadgroup_memory_is_rejected(clang):
    source = "threadgroup float big[9000];\nbig[thread_index_in_threadgroup] = 0;\nout[0] = big[0];"
    with pytest.raises(mslsim.KernelFault, match="32 KiB"):
        run1(kernel(source), [np.ones(1, np.float32)], 1)


def test_isolated_launch_turns_a_crash_into_an_exception(clang):
    source = "int zero = x_shape[0] - 1;\nout[0] = float(7 / zero);"  # integer division by zero
    with mslsim.settings(isolate=True), pytest.raises(mslsim.KernelCrash, match="SIGFPE"):
        run1(kernel(source), [np.ones(1, np.float32)], 1)


def test_missing_clang_skips_locally_but_fails_on_ci(monkeypatch):
    import mslsim.testing

    monkeypatch.setattr(mslsim.testing, "clang_available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="clang-19"):
        require_clang()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        require_clang()
