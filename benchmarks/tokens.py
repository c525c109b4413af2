"""Held-out perplexity against training tokens: naive start vs fitted start, the same recipe and budget.

    python benchmarks/tokens.py --plan PLAN [--iters 24] [--evals 0 3 6 12 18 24] [--out runs/tokens]
        [--png benchmarks/tokens.png] [--replot]

Both runs adapt ``PLAN`` with the same KD recipe (LoRA rank 16 on the layers
the plan changed, batches of 4 x 256 tokens of the built-in data, the same
batches in the same order); one starts from the naive conversion
(``--kv-init own``), the other from the fitted one (``--kv-init fit``).
At each step of ``--evals`` the run is stopped, the adapters *of that step*
are scored on the held-out protocol (16 x 512 targets), and it resumes
(``--resume`` continues on the same batches, so the curve is the one an
uninterrupted run follows). Prints the table and draws one PNG.
"""

import argparse
import json
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import blas
from echo_mlx.analysis.evaluate import perplexity
from echo_mlx.conversion.convert import fitted_model, shared_model
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows
from echo_mlx.io import checkpoint
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner import adapters
from echo_mlx.tuner.finetune import STATE, FinetuneArgs, finetune
from echo_mlx.tuner.plot import save_figure
from echo_mlx.tuner.schedule import build_stages
from echo_mlx.tuner.trainstate import load_state


def at_step(base: Path, run: Path, args: FinetuneArgs):
    """The base with the trainable weights of the run's latest checkpoint."""
    model, _, _ = checkpoint.load(base)
    target = SharingPlan.parse(str(SharingPlan.from_config(checkpoint.load_config(base))), len(model.layers))
    stage = build_stages(target, args.iters)[0]
    adapters.make_trainable(model, args.fine_tune_type, stage.trainable_from, args.lora_parameters)
    model.load_weights(list(load_state(run / STATE).weights.items()), strict=False)
    model.eval()
    return model


def curve(base: Path, run: Path, evals, args: FinetuneArgs, windows) -> list:
    points = [(0, 0, perplexity(checkpoint.load(base)[0], windows))]
    print(f"  step 0: {points[-1][2]:.2f}", flush=True)
    for k, step in enumerate(s for s in evals if s > 0):
        result = finetune(replace(args, resume=k > 0), stop_after=step)
        tokens = load_state(run / STATE).data_position["tokens"]
        points.append((step, tokens, perplexity(at_step(base, run, args), windows)))
        print(f"  step {step}: {tokens:,} tokens, held-out {points[-1][2]:.2f} ({result.seconds:.0f} s)", flush=True)
    return points


def plot(curves: dict, original: float, plan: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in curves.items():
        ax.plot([t for _, t, _ in points], [p for _, _, p in points], "o-", label=f"{name} start")
    ax.axhline(original, color="k", lw=1, label=f"original {original:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"{plan}: adaptation from a naive vs a fitted start", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--iters", type=int, default=24)
    parser.add_argument("--evals", type=int, nargs="+", default=[0, 3, 6, 12, 18, 24])
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/tokens")
    parser.add_argument("--png", default="benchmarks/tokens.png")
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        done = json.loads((out / "tokens.json").read_text())
        plot(done["curves"], done["original"], done["plan"], Path(args.png))
        return
    print(f"plan {args.plan}; LoRA rank 16, KD lr {args.learning_rate}, {args.iters} steps of 4 x 256, built-in data; "
          f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32", flush=True)
    src = load_source("default", dtype="float32")
    windows = heldout_windows(builtin_tokens(src.tokenizer))
    plan = SharingPlan.parse(args.plan, src.config["num_hidden_layers"])
    original = perplexity(shared_model(src.config, src.weights, SharingPlan.parse("none", plan.num_layers))[0], windows)
    curves = {}
    for name in ("naive", "fitted"):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        if name == "naive":
            model, config = shared_model(src.config, src.weights, plan, source=src.source)
        else:
            model, config = fitted_model(src, plan, progress=True)
        checkpoint.save(run_dir / "base", model, config, src.tokenizer)
        del model
        tic = time.perf_counter()
        ft = FinetuneArgs(model=str(run_dir / "base"), fine_tune_type="lora",
                          lora_parameters={"rank": 16, "dropout": 0.0, "scale": 20.0}, iters=args.iters,
                          learning_rate=args.learning_rate, batch_size=4, max_seq_length=256, steps_per_report=3,
                          steps_per_eval=args.iters, val_batches=8, save_every=1, adapter_path=str(run_dir / "run"))
        print(f"{name} start:", flush=True)
        curves[name] = curve(run_dir / "base", run_dir / "run", args.evals, ft, windows)
        print(f"  {(time.perf_counter() - tic) / 60:.1f} min", flush=True)
        shutil.rmtree(run_dir / "base", ignore_errors=True)
    print("\n| training tokens | " + " | ".join(f"{n} start" for n in curves) + " |")
    print("|---|" + "---|" * len(curves))
    for k in range(len(curves["naive"])):
        print(f"| {curves['naive'][k][1]:,} | " + " | ".join(f"{curves[n][k][2]:.2f}" for n in curves) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps({"plan": args.plan, "original": original, "curves": curves}, indent=1))
    plot(curves, original, args.plan, Path(args.png))
    print(f"original {original:.2f}; wrote {out / 'tokens.json'} and {args.png}")


if __name__ == "__main__":
    main()
