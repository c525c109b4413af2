"""`echo-mlx plot`: a finetune run's loss curve as a PNG."""

from pathlib import Path
from typing import Optional

import typer


def plot(run: Path = typer.Argument(..., help="A finetune --adapter-path."), out: Optional[Path] = typer.Option(None)):
    """Draw a finetune run's loss curve (train, validation, teacher) as a PNG."""
    from echo_mlx.tuner.plot import plot_run

    typer.echo(f"wrote {plot_run(run, out)}")
