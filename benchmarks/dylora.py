"""Dynamic-rank adapters: one dylora run against fixed-rank LoRA runs, and a finetune step on a 4-bit base.

    python benchmarks/dylora.py [--ranks 1 2 4 8 16] [--iters 16] [--variants uniform/inverse powers/constant/example ...]
        [--plan PLAN] [--out runs/dylora] [--skip-quantized] [--reuse benchmarks/dylora.json] [--seed N]
        [--calibrate-scale] [--results OUT/dylora.json]

Part 1 (float32 base, for speed on a CPU). The default model converted naively
(``--kv-init own``) to ``--plan`` (default: the shipped model's plan), so the
adapters have damage to repair. Then, with one budget per run (``--iters`` KD
steps of 4 x 256 tokens of the built-in data, LoRA scale 20 on the layers the
plan changed, lr ``--learning-rate``, the best step by validation loss):

- one ``--fine-tune-type dylora`` run per ``--variants`` entry
  (``rank_sampling/rank_scaling[/rank_draw[/rank_lr[/min_rank_weight]]]``),
  ranks min(--ranks)..max(--ranks): ``uniform`` draws every rank in the range, ``powers`` only min, 2 min, ..., max;
  ``inverse`` scales rank b by R / b (DyLoRA's alpha / b), ``constant`` does not;
  ``example`` draws a rank per example (every step trains several), the default
  ``step`` one rank per step;
- one fixed-rank LoRA run per rank in ``--ranks``.

``--reuse JSON`` takes the fixed-rank rows and the variants already measured from
an earlier run of this benchmark with the same plan, ranks, steps and learning rate
(every run is seeded: retraining reproduces them), and trains only the new
variants; the table marks what came from that run, and its CPU minutes are that
run's. ``--seed N`` seeds every run (rank draws, data order, initialisation);
a variant at a seed other than 0 is named with it (``log/constant/example seed
1``), and with ``--reuse`` from another seed the fixed-rank runs train again.

Every run trains on the same batches, so the teacher's top-k outputs are kept in
a shared teacher cache: the first run (dylora) computes them, the others read
them. A finished run (same settings, its ``run.json`` written) is reused, not
trained again, so an interrupted benchmark continues where it stopped. Held-out perplexity (16 x 512 targets, echo_mlx.analysis.evaluate) of the
dylora adapter at each rank against that rank's own run; the goal is every rank
within 5%.

``--calibrate-scale``: each run (the variants' and the fixed-rank ones) is
copied to ``NAME-calibrated`` and its LoRA scale calibrated per rank on
finetune's validation batches (``echo_mlx.tuner.rank_scales.calibrate``, what
``finetune --calibrate-scale`` runs after its last step; built-in training
half, no held-out text), then a second table: held-out perplexity at the
calibrated scales, each dylora rank against that rank's run calibrated alike
and against the better of its run's two figures (the stricter comparison).
The calibration's CPU minutes are stated per run.

Part 2 (4-bit base): the same plan converted with ``-q`` (4 bits, group 64)
and in float32; for each, the memory of one training step (dylora, rank
max(--ranks), batch 1 x 128, no teacher: MLX's peak memory over the step and
the active memory before it), and a short KD run on both (batch 1 x 128,
``--quantized-iters`` steps, the same batches and ranks) to show the loss
curves side by side. MLX's CPU quantized matmuls are slow (~10x float32 here),
so this part is short.

Writes OUT/dylora.json and benchmarks/dylora.png (perplexity against rank).
"""

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from echo_mlx import blas
from echo_mlx.analysis.evaluate import perplexity
from echo_mlx.api import load
from echo_mlx.conversion.convert import convert
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows
from echo_mlx.io import shipped
from echo_mlx.tuner import adapters
from echo_mlx.tuner.dylora import set_rank
from echo_mlx.tuner.data import builtin_examples
from echo_mlx.tuner.finetune import FinetuneArgs, evaluate, finetune, make_loss
from echo_mlx.tuner.plot import save_figure

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
parser.add_argument("--iters", type=int, default=16)
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--variants", nargs="+", default=["uniform/inverse", "powers/inverse", "uniform/constant"])
parser.add_argument("--plan", default=None, help="default: the shipped model's plan")
parser.add_argument("--out", default="runs/dylora")
parser.add_argument("--png", default="benchmarks/dylora.png")
parser.add_argument("--quantized-iters", type=int, default=8)
parser.add_argument("--skip-quantized", action="store_true", help="with --reuse: keep the earlier run's part 2")
parser.add_argument("--seed", type=int, default=0, help="every run's seed (rank draws, data order, init); with "
                    "--reuse from another seed, the fixed-rank runs are trained again at this one")
