"""Training throughput and loss at equal tokens: full-model finetune vs LoRA vs
ECHO-LLaMA's progressive schedule, in one run on the same data.

    python benchmarks/finetune.py [--plan yoco] [--iters 8] [--window 256] [--batch-size 4]

Every method adapts the default model converted to ``--plan`` (naive own-K/V
init), distilling from the unshared original (alpha = 1, tau = 1), on the
same built-in-corpus batches (same seed, so the same tokens in the same
order), for the same number of steps:

- full:        all 30 layers trainable, direct (the baseline)
- lora:        LoRA rank 8 on every linear of the layers the plan changed
- progressive: full weights of the active region, the sharing boundary moving
               down over ``--stages`` stages (echo_mlx.tuner.schedule)

tokens/s counts training steps only (forward + backward + update, teacher
included), not validation. The validation loss is the student's
cross-entropy on the same held-back windows after the last step, on the
target plan. Ratios are taken within this one run.
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


def throughput(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    steps = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + train, train)]
    seconds = sum(n / r["tokens_per_second"] for n, r in zip(steps, train))
    return sum(steps) / seconds, sum(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plan", default="yoco")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--val-batches", type=int, default=2)
    args = parser.parse_args()

    print(f"model: {args.model}, plan {args.plan}, {args.iters} steps of {args.batch_size} x {args.window} tokens, "
          f"KD alpha 1 tau 1, lr {args.learning_rate}, val {args.val_batches} batches")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32")
    methods = {
        "full (baseline)": dict(fine_tune_type="full", num_layers=-1),
        "lora": dict(fine_tune_type="lora", learning_rate=2e-4),
        "progressive": dict(fine_tune_type="full", schedule="progressive", stages=args.stages),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in methods.items():
            run_dir = Path(tmp) / name.split()[0]
            settings = dict(
                model=args.model, plan=args.plan, iters=args.iters, batch_size=args.batch_size,
                max_seq_length=args.window, learning_rate=args.learning_rate, val_batches=args.val_batches,
                steps_per_report=1, steps_per_eval=10**9, save_every=10**9, adapter_path=str(run_dir),
            )
            result = finetune(FinetuneArgs(**dict(settings, **overrides)))
            tps, tokens = throughput(run_dir)
            rows.append((name, tps, tokens, result.best_val_loss, result.teacher_val_loss))
            print(f"  {name:<16} {tps:7.1f} tok/s  {tokens:,} tokens  val loss {result.best_val_loss:.4f}", flush=True)

    base_tps, base_val = rows[0][1], rows[0][3]
    print(f"\n| method | train tok/s | vs full | tokens | val loss | teacher val loss |")
    print("|---|---|---|---|---|---|")
    for name, tps, tokens, val, teacher in rows:
        print(f"| {name} | {tps:.1f} | {tps / base_tps:.2f}x | {tokens:,} | {val:.4f} | {teacher:.4f} |")
    progressive = rows[-1]
    print(f"\nprogressive vs full: {progressive[1] / base_tps:.2f}x tokens/s (ECHO-LLaMA reports 1.77x), "
          f"validation loss {progressive[3]:.4f} vs {base_val:.4f} at {progressive[2]:,} tokens")


if __name__ == "__main__":
    main()
