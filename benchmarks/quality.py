"""Quality per sharing plan: naive and adapted held-out perplexity against KV reduction.

    python benchmarks/quality.py [--plans cla:2 yoco sandwich-top:15 echoatt:3 suggested:2 suggested:1.5]
        [--layerwise-iters 12 --iters 18] [--out runs/quality] [--png benchmarks/quality.png] [--replot]

Every plan gets the same adaptation budget and recipe, the one the shipped
default model uses (weights/README.md): LoRA on the layers the plan changed,
``--layerwise-iters`` layer-wise distillation steps, then KD steps up to
``--iters``, batches of ``--batch-size`` x ``--window`` tokens of the built-in
corpus's training half. Perplexity: echo_mlx.evaluate's protocol, 16 x 512
held-out targets, the same windows for every row. ``suggested:R`` is the plan
`echo-mlx analyze --target-reduction R --evaluate 3`
suggests. Wall time is this machine's
(state it with the figures); top-target plans (sandwich-top) iterate their
shared block during KD steps, so they cost more per token.

Prints one markdown table, writes ``OUT/quality.json`` and the PNG
(perplexity, log scale, against KV reduction: naive and adapted per plan,
the original model as a line, the issue's goals marked).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import adapters, blas
from echo_mlx.api import load
from echo_mlx.corpus import builtin_tokens, heldout_windows
from echo_mlx.evaluate import perplexity
from echo_mlx.finetune import FinetuneArgs, finetune
from echo_mlx.plans import SharingPlan

DEFAULT_PLANS = ["cla:2", "yoco", "sandwich-top:15", "echoatt:3", "suggested:2", "suggested:1.5"]


def resolve(text: str, model: str) -> str:
    """A plan string; ``suggested:R`` is what ``echo-mlx analyze --target-reduction R --evaluate 3`` suggests."""
    if not text.startswith("suggested"):
        return text
    from echo_mlx.analyze import analyze

    reduction = float(text.split(":", 1)[1]) if ":" in text else 2.0
    suggestion = analyze(model, target_reduction=reduction, evaluate=3).suggestion
    print(f"{text}: analyze suggests {suggestion.name} (naive {suggestion.perplexity:.1f} on its quick protocol)", flush=True)
    return str(suggestion.plan)


def adapt(model: str, plan: str, out: Path, args) -> dict:
    tic, cpu = time.perf_counter(), time.process_time()
    result = finetune(FinetuneArgs(
        model=model, plan=plan, kv_init=args.kv_init, fine_tune_type="lora",
        lora_parameters={"rank": args.lora_rank, "dropout": 0.0, "scale": 20.0},
        layerwise_iters=args.layerwise_iters, layerwise_learning_rate=args.layerwise_learning_rate,
        iters=args.iters, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_seq_length=args.window, steps_per_report=5, steps_per_eval=max(args.iters // 4, 1),
        val_batches=4, save_every=args.iters, adapter_path=str(out),
    ))
    return dict(tokens=result.tokens, wall_min=(time.perf_counter() - tic) / 60, cpu_min=(time.process_time() - cpu) / 60)


def print_table(rows, original):
    print("\n| plan | KV reduction | naive ppl | adapted ppl | vs original | training tokens | wall min |")
    print("|---|---|---|---|---|---|---|")
    print(f"| original | 1.00x | {original:.2f} | - | 1.000x | - | - |")
    for r in rows:
        print(f"| {r['name']} | {r['kv_reduction']:.2f}x | {r['naive']:,.1f} | {r['adapted']:.2f} | "
              f"{r['adapted'] / original:.3f}x | {r['tokens']:,} | {r['wall_min']:.1f} |")


def plot(rows, original, path: Path):
    """One bar pair per plan (naive, adapted) on a log axis: several plans share
    a KV reduction, so a scatter against reduction would stack their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (-r["kv_reduction"], r["adapted"]))
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.6))
    ax.barh([i + 0.2 for i in y], [r["naive"] for r in rows], height=0.4, color="0.8", label="naive conversion")
    ax.barh([i - 0.2 for i in y], [r["adapted"] for r in rows], height=0.4, color="tab:blue", label="adapted")
    for i, r in zip(y, rows):
        ax.annotate(f"{r['adapted']:.1f}", (r["adapted"], i - 0.2), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_yticks(list(y), [f"{r['name']} ({r['kv_reduction']:.2f}x)" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(original, color="k", lw=1, label=f"original {original:.2f}")
    ax.axvline(original * 1.10, color="g", ls="--", lw=1, label="goal at 2x: +10%")
    ax.axvline(original * 1.03, color="b", ls=":", lw=1, label="goal at 1.5x: +3%")
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity (log)")
    tokens = rows[0]["tokens"] if rows else 0
    ax.set_title(f"naive vs adapted, {tokens:,} training tokens per plan")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plans", nargs="+", default=DEFAULT_PLANS)
    parser.add_argument("--kv-init", default="own")
    parser.add_argument("--layerwise-iters", type=int, default=12)
    parser.add_argument("--layerwise-learning-rate", type=float, default=3e-4)
    parser.add_argument("--iters", type=int, default=18)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 512 targets (16 = the standard protocol)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--png", default="benchmarks/quality.png")
    parser.add_argument("--replot", action="store_true", help="measure nothing: reprint the table and redraw the PNG from OUT/quality.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        finished = json.loads((out / "quality.json").read_text())
        print_table(finished["rows"], finished["original"])
        plot(finished["rows"], finished["original"], Path(args.png))
        return

    print(f"model {args.model}; every plan: LoRA rank {args.lora_rank}, {args.layerwise_iters} layer-wise steps "
          f"(lr {args.layerwise_learning_rate}) + {args.iters - args.layerwise_iters} KD steps (lr {args.learning_rate}), "
          f"batches {args.batch_size} x {args.window}, kv-init {args.kv_init}")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32, "
          f"device {mx.default_device()}; perplexity over {args.eval_windows} x 512 held-out targets", flush=True)
    original, tokenizer = load(args.model, plan="none")
    windows = heldout_windows(builtin_tokens(tokenizer), count=args.eval_windows)
    original_ppl = perplexity(original, windows)
    del original
    print(f"original: {original_ppl:.3f}", flush=True)

    rows = []
    for name in args.plans:
        text = resolve(name, args.model)
        model, _ = load(args.model, plan=text, kv_init=args.kv_init)
        plan = SharingPlan.parse(text, len(model.layers))
        naive = perplexity(model, windows)
        print(f"{name}: {plan} ({plan.kv_reduction:.2f}x), naive {naive:.1f}; adapting...", flush=True)
        run_dir = out / name.replace(":", "")
        cost = adapt(args.model, text, run_dir, args)
        adapters.apply(model, run_dir, args.model)  # the best-validation adapters
        row = dict(name=name, plan=str(plan), kv_reduction=plan.kv_reduction, naive=naive,
                   adapted=perplexity(model, windows), **cost)
        rows.append(row)
        print(f"  adapted {row['adapted']:.2f} after {row['tokens']:,} tokens, {row['wall_min']:.1f} min", flush=True)
        del model

    print_table(rows, original_ppl)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(dict(original=original_ppl, rows=rows, settings=vars(args)), indent=2))
    plot(rows, original_ppl, Path(args.png))
    print(f"wrote {out / 'quality.json'} and {args.png}")


if __name__ == "__main__":
    main()
