"""`echo-mlx info`: versions, device, BLAS and attention path in use (and a checkpoint's plan)."""

from typing import Optional

import typer

from echo_mlx import blas
from echo_mlx.errors import EchoError


def info(model: Optional[str] = typer.Option(None, help="Also describe this echo checkpoint.")):
    """Versions, device and BLAS in use (and a checkpoint's plan)."""
    import mlx.core as mx
    import mlx_lm

    from echo_mlx import __version__
    from echo_mlx.io.sources import default_model_path
    from echo_mlx.kernels import dispatch

    typer.echo(f"echo-mlx {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    metal = mx.metal.is_available() if hasattr(mx, "metal") else False
    typer.echo(f"device: {mx.default_device()} (Metal {'available' if metal else 'not available'})")
    typer.echo(f"BLAS: {blas.status()}")
    typer.echo(f"attention: {dispatch.describe()}")
    try:
        typer.echo(f"default model: {default_model_path()}")
    except EchoError as e:
        typer.echo(f"default model: missing ({e})")
    if model:
        from echo_mlx.io import checkpoint
        from echo_mlx.models.plans import SharingPlan

        config = checkpoint.load_config(model)
        p = SharingPlan.from_config(config)
        typer.echo(f"plan: {config.get('echo', {}).get('plan')} = {p} ({p.kv_reduction:.2f}x KV reduction)")
        typer.echo(f"source: {config.get('echo', {}).get('source')}")
