"""Held-out perplexity before and after adaptation, with the tokens and wall
time spent: the product's main claim, measured.

    python benchmarks/adapt.py --plan yoco --schedule progressive --stages 8 --iters 80 \
        [--fine-tune-type full] [--window 256] [--learning-rate 5e-5] [--out runs/yoco-progressive]

Perplexity protocol of the foundation issue (echo_mlx.analysis.evaluate): 16 windows
x 512 targets over the held-out half of the built-in corpus; training uses
the other half only. Rows: the original (unshared), the naive conversion,
and the adapted model. The run directory keeps metrics.jsonl and loss.png
(validation cross-entropy against training tokens, the teacher's as
reference), the curve to look at when the goal is not reached.
"""

import argparse
import platform
import time

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import blas
from echo_mlx.analysis.evaluate import perplexity
from echo_mlx.api import load
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows
from echo_mlx.tuner import adapters
from echo_mlx.tuner.finetune import FinetuneArgs, finetune


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plan", default="yoco")
    parser.add_argument("--schedule", default="direct")
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--fine-tune-type", default="full")
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--kd-alpha", type=float, default=1.0)
    parser.add_argument("--kv-init", default="own")
    parser.add_argument("--layerwise-iters", type=int, default=0)
    parser.add_argument("--layerwise-learning-rate", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or f"runs/{args.plan.replace(':', '')}-{args.schedule}"

    print(f"model {args.model}, plan {args.plan}, schedule {args.schedule} (stages {args.stages}), "
          f"{args.fine_tune_type}, {args.iters} steps of {args.batch_size} x {args.window}, lr {args.learning_rate}, "
          f"KD alpha {args.kd_alpha}, kv-init {args.kv_init}, layer-wise steps {args.layerwise_iters} (lr {args.layerwise_learning_rate or args.learning_rate})")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32")
    original, tokenizer = load(args.model, plan="none")
    windows = heldout_windows(builtin_tokens(tokenizer))
    rows = [("original (unshared)", perplexity(original, windows))]
    del original
    naive, _ = load(args.model, plan=args.plan, kv_init=args.kv_init)
    rows.append((f"naive {args.plan}", perplexity(naive, windows)))
    print(f"  before: original {rows[0][1]:.3f}, naive {rows[1][1]:.1f}", flush=True)

    tic, cpu = time.perf_counter(), time.process_time()
    result = finetune(FinetuneArgs(
        model=args.model, plan=args.plan, schedule=args.schedule, stages=args.stages,
        kv_init=args.kv_init, layerwise_iters=args.layerwise_iters, layerwise_learning_rate=args.layerwise_learning_rate,
        fine_tune_type=args.fine_tune_type, iters=args.iters, batch_size=args.batch_size,
        max_seq_length=args.window, learning_rate=args.learning_rate, kd_alpha=args.kd_alpha,
        steps_per_report=5, steps_per_eval=max(args.iters // 8, 1), val_batches=4, save_every=10, adapter_path=out,
    ), progress=True)
    wall, cpu = time.perf_counter() - tic, time.process_time() - cpu

    adapters.apply(naive, out, args.model)  # the best-validation weights
    rows.append((f"adapted {args.plan} ({args.schedule})", perplexity(naive, windows)))
    print(f"\nadaptation: {result.tokens:,} training tokens, {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU time "
          f"(validation included), "
          f"best validation CE {result.best_val_loss:.4f} (teacher {result.teacher_val_loss:.4f})")
    print("| model | held-out perplexity | vs original |")
    print("|---|---|---|")
    for name, ppl in rows:
        print(f"| {name} | {ppl:.3f} | {ppl / rows[0][1]:.3f}x |")
    print(f"run directory: {out} (metrics.jsonl, loss.png)")


if __name__ == "__main__":
    main()