parser.add_argument("--reuse", default=None, help="an earlier run's dylora.json: its fixed-rank rows and variants")
parser.add_argument("--calibrate-scale", action="store_true",
                    help="also calibrate every run's scale per rank on validation text (on a copy) and measure it")
parser.add_argument("--results", default=None, help="where the results go (default OUT/dylora.json)")
SCALE = 20.0


def seeded(label: str, seed: int) -> str:
    """A variant's or run's label at its seed; seed 0 keeps the plain label, so its earlier runs are reused."""
    return f"{label} seed {seed}" if seed else label


def directory_name(label: str) -> str:
    return label.replace("/", "-").replace(" ", "-")


def run(args, name: str, fine_tune_type: str, lora_parameters: dict, **overrides):
    """One finetune run; (its directory, CPU minutes). A finished run with the same settings is reused."""
    settings = dict(
        model="default", plan=args.plan, kv_init="own", fine_tune_type=fine_tune_type, lora_parameters=lora_parameters,
        iters=args.iters, learning_rate=args.learning_rate, batch_size=4, max_seq_length=256,
        steps_per_report=4, steps_per_eval=max(args.iters // 2, 1), val_batches=8, save_every=args.iters,
        teacher_cache=str(Path(args.out) / "teacher"), adapter_path=str(Path(args.out) / name),
    )
    settings = {**settings, **overrides}
    path, record = Path(settings["adapter_path"]), Path(settings["adapter_path"]) / "run.json"
    if record.is_file() and json.loads(record.read_text())["settings"] == settings:
        return path, json.loads(record.read_text())["cpu_min"]
    shutil.rmtree(path, ignore_errors=True)
    cpu = time.process_time()
    finetune(FinetuneArgs(**settings))
    minutes = (time.process_time() - cpu) / 60
    record.write_text(json.dumps({"settings": settings, "cpu_min": minutes}))
    return path, minutes


def reused(args):
    """The earlier run named by --reuse, checked to have this run's settings; None without --reuse."""
    if not args.reuse:
        return None
    earlier = json.loads(Path(args.reuse).read_text())
    same = ("plan", "ranks", "iters", "learning_rate")
    if any(earlier["settings"][k] != getattr(args, k) for k in same):
        raise SystemExit(f"{args.reuse} was measured with other settings ({', '.join(same)}): drop --reuse")
    return earlier


def ranked_perplexity(args, path: Path, rank: int, windows) -> float:
    model, _ = load("default", plan=args.plan, adapter_path=str(path), lora_rank=rank)
    return perplexity(model, windows)


def validation_loss(model, valid) -> float:
    """Cross-entropy on finetune's validation batches (built-in training half, no held-out text)."""
    return evaluate(model, make_loss(None, 0.0, 1.0), valid, FinetuneArgs(batch_size=4, max_seq_length=256, val_batches=8), 0, 1)


def validation_ce(args, path: Path, ranks, valid) -> dict:
    """Validation cross-entropy at each rank: what the defaults are chosen on."""
    return {rank: validation_loss(load("default", plan=args.plan, adapter_path=str(path), lora_rank=rank)[0], valid)
            for rank in ranks}


def calibrated_copy(args, path: Path, valid) -> tuple:
    """(A calibrated copy of the run at ``path``, its record: factors and CPU minutes); a copy already
    calibrated is reused."""
    from echo_mlx.tuner import rank_scales

    copy = path.with_name(path.name + "-calibrated")
    if (copy / "calibration.json").is_file():  # written last: the copy is calibrated
        return copy, json.loads((copy / "calibration.json").read_text())
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for name in (adapters.CONFIG, adapters.WEIGHTS):  # the adapters alone: calibration needs no training state
        shutil.copy2(path / name, copy / name)
    cpu = time.process_time()
    model, _ = load("default", plan=args.plan, adapter_path=str(copy))
    model.eval()
    factors = rank_scales.calibrate(copy, model, lambda m: validation_loss(m, valid),
                                    progress=lambda line: print(f"  {copy.name}: {line}", flush=True))
    record = {"factors": factors, "cpu_min": (time.process_time() - cpu) / 60}
    (copy / "calibration.json").write_text(json.dumps(record))
    return copy, record


def calibrated_table(args, dylora: dict, fixed: dict, trained_rows, windows, valid) -> dict:
    """Held-out perplexity at calibrated scales: per rank, its fixed run (as trained and calibrated) and each variant."""
    fixed_cal = {rank: calibrated_copy(args, path, valid) for rank, path in fixed.items()}
    dylora_cal = {variant: calibrated_copy(args, path, valid) for variant, (path, _) in dylora.items()}
    rows = []
    for trained in trained_rows:
        rank = trained["rank"]
        row = {"rank": rank, "fixed": trained["fixed"],
               "fixed calibrated": ranked_perplexity(args, fixed_cal[rank][0], rank, windows)}
        for variant, (copy, _) in dylora_cal.items():
            row[variant + " calibrated"] = ranked_perplexity(args, copy, rank, windows)
        rows.append(row)
    print("\nCalibrated scales (validation batches of the training half), held-out perplexity; ratios to the rank's own "
          "run calibrated alike, and to the better of its two figures:")
    print("| rank | fixed | fixed calibrated | " + " | ".join(f"dylora {v} calibrated | / fixed calibrated | / best fixed"
                                                          for v in dylora_cal) + " |")
    print("|---|---|---|" + "---|---|---|" * len(dylora_cal))
    for r in rows:
        best = min(r["fixed"], r["fixed calibrated"])
        print(f"| {r['rank']} | {r['fixed']:.2f} | {r['fixed calibrated']:.2f} | " + " | ".join(
            f"{r[v + ' calibrated']:.2f} | {r[v + ' calibrated'] / r['fixed calibrated']:.3f} | "
            f"{r[v + ' calibrated'] / best:.3f}" for v in dylora_cal) + " |")
    runs = {**{f"lora-r{rank}": c for rank, c in fixed_cal.items()}, **dylora_cal}
    print("calibration CPU minutes: " + ", ".join(f"{name} {r['cpu_min']:.1f}" for name, (_, r) in runs.items()), flush=True)
    return {"rows": rows, "cpu_min": {name: r["cpu_min"] for name, (_, r) in runs.items()},
            "factors": {name: r["factors"] for name, (_, r) in runs.items()}}


def plot(rows, variants, naive, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ranks = [r["rank"] for r in rows]
    ax.plot(ranks, [r["fixed"] for r in rows], "o-", label="fixed-rank LoRA (one run per rank)")
    markers = "s^vD<>ph*XdP8H"
    for i, variant in enumerate(variants):
        marker = markers[i % len(markers)]
        ax.plot(ranks, [r[variant] for r in rows], marker + "--", label=f"dylora {variant}")
    ax.axhline(naive, color="0.6", lw=1, label=f"naive start {naive:.1f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("adapter rank")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("one dynamic-rank run (rank chosen after) vs a run per rank, same budget per run", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def step_memory(plan: str, quantize: bool, rank: int) -> dict:
    """MiB: active memory of the model with its adapters, and the peak over one training step."""
    model, _, _, _ = convert("default", plan, quantize=quantize, dtype="float32")
    adapters.make_trainable(model, "dylora", 0, {"rank": rank, "scale": SCALE, "dropout": 0.0})
    mx.eval(model.parameters())
    value_and_grad = nn.value_and_grad(model, make_loss(None, 0.0, 1.0))
    optimizer = optim.Adam(learning_rate=1e-4)
    batch, lengths = mx.random.randint(0, 49152, (1, 129), key=mx.random.key(0)), mx.array([[0, 128]])
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    tic = time.perf_counter()
    (loss_sum, count), grads = value_and_grad(model, batch, lengths)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    seconds = time.perf_counter() - tic
    result = {"active_mib": before / 2**20, "peak_mib": mx.get_peak_memory() / 2**20, "step_s": seconds}
    del model, value_and_grad, optimizer, grads
    return result


def curve(path: Path):
    return [r["train_loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def main():
    args = parser.parse_args()
    args.plan = args.plan or shipped.read_card()["plan"]
    if args.calibrate_scale and args.reuse and json.loads(Path(args.reuse).read_text())["settings"].get("seed", 0) == args.seed:
        raise SystemExit("--calibrate-scale calibrates the fixed-rank runs themselves: drop --reuse or use another --seed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    low, high = min(args.ranks), max(args.ranks)
    print(f"plan {args.plan} from a naive start; per run {args.iters} KD steps of 4 x 256 tokens (built-in data), "
          f"lr {args.learning_rate}, LoRA scale {SCALE}; dylora ranks {low}..{high}: {', '.join(args.variants)}")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32, device {mx.default_device()}", flush=True)

    naive_model, tokenizer = load("default", plan=args.plan)
    windows = heldout_windows(builtin_tokens(tokenizer))
    naive = perplexity(naive_model, windows)
    del naive_model
    print(f"naive start: held-out perplexity {naive:.2f}", flush=True)

    earlier = reused(args)
    dylora, earlier_minutes = {}, dict(earlier["dylora_cpu_min"]) if earlier else {}
    validation = dict(earlier.get("validation", {})) if earlier else {}
    _, valid = builtin_examples(tokenizer, 256, "builtin")  # finetune's validation examples at this window
    seed_setting = {"seed": args.seed} if args.seed else {}  # seed 0 runs keep their earlier settings, so are reused
    for spec in args.variants:
        variant = seeded(spec, args.seed)
        if variant in earlier_minutes:
            continue
        sampling, scaling, draw, lr, weight = (spec.split("/") + [None, None, None])[:5]
        draw, lr, weight = draw or "step", lr or "constant", int(weight or 1)
        dylora[variant] = run(args, directory_name("dylora " + variant), "dylora", {
            "rank": high, "min_rank": low, "rank_sampling": sampling, "rank_scaling": scaling, "rank_draw": draw,
            "rank_lr": lr, "min_rank_weight": weight, "scale": SCALE, "dropout": 0.0}, **seed_setting)
        print(f"dylora run ({variant}): {dylora[variant][1]:.1f} CPU min", flush=True)
        validation[variant] = validation_ce(args, dylora[variant][0], sorted({low, 4, high} & set(range(low, high + 1))), valid)
        print(f"  validation cross-entropy at ranks " + ", ".join(f"{r}: {v:.3f}" for r, v in validation[variant].items()), flush=True)
    rows, same_seed = [], earlier is not None and earlier["settings"].get("seed", 0) == args.seed
    fixed = {}
    for rank in sorted(args.ranks):
        if same_seed:
            row = dict(next(r for r in earlier["rows"] if r["rank"] == rank))
        else:
            fixed_dir, fixed_min = run(args, directory_name(seeded(f"lora-r{rank}", args.seed)), "lora",
                                       {"rank": rank, "scale": SCALE, "dropout": 0.0}, **seed_setting)
            fixed[rank] = fixed_dir
            row = {"rank": rank, "fixed": ranked_perplexity(args, fixed_dir, rank, windows), "fixed_cpu_min": fixed_min}
        for variant, (path, _) in dylora.items():
            row[variant] = ranked_perplexity(args, path, rank, windows)
        rows.append(row)
        print(f"rank {rank:>3}: fixed {row['fixed']:.2f} ({row['fixed_cpu_min']:.1f} CPU min{', earlier run' if same_seed else ''}), "
              + ", ".join(f"dylora {s} {row[s]:.2f} ({row[s] / row['fixed']:.3f})" for s in dylora), flush=True)

    minutes = {**earlier_minutes, **{s: m for s, (_, m) in dylora.items()}}
    variants = [v for v in minutes if v in rows[0]]
    mark = lambda s: " (earlier run)" if s in earlier_minutes else ""
    print("\n| rank | fixed-rank LoRA (a run per rank)" + (" (earlier run)" if same_seed else "") + " | "
          + " | ".join(f"dylora {s}{mark(s)} | / fixed" for s in variants) + " |")
    print("|---|---|" + "---|---|" * len(variants))
    for r in rows:
        print(f"| {r['rank']} | {r['fixed']:.2f} | " + " | ".join(f"{r[s]:.2f} | {r[s] / r['fixed']:.3f}" for s in variants) + " |")
    fixed_total = sum(r["fixed_cpu_min"] for r in rows)
    print(f"\nnaive start {naive:.2f}; CPU minutes: dylora " + ", ".join(f"{s} {m:.1f}{mark(s)}" for s, m in minutes.items())
          + f" (one run each) vs {fixed_total:.1f} for the {len(rows)} fixed-rank runs; the first run computes the teacher's outputs, the rest read them")
    plot(rows, variants, naive, args.png)
    results = {"settings": vars(args), "naive": naive, "dylora_cpu_min": minutes, "rows": rows, "validation": validation,
               "reused": {"from": args.reuse, "variants": list(earlier_minutes)} if earlier else None}
    if earlier and args.skip_quantized:
        results.update({k: earlier[k] for k in ("memory", "curves") if k in earlier})
    if args.calibrate_scale:
        results["calibrated"] = calibrated_table(args, dylora, fixed, rows, windows, valid)

    if not args.skip_quantized:
        memory = {name: step_memory(args.plan, quantize, high) for name, quantize in (("float32", False), ("4-bit", True))}
        for name, m in memory.items():
            print(f"{name} base: model + adapters {m['active_mib']:.0f} MiB, peak over a step {m['peak_mib']:.0f} MiB, "
                  f"step {m['step_s']:.1f} s (batch 1 x 128)", flush=True)
        print(f"4-bit / float32: model {memory['4-bit']['active_mib'] / memory['float32']['active_mib']:.2f}x, "
              f"peak {memory['4-bit']['peak_mib'] / memory['float32']['peak_mib']:.2f}x")
        curves = {}
        for name, quantize in (("float32", False), ("4-bit", True)):
            base = out / f"base-{name}"
            convert("default", args.plan, quantize=quantize, dtype="float32", out=base, force=True)
            path, _ = run(args, f"q-{name}", "dylora", {"rank": high, "min_rank": low, "scale": SCALE, "dropout": 0.0,
                                                        "rank_sampling": "powers", "rank_scaling": "inverse",
                                                        "rank_draw": "step"},
                          model=str(base), plan=None, kv_init=None, iters=args.quantized_iters, batch_size=1,
                          max_seq_length=128, steps_per_report=1, steps_per_eval=args.quantized_iters, val_batches=2,
                          save_every=args.quantized_iters, teacher_cache=None)
            curves[name] = curve(path)
        print("KD loss per step, float32 base: " + " ".join(f"{x:.3f}" for x in curves["float32"]))
        print("KD loss per step, 4-bit base:   " + " ".join(f"{x:.3f}" for x in curves["4-bit"]))
        results.update(memory=memory, curves=curves)
    Path(args.results or out / "dylora.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
