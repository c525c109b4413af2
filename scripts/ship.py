"""Ship a converted, fitted and adapted model as the default: weights/smollm2-135m-echo/.

    python scripts/ship.py prepare --plan PLAN --calibration-tokens 49152 --out runs/ship/base
    echo-mlx finetune --model runs/ship/base ... --adapter-path runs/ship/adapters
    python scripts/ship.py card runs/ship --plan-name NAME --command "echo-mlx finetune ..." \\
        --wall-minutes M --hardware "..."
    python scripts/ship.py validate runs/ship runs/other-candidate ...

``prepare`` converts the default model with ``--kv-init fit`` and rounds the
tensors the fit changed to float16, then writes that as the checkpoint to
adapt: the base that ships (naive conversion + ``fit.safetensors`` in float16)
is then exactly the base the adapters were trained on.

``card`` measures everything on the card itself: held-out perplexity
(echo_mlx.analysis.evaluate's 16 x 512 protocol) of the original, the naive conversion,
the fitted base and the adapted model; the held-out chat answers (echo_mlx.datasets.chat),
the general set's held-out samples (echo_mlx.datasets.general) and the other-domain text (echo_mlx.analysis.evaluate.other_domain_windows) under the
original and the adapted model; then it copies the run's best-validation
adapters and the fitted tensors and writes the card with their checksums.

``validate`` is what a candidate is chosen on: the same four figures on
validation text only (the corpus's validation windows, the chat and general
sets' validation splits, the validation licences), for the shipped model and
each run's fitted base and adapted model, as ratios to the original.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx.analysis.evaluate import other_domain_validation_windows, other_domain_windows, perplexity
from echo_mlx.api import load
from echo_mlx.conversion.convert import convert
from echo_mlx.conversion.fit import FitOptions, parse_parts
from echo_mlx.datasets import chat, general
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows, validation_windows
from echo_mlx.errors import EchoError
from echo_mlx.io import checkpoint, shipped
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner import adapters


def fit_options(args) -> FitOptions:
    return FitOptions(tokens=args.calibration_tokens, parts=parse_parts(args.fit_parts), refine_epochs=args.refine_epochs,
                      ridge=args.ridge, prior=args.shrink_to_original)


def prepare_command(plan_name: str, fit: dict, base_dir) -> str:
    """The ``prepare`` command line that reproduces ``fit`` (a checkpoint's fit provenance): the card's first line."""
    return (f"python scripts/ship.py prepare --plan {plan_name} --calibration-tokens {fit['tokens']}"
            + (f" --fit-parts {','.join(fit['parts'])}" if tuple(fit["parts"]) != FitOptions().parts else "")
            + (f" --refine-epochs {fit['refine_epochs']}" if "refine" in fit["parts"] else "")
            + (f" --ridge {fit['ridge']:g}" if fit["ridge"] != FitOptions().ridge else "")
            + ((" --shrink-to-original" if fit.get("prior") else " --no-shrink-to-original")
               if bool(fit.get("prior")) != FitOptions().prior else "")
            + f" --out {base_dir}")


def adapter_description(config: dict, num_layers: int) -> str:
    """The card's adapter line, from the run's adapter_config.json: type, rank, scale, layers and (when the
    config names them, as mlx-lm's ``keys``) the adapted projections."""
    lora = config["lora_parameters"]
    keys = f" ({', '.join(k.rsplit('.', 1)[-1] for k in lora['keys'])})" if lora.get("keys") else ""
    return (f"{config['fine_tune_type']} rank {lora['rank']} scale {lora['scale']} on layers "
            f"{config['trainable_from']}..{num_layers - 1}{keys}")


def prepare(args):
    tic = time.perf_counter()
    options = fit_options(args)
    model, tokenizer, config, _ = convert("default", args.plan, kv_init="fit", fit_options=options, progress=True)
    naive, _ = load("default", plan=args.plan, kv_init="own")
    fitted = shipped.fitted_tensors(model, naive)
    model.load_weights([(k, v.astype(mx.float32)) for k, v in fitted.items()], strict=False)
    mx.eval(model.parameters())
    config["echo"]["shipped_base"] = "fitted tensors rounded to float16 (weights/*/fit.safetensors)"
    checkpoint.save(args.out, model, config, tokenizer, force=args.force)
    print(f"wrote {args.out}: {len(fitted)} fitted tensors rounded to float16, "
          f"{sum(v.nbytes for v in fitted.values()) / 2**20:.1f} MiB; {(time.perf_counter() - tic) / 60:.1f} min")


def figures(model, tokenizer, split, corpus_windows, licence_windows):
    """What a candidate is judged on, on one split ("valid" or "heldout"): corpus and licence perplexity, and the
    chat answers' and the general set's scores (dicts, as chat.answer_scores and general.scores return them)."""
    return {"corpus": perplexity(model, corpus_windows), "licences": perplexity(model, licence_windows),
            "chat": chat.answer_scores(model, tokenizer, split), "general": general.scores(model, tokenizer, split)}


def card(args):
    run, out = Path(args.run), Path(args.out)
    base_dir, adapter_dir = run / "base", run / "adapters"
    config = adapters.read_config(adapter_dir)
    metrics = [json.loads(line) for line in (adapter_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = max(r.get("tokens", 0) for r in metrics)

    original, tokenizer = load("default", plan="none")
    windows = heldout_windows(builtin_tokens(tokenizer))
    other = other_domain_windows(tokenizer)
    reference = figures(original, tokenizer, "heldout", windows, other)
    del original
    naive, _ = load("default", plan=args.plan_name, kv_init="own")
    plan = SharingPlan.parse(args.plan_name, len(naive.layers))
    assert str(plan) == config["echo"]["plan"], "the run trained another plan"
    naive_ppl = perplexity(naive, windows)
    fitted = shipped.fitted_tensors(checkpoint.load(base_dir)[0], naive)
    del naive

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / shipped.FIT), fitted)
    for name in (shipped.ADAPTERS, "adapter_config.json"):
        shutil.copyfile(adapter_dir / name, out / name)
    model, _ = shipped.base("default", args.plan_name, out / shipped.FIT)
    fitted_ppl = perplexity(model, windows)
    adapters.apply(model, out, "default")
    adapted = figures(model, tokenizer, "heldout", windows, other)
    print(f"original {reference['corpus']:.3f}, naive {naive_ppl:,.1f}, fitted {fitted_ppl:.2f}, "
          f"adapted {adapted['corpus']:.3f}; chat ratio {adapted['chat']['ppl'] / reference['chat']['ppl']:.3f}, "
          f"top-1 {adapted['chat']['top1']:.1%}; other domain {adapted['licences']:.3f} vs {reference['licences']:.3f}; "
          f"general held-out samples {adapted['general']['ppl']:.3f} vs {reference['general']['ppl']:.3f}")

    command = args.command
    if args.config:
        if not (out / "finetune.yaml").exists() or not (out / "finetune.yaml").samefile(args.config):
            shutil.copyfile(args.config, out / "finetune.yaml")
        command = command.replace(f"-c {args.config}", f"-c {os.path.relpath(out)}/finetune.yaml")  # as run from the repo root
    fit = checkpoint.load_config(base_dir)["echo"]["fit"]
    card = {
        "name": "smollm2-135m-echo",
        "summary": (f"SmolLM2-135M-Instruct with the `{args.plan_name}` sharing plan ({plan.kv_reduction:.2f}x smaller "
                    f"KV cache): converted with `--kv-init fit` (every changed layer fitted to the original by least "
                    f"squares), then adapted with `echo-mlx finetune` (logit distillation from the original on the "
                    f"built-in corpus, chat set and general set). The base weights are not here; only what conversion and "
                    f"adaptation changed."),
        "base_model": "default",
        "base_model_description": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
        "plan": args.plan_name,
        "plan_string": str(plan),
        "kv_reduction": plan.kv_reduction,
        "kv_init": "fit",
        "fit": {k: fit[k] for k in ("calibration", "tokens", "window", "ridge", "parts")
                + (("refine_epochs", "refine_lr") if "refine" in fit["parts"] else ())}
               | {"prior": bool(fit.get("prior"))},
        "adapter": adapter_description(config, plan.num_layers),
        "data": ("the built-in corpus's training part (Python's pydoc topics; its held-out half and any 32-token span "
                 "of the held-out windows never trained on), the built-in chat set's training split (the "
                 "original's own answers; held-out prompts never trained on) and the general set's training split "
                 "(the original's own continuations of openings in 33 genres; held-out openings never trained on)"),
        "recipe": command.split("finetune", 1)[-1].strip(),
        "hardware": args.hardware,
        "protocol": "echo_mlx.analysis.evaluate: 16 windows x 512 scored targets over the built-in corpus's held-out half, no BOS.",
        "command": f"{prepare_command(args.plan_name, fit, base_dir)}\n{command}",
        "results": {
            "tokens": tokens, "wall_minutes": args.wall_minutes, "original_ppl": reference["corpus"],
            "naive_ppl": naive_ppl, "fitted_ppl": fitted_ppl, "adapted_ppl": adapted["corpus"],
            "chat_answers": adapted["chat"]["answers"], "chat_tokens": adapted["chat"]["tokens"],
            "chat_ppl_ratio": adapted["chat"]["ppl"] / reference["chat"]["ppl"], "chat_top1": adapted["chat"]["top1"],
            "original_chat_top1": reference["chat"]["top1"],
            "other_domain_ppl": adapted["licences"], "original_other_domain_ppl": reference["licences"],
            "general_samples": adapted["general"]["samples"], "general_ppl": adapted["general"]["ppl"],
            "original_general_ppl": reference["general"]["ppl"],
        },
    }
    card = shipped.write_card(out, card)
    print(f"wrote {out} (adapters sha256 {card['adapters_sha256'][:16]}..., fit sha256 {card['fit_sha256'][:16]}...)")


def validate(args):
    for run in map(Path, args.runs):  # refused before minutes of measuring the original
        if not checkpoint.is_echo_checkpoint(run / "base") or not (run / "adapters" / adapters.CONFIG).is_file():
            raise SystemExit(f"{run} needs base/ (from prepare; a link to the base its adapters were trained on) "
                             "and adapters/ (from echo-mlx finetune)")
    original, tokenizer = load("default", plan="none")
    corpus_windows, licence_windows = validation_windows(tokenizer), other_domain_validation_windows(tokenizer)
    reference = figures(original, tokenizer, "valid", corpus_windows, licence_windows)
    del original
    print(f"{'model':<32} {'corpus ppl':>10} {'chat ratio':>10} {'chat top-1':>10} {'general':>8} {'licences':>8}")

    def show(name, model):
        f = figures(model, tokenizer, "valid", corpus_windows, licence_windows)
        print(f"{name:<32} {f['corpus']:>10.2f} {f['chat']['ppl'] / reference['chat']['ppl']:>10.3f} "
              f"{f['chat']['top1']:>10.1%} {f['general']['ppl'] / reference['general']['ppl']:>8.3f} "
              f"{f['licences'] / reference['licences']:>8.3f}", flush=True)

    print(f"{'original':<32} {reference['corpus']:>10.2f} {1:>10.3f} {reference['chat']['top1']:>10.1%} "
          f"{1:>8.3f} {1:>8.3f}")
    if not args.skip_shipped:
        show("shipped", shipped.load()[0])
    for run in map(Path, args.runs):
        model = checkpoint.load(run / "base")[0]
        if not args.skip_fitted:
            show(f"{run} fitted", model)
        show(f"{run} adapted", adapters.apply(model, run / "adapters", str(run / "base")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calibration-tokens", type=int, default=FitOptions().tokens)
    p.add_argument("--fit-parts", help="as convert's --fit-parts (default: the fit's default parts)")
    p.add_argument("--refine-epochs", type=int, default=FitOptions().refine_epochs)
    p.add_argument("--ridge", type=float, default=FitOptions().ridge, help="as convert's --ridge")
    p.add_argument("--shrink-to-original", action=argparse.BooleanOptionalAction, default=FitOptions().prior,
                   help="as convert's --[no-]shrink-to-original")
    p.add_argument("--force", action="store_true")
    c = sub.add_parser("card")
    c.add_argument("run", help="the directory holding base/ (from prepare) and adapters/ (the finetune run)")
    c.add_argument("--plan-name", required=True, help="the plan as given to prepare, e.g. a preset or a plan string")
    c.add_argument("--command", required=True, help="the finetune command that produced the run")
    c.add_argument("--wall-minutes", type=float, required=True)
    c.add_argument("--hardware", required=True)
    c.add_argument("--config", help="the run's -c YAML: shipped as finetune.yaml, the command points at it")
    c.add_argument("--out", default=str(shipped.SHIPPED))
    v = sub.add_parser("validate")
    v.add_argument("runs", nargs="*", help="directories holding base/ and adapters/")
    v.add_argument("--skip-shipped", action="store_true")
    v.add_argument("--skip-fitted", action="store_true", help="only the adapted models (their bases measured before)")
    return parser


def main():
    args = build_parser().parse_args()
    try:
        {"prepare": prepare, "card": card, "validate": validate}[args.verb](args)
    except EchoError as e:  # a user's mistake: one line, as echo-mlx prints it
        raise SystemExit(f"ship.py: error: {e}")


if __name__ == "__main__":
    main()
