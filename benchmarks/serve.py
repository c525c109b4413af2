"""Serving throughput within a KV-memory budget: how many sequences fit, and how fast they go.

    python benchmarks/serve.py [--kv-budget-mib 256] [--prompt-tokens 1024] [--max-tokens 128]
                               [--plans none sandwich-bottom:15 echoatt:3 mlx-lm] [--concurrency 1 half fit]
                               [--plot benchmarks/serve.png]

One process, the embedded SmolLM2-135M in float32. For each model, the number
of sequences that fit the KV budget is computed from its cache layout (K/V
bytes per token x (prompt + generated tokens)), and the workload (distinct
--prompt-tokens slices of the built-in corpus, --max-tokens greedy tokens
each, no stop token) runs through mlx-lm's BatchGenerator, as
`echo-mlx generate --prompts-file` does, at each concurrency of
--concurrency (numbers, `half` and `fit`), the models alternating at each
level; the level that fits runs --rounds times (medians reported). Naive conversion: speed does not
depend on the weights' values. `mlx-lm` is stock mlx-lm's llama with the
same weights.

Reported per model and concurrency: prefill tok/s, aggregate decode tok/s
(generated tokens over decode time), resident KV bytes at the end, peak
memory; and, for each decode step, what it must move and compute (weights
read once per step, K/V read by every layer that attends, arithmetic),
against the step's measured time: what limits the machine. Timings on a
shared 2-core box drift by +-20%: compare ratios from one run.
"""

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from echo_mlx import blas
from echo_mlx.conversion.convert import shared_model
from echo_mlx.datasets.corpus import builtin_tokens
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner.plot import save_figure


def build(src, name):
    """(model, a fresh per-sequence cache, resident K/V bytes per token, K/V bytes read per cached
    token and decode step). float32; a layer that reuses kept probabilities stores and reads V only."""
    config = src.config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    head_bytes = config["num_key_value_heads"] * head_dim * 4
    if name == "mlx-lm":
        model = llama.Model(llama.ModelArgs.from_dict(config))
        model.load_weights(list(model.sanitize(dict(src.weights)).items()))
        per_token = 2 * head_bytes * config["num_hidden_layers"]
        return model, lambda: make_prompt_cache(model), per_token, per_token
    plan = SharingPlan.parse(name, config["num_hidden_layers"])
    model, _ = shared_model(config, src.weights, plan, source=src.source)
    width = lambda attn: 1 if attn.reuses_attention else 2  # V alone, or K and V
    stored = sum(head_bytes * width(layer.self_attn) for layer in model.layers if layer.self_attn.produces_kv)
    read = sum(head_bytes * width(layer.self_attn) for layer in model.layers)
    return model, model.make_cache, stored, read


