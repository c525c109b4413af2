"""EchoAtt's compute saving: decode at a long context and training steps, echoatt vs the unshared model.

    python benchmarks/echoatt.py [--plan echoatt:3] [--context 4096] [--decode-tokens 16]
                                 [--train-batch 4 --train-length 512] [--rounds 3]

One process, the embedded SmolLM2-135M in float32, three models built from the
same weights: ``none``, the EchoAtt plan reusing its sources' attention
probabilities (P kept, the default), and the same plan in the fused form
(every reusing layer recomputes softmax(Q_s K_s^T), as before P was kept;
forced by MAX_SHARED_PROBABILITIES = -1). Naive conversion: speed does not
depend on the weights' values.

- decode: each model prefills --context tokens of the built-in corpus once;
  then, in --rounds rounds with the models alternating, --decode-tokens
  greedy steps are timed and the cache is trimmed back to --context.
- training: in the same alternation, forward + backward of the full model
  (cross-entropy, every weight's gradient) on --train-batch x --train-length
  tokens; tokens/s over the steps.
- attention bytes per decoded token: counted, not timed, from the arrays the
  attention reads at one decode step (keys and values, or V alone where P is
  reused), against the minimum: every K/V-producing layer's K and V once,
  and the reusing layers' V.

Reported per model: the median over rounds, and the ratios to ``none``.
Timings on a shared 2-core box drift by +-20%: compare ratios from one run.
"""

import argparse
import platform
import statistics
import time
from contextlib import nullcontext

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx
import mlx.nn as nn

from echo_mlx import blas
from echo_mlx.conversion.convert import shared_model
from echo_mlx.datasets.corpus import builtin_tokens
from echo_mlx.io.sources import load_source
from echo_mlx.models import model as model_module
from echo_mlx.models.plans import SharingPlan


class Fused:
    """Within this block, sources keep no probabilities: the fused form."""

    def __enter__(self):
        self.limit, model_module.MAX_SHARED_PROBABILITIES = model_module.MAX_SHARED_PROBABILITIES, -1

    def __exit__(self, *exc):
        model_module.MAX_SHARED_PROBABILITIES = self.limit


def nbytes(a) -> int:
    return a.nbytes if isinstance(a, mx.array) else sum(x.nbytes for x in a)


def attention_bytes(model, cache, token) -> int:
    """Bytes of K and V the attention reads for one decoded token, from the arrays it is given."""
    counted = []
    probabilities, apply, attend = model_module._probabilities, model_module._apply_probabilities, model_module.Attention._attend
    model_module._probabilities = lambda q, k, *a: counted.append(nbytes(k)) or probabilities(q, k, *a)
    model_module._apply_probabilities = lambda p, v, c: counted.append(nbytes(v)) or apply(p, v, c)
    model_module.Attention._attend = lambda self, q, k, v, *a: counted.append(nbytes(k) + nbytes(v)) or attend(self, q, k, v, *a)
    try:
        mx.eval(model(token, cache=cache))
    finally:
        model_module._probabilities, model_module._apply_probabilities = probabilities, apply
        model_module.Attention._attend = attend
    for c in cache:
        c.trim(1)
    return sum(counted)


def minimum_bytes(model, context: int) -> int:
    """Every cached K/V read once: producers' K and V, V-only layers' V (float32)."""
    total = 0
    for layer in model.layers:
        attn = layer.self_attn
        if attn.produces_kv:
            per = attn.n_kv_heads * (context + 1) * attn.head_dim * 4
            total += per if attn.reuses_attention else 2 * per
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="echoatt:3")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    args = parser.parse_args()

    src = load_source("default", dtype="float32")
    layers = src.config["num_hidden_layers"]
    print(f"mlx {mx.__version__}, {platform.machine()}, BLAS: {blas.status()}, float32, device {mx.default_device()}")
    print(f"decode at {args.context} cached tokens ({args.decode_tokens} steps per round), training steps of "
          f"{args.train_batch} x {args.train_length} tokens, {args.rounds} rounds, models alternating", flush=True)
    models = {}
    for name, plan, mode in [("none", "none", nullcontext), (f"{args.plan} (P reused)", args.plan, nullcontext),
                             (f"{args.plan} (fused)", args.plan, Fused)]:
        models[name] = (shared_model(src.config, src.weights, SharingPlan.parse(plan, layers), source=src.source)[0], mode)

    tokens = builtin_tokens(src.tokenizer)
    need = max(args.context + args.decode_tokens + 1, args.train_batch * (args.train_length + 1))
    tokens = (tokens * (need // len(tokens) + 1))[:need]
    caches, bytes_read = {}, {}
    for name, (model, mode) in models.items():
        with mode():
            cache = model.make_cache()
            for start in range(0, args.context, args.prefill_step_size):
                model(mx.array([tokens[start : min(start + args.prefill_step_size, args.context)]]), cache=cache)
                mx.eval([c.state for c in cache])
            caches[name] = cache
            bytes_read[name] = attention_bytes(model, cache, mx.array([[tokens[args.context]]]))
        print(f"{name}: prefilled {args.context} tokens; attention reads {bytes_read[name] / 2**20:.1f} MiB per "
              f"decoded token (minimum {minimum_bytes(model, args.context) / 2**20:.1f} MiB)", flush=True)

    batch = mx.array(tokens[: args.train_batch * (args.train_length + 1)]).reshape(args.train_batch, -1)
    loss = lambda m: nn.losses.cross_entropy(m(batch[:, :-1]), batch[:, 1:]).mean()
    decode_rates = {name: [] for name in models}
    train_rates = {name: [] for name in models}
    for r in range(args.rounds):
        for name, (model, mode) in models.items():
            with mode():
                cache, y = caches[name], mx.array([[tokens[args.context]]])
                mx.eval(model(y, cache=cache))  # one untimed step
                start = time.perf_counter()
                for _ in range(args.decode_tokens):
                    y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
                    mx.eval(y)
                decode_rates[name].append(args.decode_tokens / (time.perf_counter() - start))
                for c in cache:
                    c.trim(args.decode_tokens + 1)
                start = time.perf_counter()
                mx.eval(nn.value_and_grad(model, loss)(model))
                train_rates[name].append(batch[:, :-1].size / (time.perf_counter() - start))
        print(f"round {r + 1}: " + ", ".join(f"{n} {decode_rates[n][-1]:.2f} / {train_rates[n][-1]:.0f}" for n in models)
              + " (decode / training tokens/s)", flush=True)

    base = "none"
    print(f"\n| model | decode tok/s at {args.context} | vs none | training tok/s | vs none | attention MiB read per decoded token |")
    print("|---|---|---|---|---|---|")
    for name in models:
        d, t = statistics.median(decode_rates[name]), statistics.median(train_rates[name])
        print(f"| {name} | {d:.2f} | {d / statistics.median(decode_rates[base]):.2f}x | {t:.0f} | "
              f"{t / statistics.median(train_rates[base]):.2f}x | {bytes_read[name] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
