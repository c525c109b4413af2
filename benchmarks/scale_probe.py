"""Validation cross-entropy of trained adapters at a rank with their LoRA scale times m (no training).

    python benchmarks/scale_probe.py RUN_DIR:RANK:M1,M2,... [RUN_DIR:RANK:M1,...]

Runs of benchmarks/dylora.py (its plan, the default model); the validation batches are finetune's
(8 x 4 x 256 tokens of the built-in training half), as benchmarks/dylora.py's validation figures.
What motivated echo_mlx.tuner.rank_scales (output kept in benchmarks/scale_probe.log).
"""

import sys

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)

from echo_mlx.api import load
from echo_mlx.tuner import adapters, rank_scales
from echo_mlx.tuner.data import builtin_examples
from echo_mlx.tuner.finetune import FinetuneArgs, evaluate, make_loss

PLAN = "0_1_2_3_2_5_3_5_8_9_10_11_12_13_14_15_16_17_18_19_20_21_22_23_24_22_26_27_27_27"  # benchmarks/dylora.py's

settings, loss, valid = FinetuneArgs(batch_size=4, max_seq_length=256, val_batches=8), make_loss(None, 0.0, 1.0), None
for spec in sys.argv[1:]:
    path, rank, factors = spec.split(":")
    config = adapters.read_config(path)
    dynamic = adapters.rank_range(config) is not None
    model, tokenizer = load("default", plan=PLAN, adapter_path=path, lora_rank=int(rank) if dynamic else None)
    valid = valid or builtin_examples(tokenizer, 256, "builtin")[1]
    trained = config["lora_parameters"].get("trained_scale", config["lora_parameters"]["scale"])
    for m in map(float, factors.split(",")):
        rank_scales.set_scale(model, trained * m)
        print(f"{path} rank {rank} x{m}: {evaluate(model, loss, valid, settings, 0, 1):.4f}", flush=True)
