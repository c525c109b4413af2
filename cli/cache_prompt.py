"""`echo-mlx cache-prompt`: prefill a prompt once and save its shared cache for later generate runs."""

from pathlib import Path
from typing import Optional

import typer

from .prompting import chat_prompt, load_model


def cache_prompt(
    prompt_cache_file: Path = typer.Option(..., help="The .safetensors file to write."),
    model: str = typer.Option("default", help="An echo checkpoint, or a source model converted with --plan."),
    plan: Optional[str] = typer.Option(None, help="Sharing plan when --model is not an echo checkpoint ('none': unshared). Default: the shipped adapted model for --model default, else none."),
    adapter_path: Optional[str] = typer.Option(None),
    prompt: str = typer.Option(..., "-p", "--prompt", help="Prompt text ('-' reads stdin)."),
    system_prompt: Optional[str] = typer.Option(None),
    ignore_chat_template: bool = typer.Option(False),
    max_kv_size: Optional[int] = typer.Option(None),
    kv_bits: Optional[int] = typer.Option(None),
    kv_group_size: int = typer.Option(64),
    quantized_kv_start: int = typer.Option(5000),
    prefill_step_size: int = typer.Option(2048),
    truncate_prompt: bool = typer.Option(False),
):
    """Prefill a prompt (e.g. a long document) once and save its shared cache."""
    from echo_mlx import generate as gen

    gen.check_options(kv_bits, kv_group_size, max_kv_size)
    model_, tokenizer = load_model(model, plan, adapter_path)
    # Cache the conversation up to the user's turn; generate appends the query.
    ids = chat_prompt(tokenizer, prompt, system_prompt, ignore_chat_template, add_generation_prompt=False)
    ids = gen.fit_prompt(ids, model_, max_kv_size, truncate_prompt)
    cache = gen.make_prompt_cache(model_, max_kv_size)
    tps = gen.prefill(model_, ids, cache, prefill_step_size, kv_bits, kv_group_size, quantized_kv_start)
    gen.save_cache_file(prompt_cache_file, cache, model_, model)
    typer.echo(f"cached {len(ids)} tokens at {tps:.1f} tokens-per-sec into {prompt_cache_file}")
