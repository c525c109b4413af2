"""The `echo-mlx` command line: one sub-command per user verb.

Flags follow mlx-lm's (`mlx_lm.convert`, `mlx_lm.generate`) where the verb
exists there. Every user error is an EchoError: printed as one line, exit 2.
"""

import sys
from typing import List, Optional

import click
import typer

from . import blas  # noqa: F401  (imported first: loads OpenBLAS before mlx)
from .errors import EchoError

app = typer.Typer(
    help="LLaMA on MLX with key/value caches shared across layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def convert(
    model: str = typer.Option("default", "--model", "--hf-path", help="Source: 'default' (SmolLM2-135M), a .gguf file, a Hugging Face or mlx-lm directory, or a hub id."),
    plan: str = typer.Option("none", help="Sharing plan: a preset (see `echo-mlx plans`) or a string like 0_0_2_2."),
    out: str = typer.Option(..., "--out", "--mlx-path", help="Directory to write the echo checkpoint to."),
    kv_init: str = typer.Option("own", help="Producer K/V weights: 'own' or 'mean' of the layers sharing them."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights (affine)."),
    q_bits: int = typer.Option(4, help="Bits per weight when quantizing."),
    q_group_size: int = typer.Option(64, help="Group size when quantizing."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16. Default: float32 on CPU hosts, the source's own precision on Apple silicon."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
):
    """Convert a pretrained LLaMA into an echo checkpoint with a sharing plan."""
    from .convert import convert as run

    *_, summary = run(
        model, plan, kv_init=kv_init, quantize=quantize, q_bits=q_bits,
        q_group_size=q_group_size, dtype=dtype, out=out, force=force,
        revision=revision, progress=True,
    )
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"wrote {out}")


@app.command()
def plans(
    model: Optional[str] = typer.Option(None, help="Resolve presets for this model (default: the embedded SmolLM2)."),
    layers: Optional[int] = typer.Option(None, help="Resolve presets for this many layers instead of loading a model."),
    plan: List[str] = typer.Option([], help="Resolve only these plans (repeatable)."),
):
    """List the sharing-plan presets, resolved for a model."""
    from .plans import PRESETS, SharingPlan

    num_layers = layers or _num_layers(model or "default")
    half = max(2, num_layers // 2)
    concrete = {":K": ":2", ":N": f":{half}", ":B": f":{half}", "yoco:W": "yoco:4096", "lckv:W": "lckv:2"}
    examples = list(plan)
    for preset in [] if plan else PRESETS:
        for generic, value in concrete.items():
            preset = preset.replace(generic, value)
        examples.append(preset)
    typer.echo(f"{num_layers} layers; N = number of layers computing K/V; reduction = KV cache saving")
    for text in examples:
        resolved = SharingPlan.parse(text, num_layers)
        iterated = " (iterative: targets above consumers)" if resolved.cyclic_blocks else ""
        typer.echo(f"{text:<20} {len(resolved.producers):>3} K/V layers  {resolved.kv_reduction:5.2f}x  {resolved}{iterated}")


def _num_layers(model: str) -> int:
    from . import checkpoint
    from .sources import load_source

    if checkpoint.is_echo_checkpoint(model):
        return checkpoint.load_config(model)["num_hidden_layers"]
    return load_source(model).config["num_hidden_layers"]


@app.command()
def info(model: Optional[str] = typer.Option(None, help="Also describe this echo checkpoint.")):
    """Versions, device and BLAS in use (and a checkpoint's plan)."""
    import mlx.core as mx
    import mlx_lm

    from . import __version__, blas
    from .sources import default_model_path

    typer.echo(f"echo-mlx {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    metal = mx.metal.is_available() if hasattr(mx, "metal") else False
    typer.echo(f"device: {mx.default_device()} (Metal {'available' if metal else 'not available'})")
    typer.echo(f"BLAS: {blas.status()}")
    try:
        typer.echo(f"default model: {default_model_path()}")
    except EchoError as e:
        typer.echo(f"default model: missing ({e})")
    if model:
        from . import checkpoint
        from .plans import SharingPlan

        config = checkpoint.load_config(model)
        p = SharingPlan.from_config(config)
        typer.echo(f"plan: {config.get('echo', {}).get('plan')} = {p} ({p.kv_reduction:.2f}x KV reduction)")
        typer.echo(f"source: {config.get('echo', {}).get('source')}")


@app.command()
def generate(
    model: str = typer.Option("default", help="An echo checkpoint, or a source model converted on the fly with --plan."),
    plan: str = typer.Option("none", help="Sharing plan when --model is not an echo checkpoint."),
    prompt: str = typer.Option("Hello", "-p", "--prompt", help="Prompt text ('-' reads stdin)."),
    max_tokens: int = typer.Option(100, "-m", "--max-tokens"),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None),
    system_prompt: Optional[str] = typer.Option(None),
    ignore_chat_template: bool = typer.Option(False),
    verbose: bool = typer.Option(True, help="Print the closing statistics."),
):
    """Stream a completion with the shared (reduced) KV cache."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from .api import load
    from .checkpoint import kv_cache_bytes

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise EchoError("the prompt is empty: pass text with --prompt or pipe it with --prompt -")
    if seed is not None:
        mx.random.seed(seed)
    model_, tokenizer = load(model, plan=plan)
    if not ignore_chat_template and tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cache = model_.make_cache()
    last = None
    for last in stream_generate(
        model_, tokenizer, prompt, max_tokens=max_tokens,
        sampler=make_sampler(temp, top_p), prompt_cache=cache,
    ):
        typer.echo(last.text, nl=False)
    typer.echo()
    if verbose and last is not None:
        producers, layers = len(cache), len(model_.layers)
        kv = kv_cache_bytes(cache)
        typer.echo("=" * 10)
        typer.echo(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        typer.echo(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        typer.echo(f"Peak memory: {last.peak_memory:.3f} GB")
        typer.echo(
            f"KV cache: {kv / 2**20:.2f} MiB resident for {producers}/{layers} K/V layers "
            f"(unshared: {kv * layers / producers / 2**20:.2f} MiB)"
        )


def main(argv=None):
    try:
        return app(args=argv, standalone_mode=False)
    except EchoError as e:
        print(f"echo-mlx: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("echo-mlx: aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
