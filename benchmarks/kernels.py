"""Decode attention, echo's kernel vs MLX: bytes of K/V read per step, and times on a Mac.

    python benchmarks/kernels.py [--contexts 512 2048 8192 32768] [--plans none cla:2 yoco]
                                 [--layers 30 --q-heads 9 --kv-heads 3 --head-dim 64] [--measure]
    python benchmarks/kernels.py --time [--contexts ...] [--warmup 10 --runs 100] [--factory mslsim]

Decode attention is bandwidth bound: the bytes it reads per step are the
proxy for its time where there is no Metal GPU to time it on. Defaults are
SmolLM2-135M's geometry with a float16 cache, batch 1, one new token per step.

  sdpa_vector (MLX, qL <= 8): one threadgroup per query head, so every layer
      reads its producer's K and V once per query head: Hq / Hkv times.
  echo decode kernel: one threadgroup per (batch, kv head) serves all the
      query heads of the group: K and V once per layer.
  quantized K/V (mlx-lm QuantizedKVCache, affine): per row, D x bits / 8 bytes
      of packed values plus a float16 scale and bias per group. echo's
      quantized kernel dequantizes inside its loads and reads those bytes
      once per kv head. The sdpa_vector rows show its pattern (re-read per
      query head); mlx-lm's actual quantized attention is two
      quantized_matmuls with the scores in memory, whose reads are not modelled.

Every layer attends, whether it owns a cache or reads a producer's, so the
bytes read per step do not depend on the sharing plan; the resident cache
does (producers only), and is printed per plan.

--measure runs the float16 kernel and the 4- and 8-bit kernels for one layer
at the smallest context under mslsim (needs clang >= 17) and checks the
counted K/V bytes (packed values, scales and biases) against the formula.

--time (instead of the tables) times one layer's decode attention per context
and K/V format (float16; 4- and 8-bit, group 64, mlx-lm's QuantizedKVCache
default): echo's kernel, mx.fast.scaled_dot_product_attention on the float16
K/V, and for quantized K/V mlx-lm's quantized ops path (two quantized_matmuls).
Each is the median of --runs calls (mx.eval each) after --warmup; the first
call's output must match sdpa's (on the dequantized K/V for quantized
formats) or nothing is timed. It needs MLX with a Metal GPU; elsewhere it says
so and exits 0. `--factory mslsim` runs the same code with the kernel under
mslsim on the CPU at context <= 64: a smoke test, its times mean nothing.
"""

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from echo_mlx.models.plans import SharingPlan


def row_bytes(head_dim: int, fmt: str) -> float:
    """Bytes of one K (or V) row of one kv head."""
    if fmt == "float16":
        return head_dim * 2
    bits, group = (int(x) for x in fmt.removeprefix("q").split("g"))
    return head_dim * bits / 8 + (head_dim // group) * 2 * 2  # packed + float16 scale and bias


def formats(head_dim: int):
    yield "float16"
    for bits in (4, 8):
        for group in (32, 64, 128):
            if head_dim % group == 0:  # mx.quantize needs whole groups
                yield f"q{bits}g{group}"


def step_bytes(args, context: int, fmt: str, per_query_head: bool) -> float:
    repeats = args.q_heads // args.kv_heads if per_query_head else 1
    return args.layers * args.batch * args.kv_heads * context * 2 * row_bytes(args.head_dim, fmt) * repeats


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def measure(args):
    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mslsim is a dev package at the repo root
    import mslsim
    from echo_mlx.kernels import decode_attention as da
    from echo_mlx.kernels import quantized_decode_attention as qa

    if not mslsim.clang_available():
        print("--measure: skipped, no clang >= 17 (apt-get install -y clang-19 libclang-rt-19-dev)")
        return
    T = min(args.contexts)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.batch, args.q_heads, 1, args.head_dim)).astype(np.float16)
    k, v = rng.standard_normal((2, args.batch, args.kv_heads, T, args.head_dim)).astype(np.float16)
    print(f"measured under mslsim, one layer, float16 queries, context {T}:")
    for fmt in formats(args.head_dim):
        if fmt == "float16":
            attention, keys, values, options = da.build(mslsim.metal_kernel), k, v, {}
        else:
            bits, group = (int(x) for x in fmt.removeprefix("q").split("g"))
            if bits not in qa.SUPPORTED_BITS:
                continue
            keys, values = ([np.array(a) for a in mx.quantize(mx.array(x), group_size=group, bits=bits)] for x in (k, v))
            attention, options = qa.build(mslsim.metal_kernel), dict(bits=bits, group_size=group)
        with mslsim.settings(count_loads=True) as session:
            attention(q, keys, values, scale=args.head_dim**-0.5, **options)
        kv_buffers = ("k", "v", "k_scales", "k_biases", "v_scales", "v_biases")
        counted = sum(n for r in session.launches for name, n in r.bytes_loaded.items() if name in kv_buffers)
        expected = step_bytes(args, T, fmt, False) / args.layers
        verdict = "matches" if counted == expected else "DIFFERS FROM"
        print(f"  {fmt:8s} {counted:9d} bytes of K/V loaded, {verdict} the formula ({expected:.0f})")


