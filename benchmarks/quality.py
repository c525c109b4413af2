"""Quality per sharing plan: naive, fitted and adapted perplexity, and chat behaviour, against KV reduction.

    python benchmarks/quality.py [--plans cla:2 yoco sandwich-bottom:15 echoatt:3 search:1.25 search:1.5 search:2]
        [--search-json benchmarks/search.json] [--iters 18] [--out runs/quality] [--replot]

For every plan, one after another in one process:

- naive: ``--kv-init own`` (producers keep their K/V weights);
- fitted: ``--kv-init fit`` (echo_mlx.conversion.fit, default calibration: the built-in
  data: corpus, chat and general training windows taking turns), written as a checkpoint;
- adapted: ``echo-mlx finetune`` from that checkpoint with the same budget for
  every plan: LoRA on the layers the plan changed, ``--iters`` KD steps of
  ``--batch-size`` x ``--window`` tokens of the built-in data (corpus training
  part + chat and general sets' training splits), the best step by validation loss.
  Every plan trains on the same batches, so the teacher's top-k outputs are kept
  in a shared ``--teacher-cache`` (echo_mlx.tuner.teacher_cache): the teacher runs
  once per batch for the whole table.

Measured on text no choice was made on: held-out perplexity (echo_mlx.analysis.evaluate,
16 x 512 targets of the corpus's held-out half, the same windows for every
row), and the held-out chat answers (echo_mlx.datasets.chat: the original's greedy
answers to 46 held-out prompts) scored under the adapted model: perplexity
ratio to the original's and the share of answer tokens it ranks first.
``search:R`` is the plan `echo-mlx analyze --search` picked for reduction R
(read from ``--search-json``, which that command writes). CPU minutes are this
process's, fit and adaptation together.

Prints one markdown table, writes ``OUT/quality.json``, the frontier PNG
(KV reduction vs perplexity: naive, fitted, adapted per plan) and, with
``--replot``, redraws both from the JSON without measuring.
"""

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import blas
from echo_mlx.analysis.evaluate import perplexity
from echo_mlx.conversion.convert import fitted_model, shared_model, unshared_model
from echo_mlx.conversion.fit import Calibration, FitOptions, calibration
from echo_mlx.datasets import chat
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows
from echo_mlx.io import checkpoint
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner import adapters
from echo_mlx.tuner.finetune import FinetuneArgs, finetune
from echo_mlx.tuner.plot import save_figure

DEFAULT_PLANS = ["cla:2", "yoco", "sandwich-bottom:15", "echoatt:3", "search:1.25", "search:1.5", "search:2"]


def resolve(name: str, search_json: Path) -> str:
    """A plan string; ``search:R`` is the searched plan for reduction R."""
    if not name.startswith("search:"):
        return name
    if not search_json.is_file():
        raise SystemExit(f"{name}: run `echo-mlx analyze --search --out {search_json.parent}` first ({search_json} is missing)")
    R = float(name.split(":", 1)[1])
    for row in json.loads(search_json.read_text())["plans"]:
        if abs(row["target_reduction"] - R) < 1e-9:
            return row["plan"]
    raise SystemExit(f"{search_json} has no plan for reduction {R:g}: search with --target-reduction {R:g}")


