"""`echo-mlx convert`: a pretrained LLaMA -> an echo checkpoint with a sharing plan."""

from pathlib import Path
from typing import Optional

import typer

from echo_mlx.errors import EchoError


def convert(
    model: str = typer.Option("default", "--model", "--hf-path", help="Source: 'default' (SmolLM2-135M), a .gguf file, a Hugging Face or mlx-lm directory, or a hub id."),
    plan: str = typer.Option("none", help="Sharing plan: a preset (see `echo-mlx plans`) or a string like 0_0_2_2."),
    out: str = typer.Option(..., "--out", "--mlx-path", help="Directory to write the echo checkpoint to."),
    kv_init: str = typer.Option("own", help="'own': producers keep their K/V weights; 'mean': the mean of the layers sharing them; 'fit': 'own', then every changed layer fitted to the original on calibration text (minutes)."),
    calibration: Optional[str] = typer.Option(None, help="--kv-init fit: a UTF-8 text file to fit on, or 'builtin' (default: the built-in corpus, chat and general sets' training parts, taking turns), 'corpus', 'chat' or 'general'."),
    # The fit's defaults are FitOptions' own, as literals: no mlx import before a command runs (tests/test_fit.py keeps them equal).
    calibration_tokens: int = typer.Option(24576, help="--kv-init fit: calibration tokens (whole windows of 512)."),
    ridge: float = typer.Option(3e-2, help="--kv-init fit: relative ridge strength of the least-squares solves."),
    shrink_to_original: Optional[bool] = typer.Option(None, "--shrink-to-original/--no-shrink-to-original", help="--kv-init fit: shrink the re-solved o_proj and down_proj towards the original's weights (the default) or towards 0 (the default before 2026-12-07, with --ridge 1e-3)."),
    fit_parts: Optional[str] = typer.Option(None, help="--kv-init fit: what to fit, comma-separated among keys, heads, producer_queries, values, refine, o_proj, mlp, correct (default: keys,heads,producer_queries,o_proj,mlp). 'refine' adds Adam epochs on each consumer's q_proj and o_proj (slower); 'correct' re-solves every later layer's down_proj on the converted model's own stream (one more pass)."),
    refine_epochs: int = typer.Option(4, help="--fit-parts with refine: Adam epochs over the calibration windows per consumer."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights (affine)."),
    q_bits: int = typer.Option(4, help="Bits per weight when quantizing."),
    q_group_size: int = typer.Option(64, help="Group size when quantizing."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16. Default: float32 on CPU hosts, the source's own precision on Apple silicon."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
):
    """Convert a pretrained LLaMA into an echo checkpoint with a sharing plan."""
    from echo_mlx.conversion.convert import convert as run
    from echo_mlx.conversion.fit import FitOptions, parse_parts

    fit_only = {"--calibration": calibration is not None, "--fit-parts": fit_parts is not None,
                "--shrink-to-original" if shrink_to_original else "--no-shrink-to-original": shrink_to_original is not None}
    given = [flag for flag, used in fit_only.items() if used]
    if kv_init != "fit" and given:
        raise EchoError(f"{given[0]} is for --kv-init fit: add --kv-init fit or drop it")
    fit_options = None
    if kv_init == "fit":
        fit_options = FitOptions(tokens=calibration_tokens, ridge=ridge, parts=parse_parts(fit_parts),
                                 refine_epochs=refine_epochs,
                                 prior=FitOptions().prior if shrink_to_original is None else shrink_to_original)
    *_, summary = run(
        model, plan, kv_init=kv_init, quantize=quantize, q_bits=q_bits,
        q_group_size=q_group_size, dtype=dtype, out=out, force=force,
        revision=revision, calibration=calibration, fit_options=fit_options, progress=True,
    )
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"wrote {out}")
