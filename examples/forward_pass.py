"""A forward pass with and without the compact shared cache; they agree.

    python examples/forward_pass.py [PLAN]
"""

import sys

import echo_mlx  # first: OpenBLAS on Linux
import mlx.core as mx

from echo_mlx.io.checkpoint import kv_cache_bytes

plan = sys.argv[1] if len(sys.argv) > 1 else "yoco"
model, tokenizer = echo_mlx.load("default", plan=plan)
ids = mx.array([tokenizer.encode("Keys and values can be shared across layers.")])

full = model(ids)  # no cache: what training and perplexity use
cache = model.make_cache()  # one entry per K/V-producing layer
prefill = model(ids[:, :-1], cache=cache)
last = model(ids[:, -1:], cache=cache)  # one decode step
print(f"plan {plan}: {len(cache)} cache entries for {len(model.layers)} layers")
print(f"max |cached - uncached| logit difference: {mx.abs(last[:, -1] - full[:, -1]).max().item():.2e}")
print(f"resident KV cache: {kv_cache_bytes(cache):,} bytes after {ids.shape[1]} tokens")