def median_us(fn, warmup: int, runs: int, check=None) -> float:
    """Median microseconds of `runs` calls of fn, each mx.eval'd, after `warmup`
    calls; the first call's output goes through `check` before anything is timed."""
    import mlx.core as mx

    first = fn()
    mx.eval(first)
    if check:
        check(first)
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def time_attention(args):
    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from echo_mlx.kernels import decode_attention as da
    from echo_mlx.kernels import quantized_decode_attention as qa

    contexts, warmup, runs = args.contexts, args.warmup, args.runs
    if args.factory == "metal":
        if not (hasattr(mx, "metal") and mx.metal.is_available()):
            print("--time: timings need Apple silicon (MLX with a Metal GPU); nothing timed")
            return
        factory, note = mx.fast.metal_kernel, ""
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mslsim is a dev package at the repo root
        import mslsim
        from mslsim.testing import mlx_outputs

        if not mslsim.clang_available():
            print("--time --factory mslsim: skipped, no clang >= 17 (apt-get install -y clang-19 libclang-rt-19-dev)")
            return
        factory = mlx_outputs(mslsim.metal_kernel)
        contexts, warmup, runs = [min(64, *contexts)], min(warmup, 1), min(runs, 3)
        note = " SIMULATOR TIMINGS: the kernel runs on the CPU under mslsim, meaningless for speed."
    attention, quantized_attention = da.build(factory), qa.build(factory)

    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    B, Hq, Hkv, D, group = args.batch, args.q_heads, args.kv_heads, args.head_dim, 64
    scale = D**-0.5
    print(f"decode attention, one layer: batch {B}, {Hq} query / {Hkv} kv heads, head dim {D}, 1 new token, "
          f"float16 queries;\nmedian us of {runs} runs after {warmup} warmup calls; "
          f"{info.get('device_name', 'unknown device')} ({mx.default_device()}), mlx {mx.__version__}.{note}\n")
    print("K/V format  context    kernel      sdpa  k/sdpa     q-ops k/q-ops")

    def matches(name, reference):
        def check(out):
            out, ref = out.astype(mx.float32), reference.astype(mx.float32)
            if not mx.allclose(out, ref, rtol=5e-3, atol=5e-3).item():
                error = mx.abs(out - ref).max().item()
                sys.exit(f"{name}: output differs from sdpa's by up to {error:.3g}; not timing a wrong result")
        return check

    def quantized_ops(q, *rest, **options):
        # mlx-lm scales its queries in place (`queries *= scale`): give it its own handle on q.
        return quantized_scaled_dot_product_attention(mx.array(q), *rest, **options)

    mx.random.seed(0)
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    for T in contexts:
        k, v = mx.random.normal((2, B, Hkv, T, D)).astype(mx.float16)
        mx.eval(q, k, v)
        sdpa = partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=scale, mask=None)
        for bits in (None, 4, 8):
            if bits is None:
                fmt, reference, ops = "float16", sdpa(), None
                kernel = partial(attention, q, k, v, scale=scale, mask_kind="none")
            else:
                fmt, options = f"q{bits}g{group}", {"bits": bits, "group_size": group}
                kq, vq = (mx.quantize(x, **options) for x in (k, v))
                kd, vd = (mx.dequantize(*x, **options) for x in (kq, vq))
                reference = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale, mask=None)
                kernel = partial(quantized_attention, q, kq, vq, scale=scale, mask_kind="none", **options)
                ops = partial(quantized_ops, q, kq, vq, scale=scale, mask=None, **options)
            mx.eval(reference)
            ours = median_us(kernel, warmup, runs, matches(f"echo kernel, {fmt}, context {T}", reference))
            base = median_us(sdpa, warmup, runs)
            cells = f"{ours:9.1f} {base:9.1f} {ours / base:7.2f}"
            if ops:
                theirs = median_us(ops, warmup, runs, matches(f"quantized ops, {fmt}, context {T}", reference))
                cells += f" {theirs:9.1f} {ours / theirs:7.2f}"
            else:
                cells += f" {'-':>9s} {'-':>7s}"
            print(f"{fmt:10s} {T:8d} {cells}")
    print("\nkernel: echo's decode kernel; sdpa: mx.fast.scaled_dot_product_attention on the float16 K/V;\n"
          "q-ops: mlx-lm's quantized_scaled_dot_product_attention; k/x: kernel time / x time, < 1 is faster.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--plans", nargs="+", default=["none", "cla:2", "yoco"])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--measure", action="store_true")
    p.add_argument("--time", action="store_true", help="time the kernels (Apple silicon) instead of the tables")
    p.add_argument("--factory", choices=["metal", "mslsim"], default="metal",
                   help="with --time: mslsim runs the kernel on the CPU at context <= 64, a smoke test")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100)
    args = p.parse_args()

    if args.time:
        time_attention(args)
        return

    print(f"geometry: {args.layers} layers, {args.q_heads} query / {args.kv_heads} kv heads, head dim "
          f"{args.head_dim}, batch {args.batch}, one new token per step")
    print("MiB of K/V read per decode step (all layers)\n")
    print(f"{'K/V format':11s} {'context':>8s} {'echo':>9s} {'sdpa_vector':>12s} {'ratio':>6s}")
    skipped = [g for g in (32, 64, 128) if args.head_dim % g]
    for fmt in formats(args.head_dim):
        for T in args.contexts:
            ours, theirs = step_bytes(args, T, fmt, False), step_bytes(args, T, fmt, True)
            print(f"{fmt:11s} {T:8d} {mib(ours)} {mib(theirs):>12s} {theirs / ours:6.1f}")

    if skipped:
        print(f"(quantization groups {skipped} do not divide head dim {args.head_dim}: mx.quantize rejects them)")

    print("\nresident K/V cache, MiB (producers only)\n")
    plans = [SharingPlan.parse(text, args.layers) for text in args.plans]
    print(f"{'K/V format':11s} {'context':>8s} " + " ".join(f"{t:>12s}" for t in args.plans))
    for fmt in ("float16", "q4g32"):
        for T in args.contexts:
            per_layer = step_bytes(args, T, fmt, False) / args.layers
            cells = " ".join(f"{mib(per_layer * len(plan.producers)):>12s}" for plan in plans)
            print(f"{fmt:11s} {T:8d} {cells}")

    if args.measure:
        print()
        measure(args)


if __name__ == "__main__":
    main()
