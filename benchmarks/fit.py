"""What each part of the calibrated conversion buys, measured on validation text.

    python benchmarks/fit.py --plan sandwich-bottom:15 --tokens 24576 \\
        --variants o_proj keys,heads,o_proj keys,heads,o_proj,mlp keys,heads,o_proj,mlp:1e-2 \\
        [--calibration builtin corpus+chat ...]

One teacher stream over the calibration windows is shared by every variant;
each variant is ``parts[:ridge[:prior]]`` (echo_mlx.conversion.fit.FitOptions: parts
among keys, heads, producer_queries, values, refine, o_proj, mlp, correct; ridge default 1e-3; ``prior``
shrinks re-solved matrices towards the original's). Reported per variant:
validation perplexity (the built-in corpus's validation part, where choices
are made; never the held-out half) and, with a chat template, the chat set's
validation answers scored as in echo_mlx.datasets.chat (perplexity ratio to the
original, share ranked first), and the general set's validation samples
(echo_mlx.datasets.general). ``--calibration`` takes one or more of convert's
keywords (``builtin``, the default: corpus, chat and general training windows
taking turns; ``corpus``, ``chat``, ``general``, or ``+``-joined choices such
as ``corpus+chat``); each gets its own teacher stream and every variant.
"""

import argparse
import platform
import time

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import blas
from echo_mlx.analysis.evaluate import perplexity
from echo_mlx.conversion.convert import shared_model, unshared_model
from echo_mlx.conversion.fit import Calibration, FitOptions, calibration, fit_model
from echo_mlx.datasets import chat, corpus, general
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plan", default="sandwich-bottom:15")
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--calibration", nargs="+", default=["builtin"])
    parser.add_argument("--variants", nargs="+", default=["keys,heads,o_proj,mlp"])
    parser.add_argument("--refine-epochs", type=int, default=FitOptions().refine_epochs)
    parser.add_argument("--refine-lr", type=float, default=FitOptions().refine_lr)
    args = parser.parse_args()

    src = load_source(args.model, dtype="float32")
    tokenizer = src.tokenizer
    plan = SharingPlan.parse(args.plan, src.config["num_hidden_layers"])
    options = FitOptions(tokens=args.tokens)
    validation = corpus.validation_windows(tokenizer)
    print(f"plan {args.plan} = {plan} ({plan.kv_reduction:.2f}x); validation: {len(validation)} windows of "
          f"{len(validation[0]) - 1} targets; mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32",
          flush=True)
    teacher = unshared_model(src)
    with_chat, with_general = chat.usable(tokenizer), general.available()
    reference = chat.answer_scores(teacher, tokenizer, "valid") if with_chat else None
    general_reference = general.scores(teacher, tokenizer, "valid") if with_general else None
    print(f"original: validation ppl {perplexity(teacher, validation):.3f}"
          + (f"; chat validation answers ppl {reference['ppl']:.3f}, top-1 {reference['top1']:.1%}" if with_chat else "")
          + (f"; general validation ppl {general_reference['ppl']:.3f}" if with_general else ""))
    naive = shared_model(src.config, src.weights, plan)[0]
    print(f"naive: validation ppl {perplexity(naive, validation):,.1f}", flush=True)

    print("\n| calibration | fitted | ridge | validation ppl | chat ppl ratio | chat top-1 | general ppl ratio | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for which in args.calibration:
        windows, described = calibration(tokenizer, which, options)
        tic = time.perf_counter()
        cal = Calibration(teacher, windows, options.batch)
        print(f"calibration {which}: {described}; teacher stream {time.perf_counter() - tic:.0f} s", flush=True)
        for variant in args.variants:
            parts, *rest = variant.split(":")
            ridge = float(rest[0]) if rest else 1e-3
            fit = FitOptions(tokens=args.tokens, ridge=ridge, parts=tuple(parts.split(",")), prior=len(rest) > 1,
                             refine_epochs=args.refine_epochs, refine_lr=args.refine_lr)
            model = shared_model(src.config, src.weights, plan)[0]
            tic = time.perf_counter()
            fit_model(model, teacher, windows, fit, described, cal=cal)
            seconds = time.perf_counter() - tic
            scores = chat.answer_scores(model, tokenizer, "valid") if with_chat else None
            chat_cells = f"{scores['ppl'] / reference['ppl']:.3f} | {scores['top1']:.1%}" if with_chat else "- | -"
            general_cell = (f"{general.scores(model, tokenizer, 'valid')['ppl'] / general_reference['ppl']:.3f}"
                            if with_general else "-")
            print(f"| {which} | {parts}{' (prior)' if fit.prior else ''} | {ridge:g} | {perplexity(model, validation):.2f} | "
                  f"{chat_cells} | {general_cell} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
