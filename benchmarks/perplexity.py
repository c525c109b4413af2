"""Held-out perplexity of the default model, unshared and naively shared.

    python benchmarks/perplexity.py [--model default] [--plans none cla:2 ...]

Protocol (echo_mlx.analysis.evaluate): Python's own pydoc_data.topics, values joined in
sorted key order with blank lines, tokenized without special tokens; 16
windows of 513 tokens spread evenly over the second half; ppl = exp(mean NLL
over the 16 x 512 targets). The first row is stock mlx-lm llama on the same
float32 weights, so the table also checks our port. Naive = converted, no
adaptation: sharing K/V without training is expected to be catastrophic.
"""

import argparse
import platform
import time

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx
from mlx_lm.models import llama

from echo_mlx import blas
from echo_mlx.analysis.evaluate import mean_nll
from echo_mlx.conversion.convert import convert
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows
from echo_mlx.io.sources import load_source


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--plans", nargs="+", default=["none", "cla:2"])
    parser.add_argument("--kv-init", nargs="+", default=["own", "mean"])
    args = parser.parse_args()

    src = load_source(args.model)
    tokens = builtin_tokens(src.tokenizer)
    windows = heldout_windows(tokens)
    print(f"model: {src.source}")
    print(f"settings: float32, {len(tokens):,} corpus tokens, {len(windows)} windows x 512 targets, batch 4")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}")

    reference = llama.Model(llama.ModelArgs.from_dict(src.config))
    reference.load_weights(list(reference.sanitize(dict(src.weights)).items()))
    rows = [("mlx-lm llama (reference)", "-", 30, _timed(reference, windows))]
    for plan in args.plans:
        for kv_init in (["own"] if plan == "none" else args.kv_init):
            model, _, config, summary = convert(args.model, plan, kv_init=kv_init)
            rows.append((f"echo {plan}", kv_init, len(summary.plan.producers), _timed(model, windows)))

    import math

    base = next((nll for name, _, _, (nll, _) in rows if name == "echo none"), rows[0][3][0])
    print(f"\n{'model':<28}{'kv-init':<9}{'K/V layers':>11}{'ppl':>14}{'x none':>10}{'seconds':>9}")
    for name, kv_init, producers, (nll, seconds) in rows:
        ppl = math.exp(nll)
        print(f"{name:<28}{kv_init:<9}{producers:>11}{ppl:>14,.3f}{ppl / math.exp(base):>10.2f}{seconds:>9.1f}")


def _timed(model, windows):
    start = time.perf_counter()
    nll = mean_nll(model, windows)
    return nll, time.perf_counter() - start


if __name__ == "__main__":
    main()
