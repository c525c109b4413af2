"""`echo-mlx finetune`: adapt a converted model (LoRA/DoRA/full, distillation, progressive schedule, resume)."""

from pathlib import Path
from typing import Optional

import typer

from echo_mlx.errors import EchoError


def finetune(
    model: Optional[str] = typer.Option(None, help="An echo checkpoint, or a source model with --plan (default: 'default')."),
    plan: Optional[str] = typer.Option(None, help="Target sharing plan (default: the checkpoint's)."),
    kv_init: Optional[str] = typer.Option(None, help="Producer K/V init when converting: own | mean | fit (fitted to the original on the built-in data, minutes)."),
    teacher: Optional[str] = typer.Option(None, help="'default' (the model the checkpoint was converted from), a source model, or 'none'."),
    data: Optional[str] = typer.Option(None, help="mlx-lm data dir (train/valid.jsonl), or 'corpus' / 'chat' / 'general' for one built-in set; default: all three built-in sets."),
    fine_tune_type: Optional[str] = typer.Option(None, help="lora | dora | dylora (one adapter for every rank up to --lora-rank) | full."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank (dylora: the largest rank trained); sets lora_parameters' rank."),
    min_rank: Optional[int] = typer.Option(None, help="dylora: the smallest rank trained (default 1)."),
    rank_sampling: Optional[str] = typer.Option(None, help="dylora: log (each octave as likely, every rank drawn; default) | uniform (every rank in the range) | powers (min, 2 min, 4 min, ..., max)."),
    rank_scaling: Optional[str] = typer.Option(None, help="dylora: constant (one scale at every rank, default) | inverse (scale x max/b at rank b, DyLoRA's alpha/b)."),
    rank_draw: Optional[str] = typer.Option(None, help="dylora: example (a rank per example: every step trains several ranks; default) | step (one rank per step)."),
    rank_lr: Optional[str] = typer.Option(None, help="dylora: sqrt (default) | linear (component j's learning rate x its share of the examples^(1/2 or 1)) | constant (one learning rate)."),
    min_rank_weight: Optional[int] = typer.Option(None, help="dylora: how many times the lowest rank's bucket counts in the draw (default 1)."),
    num_layers: Optional[int] = typer.Option(None, help="Layers to train, from the top; -1 = all. Default: the layers the plan changed."),
    batch_size: Optional[int] = typer.Option(None),
    iters: Optional[int] = typer.Option(None),
    val_batches: Optional[int] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None),
    steps_per_report: Optional[int] = typer.Option(None),
    steps_per_eval: Optional[int] = typer.Option(None),
    save_every: Optional[int] = typer.Option(None),
    adapter_path: Optional[str] = typer.Option(None, help="Run directory: adapters, checkpoints, metrics, loss.png."),
    max_seq_length: Optional[int] = typer.Option(None),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint"),
    grad_accumulation_steps: Optional[int] = typer.Option(None),
    mask_prompt: Optional[bool] = typer.Option(None, "--mask-prompt"),
    optimizer: Optional[str] = typer.Option(None, help="adam | adamw | sgd."),
    kd_alpha: Optional[float] = typer.Option(None, help="Weight of KL(teacher||student); 1 - alpha goes to cross-entropy."),
    kd_temperature: Optional[float] = typer.Option(None),
    schedule: Optional[str] = typer.Option(None, help="direct | progressive (ECHO-LLaMA's moving boundary)."),
    stages: Optional[int] = typer.Option(None, help="Progressive: number of stages."),
    layers_per_stage: Optional[int] = typer.Option(None, help="Progressive: boundary step per stage (default 1)."),
    layerwise_iters: Optional[int] = typer.Option(None, help="First N steps: each changed layer matches the teacher layer's output (then KD)."),
    layerwise_learning_rate: Optional[float] = typer.Option(None, help="Learning rate of the layer-wise steps (default: --learning-rate)."),
    teacher_cache: Optional[str] = typer.Option(None, help="Directory keeping the teacher's work per batch (top-k distribution, layer-wise states) for reuse by later passes and runs."),
    teacher_top_k: Optional[int] = typer.Option(None, help="With --teacher-cache: the teacher's likeliest tokens kept per position (default 64)."),
    seed: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, help="Continue the run in --adapter-path from its last checkpoint."),
    calibrate_scale: Optional[bool] = typer.Option(None, "--calibrate-scale", help="After training: per rank, a factor on the LoRA scale chosen on the validation batches (recorded in adapter_config.json)."),
    config: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML file with any of these settings (mlx-lm's lora config keys)."),
):
    """Adapt a converted model (LoRA/DoRA/full, distillation, progressive schedule)."""
    from echo_mlx.tuner.finetune import FinetuneArgs, finetune as run

    settings = _read_yaml(config) if config else {}
    given = {k: v for k, v in locals().items() if k not in ("config", "settings", "run", "FinetuneArgs") and v is not None}
    if not resume:
        given.pop("resume")
    # Rank flags refine lora_parameters (the config file's, else the default's), as mlx-lm's keys.
    flags = {"lora_rank": "rank", "min_rank": "min_rank", "rank_sampling": "rank_sampling", "rank_scaling": "rank_scaling",
             "rank_draw": "rank_draw", "rank_lr": "rank_lr", "min_rank_weight": "min_rank_weight"}
    rank_flags = {key: given.pop(flag) for flag, key in flags.items() if flag in given}
    if rank_flags:
        given["lora_parameters"] = {**FinetuneArgs().lora_parameters, **settings.get("lora_parameters", {}), **rank_flags}
    unknown = set(settings) - set(FinetuneArgs.__dataclass_fields__)
    if unknown:
        raise EchoError(f"{config}: unknown keys {', '.join(sorted(unknown))}: use the names of `echo-mlx finetune --help` with underscores")
    args = FinetuneArgs(**{**settings, **given})
    result = run(args, progress=True)
    best = f", best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    teacher_line = f" (teacher {result.teacher_val_loss:.4f})" if result.teacher_val_loss is not None else ""
    typer.echo(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s{best}{teacher_line}")
    typer.echo(f"adapters: {result.adapter_path}")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        settings = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EchoError(f"config file {path} does not exist")
    except yaml.YAMLError as e:
        raise EchoError(f"{path} is not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(settings, dict):
        raise EchoError(f"{path} must hold a mapping of setting: value")
    return settings
