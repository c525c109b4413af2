"""What keeping the teacher's work buys: finetune steps with and without ``--teacher-cache``.

    python benchmarks/teacher_cache.py [--plan sandwich-bottom:15] [--iters 8] [--layerwise-iters 2] [--top-k 64]

Three runs of the same recipe on the same batches (LoRA rank 16 on the changed
layers, ``--layerwise-iters`` layer-wise steps then KD at alpha 1, tau 1, the
built-in data, batches of 4 x 256, naive start): the exact teacher (no cache),
a cold cache (every batch computed and written) and a warm one (the same batches
again: every batch read back, the teacher never runs). tokens/s counts the
training steps only, per phase. The validation loss after the last step shows
what the top-k coarsening of the KD loss costs against the exact loss. Also
reported: how much of the teacher's probability the top k tokens hold on
these batches (the rest is one bucket in the cached loss).
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import blas
from echo_mlx.tuner.finetune import FinetuneArgs, finetune


def phase_throughput(run_dir: Path):
    """{kind: tokens/s} over the run's training reports."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    out = {}
    previous = 0
    for r in train:
        n = r["tokens"] - previous
        previous = r["tokens"]
        tokens, seconds = out.get(r["kind"], (0, 0.0))
        out[r["kind"]] = (tokens + n, seconds + n / r["tokens_per_second"])
    return {k: t / s for k, (t, s) in out.items()}


def tail_mass(cache_dir: Path) -> float:
    tails = [mx.load(str(p))["tail"] for p in sorted(cache_dir.glob("kd-*.safetensors"))]
    return mx.concatenate([t.reshape(-1) for t in tails]).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plan", default="sandwich-bottom:15")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--layerwise-iters", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--val-batches", type=int, default=4)
    args = parser.parse_args()

    print(f"model {args.model}, plan {args.plan}: {args.layerwise_iters} layer-wise + {args.iters - args.layerwise_iters} "
          f"KD steps of 4 x 256, LoRA r16, lr 1e-4, val {args.val_batches} batches, top-k {args.top_k}; "
          f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "teacher"
        for name, cache in (("exact teacher, no cache", None), ("cache, cold", cache_dir), ("cache, warm", cache_dir)):
            run_dir = Path(tmp) / name.replace(" ", "").replace(",", "_")
            settings = dict(
                model=args.model, plan=args.plan, iters=args.iters, layerwise_iters=args.layerwise_iters,
                batch_size=4, max_seq_length=256, learning_rate=1e-4, val_batches=args.val_batches,
                lora_parameters={"rank": 16, "dropout": 0.0, "scale": 20.0}, steps_per_report=1,
                steps_per_eval=10**9, save_every=10**9, adapter_path=str(run_dir),
                teacher_cache=str(cache) if cache else None, teacher_top_k=args.top_k,
            )
            result = finetune(FinetuneArgs(**settings))
            speed = phase_throughput(run_dir)
            rows.append((name, speed.get("layerwise"), speed.get("kd"), result.best_val_loss))
            print(f"  {name}: {speed}, best val loss {result.best_val_loss:.4f}", flush=True)
        mass = tail_mass(cache_dir)

    _, base_lw, base_kd, _ = rows[0]
    print("\n| run | layer-wise tok/s | vs exact | KD tok/s | vs exact | best val loss |")
    print("|---|---|---|---|---|---|")
    for name, lw, kd, val in rows:
        lw_cells = f"{lw:.1f} | {lw / base_lw:.2f}x" if lw else "- | -"
        print(f"| {name} | {lw_cells} | {kd:.1f} | {kd / base_kd:.2f}x | {val:.4f} |")
    print(f"\nteacher probability outside its top {args.top_k} tokens on these batches: {mass:.4f} (mean per position)")


if __name__ == "__main__":
    main()
