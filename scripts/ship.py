"""Ship a finetune run as the adapted default model: weights/smollm2-135m-echo/.

    python scripts/ship.py RUN_DIR --command "echo-mlx finetune ..." --wall-minutes M --hardware "..."

Measures held-out perplexity (echo_mlx.evaluate's 16 x 512 protocol) of the
original, the naive conversion and the adapted model, copies the run's
best-validation adapters, and writes the card with their checksum. Every
figure on the card is measured here or read from the run's own metrics.
"""

import argparse
import json
import shutil
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)

from echo_mlx import adapters, shipped
from echo_mlx.api import load
from echo_mlx.corpus import builtin_tokens, heldout_windows
from echo_mlx.evaluate import perplexity
from echo_mlx.plans import SharingPlan


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--plan-name", required=True, help="the preset the run trained, e.g. yoco")
    parser.add_argument("--command", required=True, help="the finetune command that produced the run")
    parser.add_argument("--wall-minutes", type=float, required=True)
    parser.add_argument("--hardware", required=True)
    parser.add_argument("--kv-init", default="own", help="the --kv-init the run converted with")
    parser.add_argument("--config", help="the run's -c YAML (LoRA parameters): shipped as finetune.yaml, the command points at it")
    parser.add_argument("--out", default=str(shipped.SHIPPED))
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)

    config = adapters.read_config(run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = max(r.get("tokens", 0) for r in metrics)
    kv_init = args.kv_init

    original, tokenizer = load("default", plan="none")
    windows = heldout_windows(builtin_tokens(tokenizer))
    ppl = lambda m: perplexity(m, windows)
    original_ppl = ppl(original)
    model, _ = load("default", plan=args.plan_name, kv_init=kv_init)
    plan = SharingPlan.parse(args.plan_name, len(model.layers))
    assert str(plan) == config["echo"]["plan"], "the run trained another plan"
    naive_ppl = ppl(model)
    adapted_ppl = ppl(adapters.apply(model, run, "default"))
    print(f"original {original_ppl:.3f}, naive {naive_ppl:,.1f}, adapted {adapted_ppl:.3f}")

    out.mkdir(parents=True, exist_ok=True)
    for name in (shipped.ADAPTERS, "adapter_config.json"):
        shutil.copyfile(run / name, out / name)
    command = args.command
    if args.config:
        shutil.copyfile(args.config, out / "finetune.yaml")
        command = command.replace(f"-c {args.config}", f"-c {out.relative_to(Path.cwd()) if out.is_absolute() else out}/finetune.yaml")
    lora = config["lora_parameters"]
    card = {
        "name": "smollm2-135m-echo",
        "summary": (f"SmolLM2-135M-Instruct with the `{args.plan_name}` sharing plan ({plan.kv_reduction:.2f}x smaller "
                    f"KV cache), adapted with `echo-mlx finetune`: layer-wise distillation, then logit distillation "
                    f"from the original model. The base weights are not here; only the LoRA adapters are."),
        "base_model": "default",
        "base_model_description": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
        "plan": args.plan_name,
        "plan_string": str(plan),
        "kv_reduction": plan.kv_reduction,
        "kv_init": kv_init,
        "adapter": f"{config['fine_tune_type']} rank {lora['rank']} scale {lora['scale']} on layers "
                   f"{config['trainable_from']}..{plan.num_layers - 1}",
        "data": "the built-in corpus's training half (Python's pydoc topics; held-out half never trained on)",
        "recipe": command.split("finetune", 1)[-1].strip(),
        "hardware": args.hardware,
        "protocol": "echo_mlx.evaluate: 16 windows x 512 scored targets over the built-in corpus's held-out half, no BOS.",
        "command": command,
        "results": {"tokens": tokens, "wall_minutes": args.wall_minutes, "original_ppl": original_ppl,
                    "naive_ppl": naive_ppl, "adapted_ppl": adapted_ppl},
    }
    card = shipped.write_card(out, card)
    print(f"wrote {out} (sha256 {card['adapters_sha256'][:16]}..., {card['adapters_bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
