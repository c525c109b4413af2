"""Convert the embedded SmolLM2-135M with a sharing plan, in memory and on disk.

    python examples/convert_plan.py [PLAN] [OUT]
"""

import sys

import echo_mlx  # first: OpenBLAS on Linux

plan = sys.argv[1] if len(sys.argv) > 1 else "cla:2"
out = sys.argv[2] if len(sys.argv) > 2 else None

model, tokenizer, config, summary = echo_mlx.convert("default", plan, kv_init="mean", out=out, force=True)
for line in summary.lines():
    print(line)
print("producers:", summary.plan.producers)
print("consumer 1 has k_proj:", hasattr(model.layers[1].self_attn, "k_proj"))
