"""Generation speed and KV memory: echo plans vs the unshared model vs stock mlx-lm.

    python benchmarks/generate.py [--contexts 512 2048 8192] [--decode-tokens 32]
                                  [--plans none cla:2 yoco sandwich-top:15] [--budget-gib 1.0]
                                  [--plot benchmarks/kv_memory.png]

One process, same float32 weights (the embedded SmolLM2-135M) and the same
prompt for every model. For each model, the prompt is prefilled up to each
context length in turn (chunks of --prefill-step-size), then --decode-tokens
greedy tokens are timed; the cache is rolled back before the next context.
Reported: prefill tok/s (over the whole prompt), decode tok/s at each
context, resident KV bytes at the largest context, peak memory. Then the
ratio tables echo/none and none/mlx-lm, the largest context that fits
--budget-gib (weights + KV cache), and a PNG of KV memory vs context.
Timings on a shared 2-core box drift by +-20%: compare ratios from one run.
"""

import argparse
import gc
import platform
import time

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from echo_mlx import blas
from echo_mlx.conversion.convert import shared_model
from echo_mlx.datasets.corpus import builtin_tokens
from echo_mlx.io.checkpoint import kv_cache_bytes
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan


def build(src, name):
    if name == "mlx-lm":
        model = llama.Model(llama.ModelArgs.from_dict(src.config))
        model.load_weights(list(model.sanitize(dict(src.weights)).items()))
        return model, lambda: make_prompt_cache(model)
    plan = SharingPlan.parse(name, src.config["num_hidden_layers"])
    model, _ = shared_model(src.config, src.weights, plan, source=src.source)
    return model, model.make_cache


def run(model, new_cache, tokens, contexts, decode_tokens, step):
    """Prefill to each context, time decode there; returns a result dict."""
    mx.eval(model(mx.array([tokens[:32]])))  # warm-up, untimed
    mx.reset_peak_memory()
    cache = new_cache()
    done, prefill_seconds, decode = 0, 0.0, {}
    for context in contexts:
        start = time.perf_counter()
        while done < context:
            n = min(step, context - done)
            model(mx.array([tokens[done : done + n]]), cache=cache)
            mx.eval([c.state for c in cache])
            done += n
        prefill_seconds += time.perf_counter() - start
        y = mx.array([[tokens[context]]])
        start = time.perf_counter()
        for _ in range(decode_tokens):
            y = model(y, cache=cache)[:, -1:].argmax(-1)
            mx.eval(y)
        decode[context] = decode_tokens / (time.perf_counter() - start)
        kv, slots = kv_cache_bytes(cache), cache[0].keys.shape[2]
        for c in cache:  # roll back the decoded tokens: the next context starts clean
            c.trim(decode_tokens)
    return {
        "prefill_tps": contexts[-1] / prefill_seconds,
        "decode_tps": decode,
        "kv_bytes": kv,
        "kv_per_token": kv / slots,  # bytes per cached token (caches grow in 256-token steps)
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--plans", nargs="+", default=["none", "cla:2", "yoco", "sandwich-top:15"])
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--plot", default="benchmarks/kv_memory.png")
    args = parser.parse_args()

    src = load_source("default")
    tokens = builtin_tokens(src.tokenizer)  # one long natural-text prompt, the same for all
    contexts = sorted(args.contexts)
    assert contexts[-1] + args.decode_tokens < len(tokens)
    weight_bytes = sum(v.nbytes for v in src.weights.values())
    print(f"model: {src.source} (float32, {weight_bytes / 2**20:.0f} MiB of weights)")
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}")
    print(f"settings: contexts {contexts}, {args.decode_tokens} greedy decode tokens each, "
          f"prefill step {args.prefill_step_size}, batch 1, prompt = built-in corpus text\n")

    names = args.plans + ["mlx-lm"]
    results = {}
    for name in names:
        model, new_cache = build(src, name)
        results[name] = run(model, new_cache, tokens, contexts, args.decode_tokens, args.prefill_step_size)
        r = results[name]
        decode = "  ".join(f"{r['decode_tps'][c]:6.2f}" for c in contexts)
        print(f"{name:<18} prefill {r['prefill_tps']:7.1f} tok/s | decode {decode} tok/s | "
              f"KV {r['kv_bytes'] / 2**20:8.2f} MiB | peak {r['peak_gb']:.2f} GB", flush=True)
        del model
        gc.collect()
        mx.clear_cache()

    base = results["none"] if "none" in results else None
    L = src.config["num_hidden_layers"]
    print("\nratios vs plan none (decode columns: " + ", ".join(map(str, contexts)) + ")")
    print(f"{'model':<18}{'K/V layers':>11}{'KV bytes':>10}{'expected':>10}{'prefill':>9}" + "".join(f"{c:>9}" for c in contexts))
    for name in args.plans:
        r = results[name]
        producers = len(SharingPlan.parse(name, L).producers)
        kv_ratio = r["kv_bytes"] / base["kv_bytes"] if base else float("nan")
        decode = "".join(f"{r['decode_tps'][c] / base['decode_tps'][c]:9.2f}" for c in contexts) if base else ""
        print(f"{name:<18}{producers:>11}{kv_ratio:>10.4f}{producers / L:>10.4f}"
              f"{r['prefill_tps'] / base['prefill_tps']:>9.2f}{decode}")
    if base:
        m = results["mlx-lm"]
        decode = "".join(f"{base['decode_tps'][c] / m['decode_tps'][c]:9.2f}" for c in contexts)
        print(f"{'none / mlx-lm':<18}{'':>11}{base['kv_bytes'] / m['kv_bytes']:>10.4f}{1:>10.4f}"
              f"{base['prefill_tps'] / m['prefill_tps']:>9.2f}{decode}")

    budget = args.budget_gib * 2**30
    print(f"\nlargest context in a {args.budget_gib} GiB budget (weights {weight_bytes / 2**20:.0f} MiB + KV cache, "
          f"per-token KV measured above):")
    for name in names:
        per_token = results[name]["kv_per_token"]
        print(f"{name:<18}{per_token:>10,.0f} B/token  {int((budget - weight_bytes) // per_token):>10,} tokens")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot; pip install matplotlib)")
        return
    xs = [2**k for k in range(9, 18)]
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["-", "--", ":", "-.", (0, (1, 3))]  # overlapping lines stay visible
    for k, name in enumerate(names):
        ys = [results[name]["kv_per_token"] * x / 2**20 for x in xs]
        ax.plot(xs, ys, linestyle=styles[k % len(styles)], marker="os^vx"[k % 5], label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("resident KV cache (MiB, float32)")
    ax.set_title("SmolLM2-135M: KV memory vs context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
