"""`echo-mlx fuse`: fold adapters into the weights."""

from typing import Optional

import typer


def fuse(
    model: str = typer.Option("default", help="The base the adapters were trained on (checkpoint, or source with --plan)."),
    plan: str = typer.Option("none", help="Sharing plan when --model is not an echo checkpoint."),
    adapter_path: str = typer.Option("adapters", help="The finetune run directory."),
    out: str = typer.Option(..., "--out", "--save-path", help="Directory for the fused echo checkpoint."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    lora_rank: Optional[int] = typer.Option(None, help="dylora adapters: fuse this rank (default: the largest trained)."),
):
    """Fold adapters into the weights: an echo checkpoint for generate and mlx-lm."""
    from echo_mlx.tuner.fuse import fuse as run

    run(model, adapter_path, out, plan=plan, force=force, lora_rank=lora_rank)
    typer.echo(f"wrote {out}")
