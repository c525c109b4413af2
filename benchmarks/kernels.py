"""Bytes of K/V read per decode step: echo's decode kernel vs MLX's sdpa_vector.

    python benchmarks/kernels.py [--contexts 512 2048 8192 32768] [--plans none cla:2 yoco]
                                 [--layers 30 --q-heads 9 --kv-heads 3 --head-dim 64] [--measure]

Decode attention is bandwidth bound: the bytes it reads per step are the
proxy for its time (there is no Metal GPU here to time it on). Defaults are
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
"""

import argparse
import sys
from pathlib import Path

from echo_mlx.plans import SharingPlan


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
    args = p.parse_args()

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