def adapt(base: Path, out: Path, args) -> dict:
    result = finetune(FinetuneArgs(
        model=str(base), fine_tune_type="lora", lora_parameters={"rank": args.lora_rank, "dropout": 0.0, "scale": 20.0},
        iters=args.iters, learning_rate=args.learning_rate, batch_size=args.batch_size, max_seq_length=args.window,
        steps_per_report=5, steps_per_eval=max(args.iters // 3, 1), val_batches=8, save_every=args.iters,
        adapter_path=str(out), teacher_cache=args.teacher_cache, teacher_top_k=args.teacher_top_k,
    ))
    return {"tokens": result.tokens}


def chat_figures(model, tokenizer, original_chat) -> dict:
    scores = chat.answer_scores(model, tokenizer, "heldout")
    return {"chat_ppl_ratio": scores["ppl"] / original_chat["ppl"], "chat_top1": scores["top1"]}


def print_table(rows, original):
    print("\n| plan | KV reduction | naive ppl | fitted ppl | adapted ppl | vs original | chat ppl ratio | chat top-1 "
          "| training tokens | CPU min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| original | 1.00x | {original['ppl']:.2f} | - | - | 1.000x | 1.000 | {original['chat_top1']:.1%} | - | - |")
    for r in rows:
        print(f"| {r['name']} | {r['kv_reduction']:.2f}x | {r['naive']:,.1f} | {r['fitted']:,.2f} | {r['adapted']:.2f} | "
              f"{r['adapted'] / original['ppl']:.3f}x | {r['chat_ppl_ratio']:.3f} | {r['chat_top1']:.1%} | "
              f"{r['tokens']:,} | {r['cpu_min']:.1f} |")


def plot(rows, original, path: Path):
    """KV reduction vs held-out perplexity (log): naive, fitted and adapted per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"naive": ("x", "0.6"), "fitted": ("s", "tab:orange"), "adapted": ("o", "tab:blue")}
    for key, (marker, color) in styles.items():
        ax.scatter([r["kv_reduction"] for r in rows], [r[key] for r in rows], marker=marker, color=color, label=key)
    for r in rows:
        ax.annotate(r["name"], (r["kv_reduction"], r["adapted"]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    ax.axhline(original["ppl"], color="k", lw=1, label=f"original {original['ppl']:.2f}")
    ax.axhline(original["ppl"] * 1.10, color="g", ls="--", lw=1, label="goal: +10%")
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache reduction (x)")
    ax.set_ylabel("held-out perplexity (log)")
    tokens = rows[0]["tokens"] if rows else 0
    ax.set_title(f"naive, fitted and adapted ({tokens:,} training tokens per plan)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


COMMITTED = Path(__file__).with_name("quality.json")  # the rows a fresh checkout starts from


def kept_rows(out: Path, args, original: dict) -> list:
    """The finished rows of an earlier run with the same recipe (a run takes longer than a session):
    OUT's, else the committed benchmarks/quality.json."""
    path = out / "quality.json" if (out / "quality.json").is_file() else COMMITTED
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    recipe = ("model", "search_json", "iters", "learning_rate", "lora_rank", "batch_size", "window", "calibration",
              "teacher_top_k")
    changed = [k for k in recipe if earlier["settings"].get(k) != getattr(args, k)]
    if changed or abs(earlier["original"]["ppl"] - original["ppl"]) > 1e-3:
        raise SystemExit(f"{path} was measured with other settings ({', '.join(changed) or 'original perplexity'}): "
                         "drop --resume or pick another --out")
    return [r for r in earlier["rows"] if r["name"] in args.plans]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plans", nargs="+", default=DEFAULT_PLANS)
    parser.add_argument("--search-json", default="benchmarks/search.json")
    parser.add_argument("--iters", type=int, default=18)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--teacher-cache", help="the teacher's top-k outputs per batch, shared by every plan "
                        "(they all train on the same batches; default OUT/teacher; 'none': the exact teacher each time)")
    parser.add_argument("--teacher-top-k", type=int, default=64)
    parser.add_argument("--png", default="benchmarks/quality.png")
    parser.add_argument("--replot", action="store_true", help="measure nothing: reprint the table and redraw the PNG from OUT/quality.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows OUT/quality.json (else benchmarks/quality.json) already has (same settings) "
                             "and measure only the other plans")
    args = parser.parse_args()
    out = Path(args.out)
    args.teacher_cache = None if args.teacher_cache == "none" else (args.teacher_cache or str(out / "teacher"))
    if args.teacher_cache is None:
        args.teacher_top_k = None  # the exact KD loss: not a top-k recipe
    if args.replot:
        finished = json.loads((out / "quality.json").read_text())
        print_table(finished["rows"], finished["original"])
        plot(finished["rows"], finished["original"], Path(args.png))
        return

    print(f"model {args.model}; every plan: --kv-init fit (default calibration), then LoRA rank {args.lora_rank} on the "
          f"changed layers, {args.iters} KD steps (lr {args.learning_rate}) of {args.batch_size} x {args.window} tokens "
          f"of the built-in data (corpus + chat + general)")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32, device {mx.default_device()}; "
          f"perplexity over 16 x 512 held-out targets; chat figures over the held-out chat answers", flush=True)
    src = load_source(args.model, dtype="float32")
    tokenizer = src.tokenizer
    original_model = unshared_model(src)
    windows = heldout_windows(builtin_tokens(tokenizer))
    original_chat = chat.answer_scores(original_model, tokenizer, "heldout")
    original = {"ppl": perplexity(original_model, windows), "chat_ppl": original_chat["ppl"], "chat_top1": original_chat["top1"]}
    print(f"original: {original['ppl']:.3f}; its own held-out chat answers: ppl {original['chat_ppl']:.3f}, "
          f"top-1 {original['chat_top1']:.1%}", flush=True)
    # One calibration for every plan: the teacher's stream over the fit's default windows.
    cpu = time.process_time()
    options = FitOptions()
    windows_for_fit, args.calibration = calibration(tokenizer, None, options)  # recorded: part of the recipe
    cal = Calibration(original_model, windows_for_fit, options.batch)
    stream_min = (time.process_time() - cpu) / 60
    print(f"calibration stream ({cal.tokens:,} tokens): {stream_min:.1f} CPU min, counted in every row", flush=True)

    rows = kept_rows(out, args, original) if args.resume else []
    for name in args.plans:
        if any(r["name"] == name for r in rows):
            print(f"{name}: kept from an earlier run", flush=True)
            continue
        text = resolve(name, Path(args.search_json))
        plan = SharingPlan.parse(text, src.config["num_hidden_layers"])
        naive = perplexity(shared_model(src.config, src.weights, plan)[0], windows)
        print(f"{name}: {plan} ({plan.kv_reduction:.2f}x), naive {naive:,.1f}; fitting...", flush=True)
        run_dir = out / name.replace(":", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        cpu = time.process_time()
        model, config = fitted_model(src, plan, cal=cal)
        checkpoint.save(run_dir / "base", model, config, tokenizer)
        fitted = perplexity(model, windows)
        print(f"  fitted {fitted:.2f}; adapting...", flush=True)
        cost = adapt(run_dir / "base", run_dir / "adapters", args)
        adapters.apply(model, run_dir / "adapters", str(run_dir / "base"))  # the best-validation adapters
        row = dict(name=name, plan=str(plan), kv_reduction=plan.kv_reduction, naive=naive, fitted=fitted,
                   adapted=perplexity(model, windows), **chat_figures(model, tokenizer, original_chat), **cost,
                   cpu_min=stream_min + (time.process_time() - cpu) / 60)
        rows.append(row)
        print(f"  adapted {row['adapted']:.2f}, chat ratio {row['chat_ppl_ratio']:.3f}, top-1 {row['chat_top1']:.1%} "
              f"after {row['tokens']:,} tokens, {row['cpu_min']:.1f} CPU min", flush=True)
        del model
        shutil.rmtree(run_dir / "base", ignore_errors=True)  # 0.5 GB per plan; the adapters and metrics stay
        # Written after every plan, so an interrupted run keeps the rows it finished.
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(dict(original=original, rows=rows, settings=vars(args)), indent=2))

    print_table(rows, original)
    plot(rows, original, Path(args.png))
    print(f"wrote {out / 'quality.json'} and {args.png}")


if __name__ == "__main__":
    main()
