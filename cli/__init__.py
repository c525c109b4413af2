"""The `echo-mlx` command line: one module per verb, each only parsing options and calling the library.

Installed as ``echo_mlx.cli`` (pyproject maps this folder there), so no
top-level ``cli`` module lands in site-packages. Flags follow mlx-lm's
(``mlx_lm.convert``, ``mlx_lm.generate``, ``mlx_lm.lora``) where the verb exists
there. Every user error is an EchoError: printed as one line, exit 2.
"""

import sys

from echo_mlx import blas  # noqa: F401  (imported first: loads OpenBLAS before mlx)

import typer

try:  # typer >= 0.29 vendors click; its exceptions are not click's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from . import analyze, cache_prompt, convert, finetune, fuse, generate, info, plans, plot
from echo_mlx.errors import EchoError

app = typer.Typer(
    help="LLaMA on MLX with key/value caches shared across layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# The order of `echo-mlx --help`: the pipeline first, then the tools around it.
app.command("convert")(convert.convert)
app.command("finetune")(finetune.finetune)
app.command("fuse")(fuse.fuse)
app.command("generate")(generate.generate)
app.command("cache-prompt")(cache_prompt.cache_prompt)
app.command("plans")(plans.plans)
app.command("analyze")(analyze.analyze)
app.command("plot")(plot.plot)
app.command("info")(info.info)


def main(argv=None):
    try:
        return app(args=argv, standalone_mode=False)
    except EchoError as e:
        print(f"echo-mlx: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("echo-mlx: aborted", file=sys.stderr)
        sys.exit(130)
    except ClickException as e:
        e.show()
        sys.exit(e.exit_code)