def run(model, new_cache, prompts, max_tokens):
    """The workload through BatchGenerator; returns its statistics."""
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=len(prompts), prefill_batch_size=len(prompts),
                         prefill_step_size=512)
    gen.insert(prompts, [max_tokens] * len(prompts), caches=[new_cache() for _ in prompts])
    mx.reset_peak_memory()
    generated, steps = 0, 0
    with gen.stats() as stats:
        while responses := gen.next_generated():
            generated += len(responses)
            steps += 1
    gen.close()
    assert generated == len(prompts) * max_tokens, (generated, len(prompts), max_tokens)
    return dict(prefill_tps=stats.prompt_tps, decode_tps=stats.generation_tokens / stats.decode_time,
                decode_step_s=stats.decode_time / stats.generation_steps, peak_gb=mx.get_peak_memory() / 1e9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-budget-mib", type=float, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--plans", nargs="+", default=["none", "sandwich-bottom:15", "echoatt:3", "mlx-lm"])
    parser.add_argument("--concurrency", nargs="+", default=["1", "half", "fit"])
    parser.add_argument("--rounds", type=int, default=2, help="runs at the concurrency that fits, models alternating")
    parser.add_argument("--plot", default="benchmarks/serve.png")
    parser.add_argument("--json", default="runs/serve.json")
    args = parser.parse_args()

    src = load_source("default", dtype="float32")
    params = sum(v.size for v in src.weights.values())
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32, device {mx.default_device()}")
    print(f"KV budget {args.kv_budget_mib:g} MiB; prompts of {args.prompt_tokens} tokens, {args.max_tokens} greedy tokens "
          f"each, no stop token; mlx-lm BatchGenerator, prefill and completion batch = concurrency", flush=True)
    corpus = builtin_tokens(src.tokenizer)
    span = args.prompt_tokens
    models = {}
    for name in args.plans:
        model, new_cache, per_token, read_per_token = build(src, name)
        per_sequence = per_token * (args.prompt_tokens + args.max_tokens)
        fit = int(args.kv_budget_mib * 2**20 // per_sequence)
        if fit < 1:
            raise SystemExit(f"{name}: one sequence needs {per_sequence / 2**20:.1f} MiB of K/V: raise --kv-budget-mib")
        models[name] = dict(model=model, new_cache=new_cache, per_token=per_token, read=read_per_token, fit=fit)
        print(f"{name}: {per_token:,} KV bytes per token, {per_sequence / 2**20:.1f} MiB per sequence: {fit} fit", flush=True)

    def level(kind, fit):
        return fit if kind == "fit" else max(1, fit // 2) if kind == "half" else min(int(kind), fit)

    # The models alternate at every level, and the level that fits runs --rounds times
    # (in reverse order every other round): the machine's drift hits them alike.
    schedule = [(kind, list(models)) for kind in args.concurrency]
    schedule += [("fit", list(models)[::-1] if r % 2 == 0 else list(models)) for r in range(args.rounds - 1)]
    rows = []
    for kind, names in schedule:
        for name in names:
            m, n = models[name], level(kind, models[name]["fit"])
            prompts = [corpus[(i * span) % (len(corpus) - span):][:span] for i in range(n)]
            result = run(m["model"], m["new_cache"], prompts, args.max_tokens)
            context = args.prompt_tokens + args.max_tokens / 2  # the average cached tokens per decode step
            flops = 2 * params * n + 4 * n * context * src.config["hidden_size"] * src.config["num_hidden_layers"]
            row = dict(model=name, sequences=n, fit=m["fit"], kv_bytes_per_token=m["per_token"], **result,
                       weight_gb_per_step=params * 4 / 1e9, kv_gb_per_step=n * context * m["read"] / 1e9,
                       gflop_per_step=flops / 1e9)
            rows.append(row)
            print(f"{name}, {n} sequences: prefill {result['prefill_tps']:.0f} tok/s, decode {result['decode_tps']:.1f} tok/s "
                  f"({result['decode_step_s'] * 1e3:.0f} ms a step: weights {row['weight_gb_per_step']:.2f} GB, K/V "
                  f"{row['kv_gb_per_step']:.2f} GB, {row['gflop_per_step']:.1f} GFLOP), peak {result['peak_gb']:.2f} GB", flush=True)

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(settings=vars(args), rows=rows), indent=2))
    at_fit = {}
    for name in models:
        runs = [r for r in rows if r["model"] == name and r["sequences"] == r["fit"]]
        at_fit[name] = dict(runs[0], **{k: statistics.median(r[k] for r in runs)
                                        for k in ("prefill_tps", "decode_tps", "decode_step_s", "peak_gb")})
    print(f"\nmedians over {args.rounds} rounds at the concurrency that fits the budget:")
    print("\n| model | KV bytes/token | sequences in budget | prefill tok/s | decode tok/s (aggregate) | ms/step | "
          "GB read/step (weights + K/V) | GFLOP/step | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in at_fit.items():
        print(f"| {name} | {r['kv_bytes_per_token']:,} | {r['fit']} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
              f"{r['decode_step_s'] * 1e3:.0f} | {r['weight_gb_per_step']:.2f} + {r['kv_gb_per_step']:.2f} | "
              f"{r['gflop_per_step']:.1f} | {r['peak_gb']:.2f} |")
    if "none" in at_fit:
        base = at_fit["none"]
        print("\n| ratio to none, each at its fit | sequences | decode tok/s | prefill tok/s |")
        print("|---|---|---|---|")
        for name, r in at_fit.items():
            print(f"| {name} | {r['fit'] / base['fit']:.2f}x | {r['decode_tps'] / base['decode_tps']:.2f}x | "
                  f"{r['prefill_tps'] / base['prefill_tps']:.2f}x |")
        if "mlx-lm" in at_fit:
            a, b = at_fit["none"], at_fit["mlx-lm"]
            print(f"\nnone vs stock mlx-lm, both at {a['fit']} sequences: decode {a['decode_tps'] / b['decode_tps']:.2f}x, "
                  f"prefill {a['prefill_tps'] / b['prefill_tps']:.2f}x")
    plot(rows, Path(args.plot), args)


def plot(rows, path: Path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        by_level = {}
        for r in rows:
            if r["model"] == name:
                by_level.setdefault(r["sequences"], []).append(r["decode_tps"])
        levels = sorted(by_level)
        ax.plot(levels, [statistics.median(by_level[n]) for n in levels], marker="o", label=name)
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(f"within {args.kv_budget_mib:g} MiB of K/V: prompts of {args.prompt_tokens}, {args.max_tokens} tokens each",
                 fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
