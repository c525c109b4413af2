"""`echo-mlx generate`: stream a completion (or decode a prompts file in batches) with the shared KV cache."""

from pathlib import Path
from typing import Optional

import typer

from .prompting import chat_prompt, load_model, read_prompt
from echo_mlx.errors import EchoError


def generate(
    model: str = typer.Option("default", help="An echo checkpoint, or a source model converted on the fly with --plan."),
    plan: Optional[str] = typer.Option(None, help="Sharing plan when --model is not an echo checkpoint ('none': unshared). Default: the shipped adapted model for --model default, else none."),
    adapter_path: Optional[str] = typer.Option(None, help="LoRA adapters written by finetune."),
    lora_rank: Optional[int] = typer.Option(None, help="dylora adapters: the rank to run (default: the largest trained)."),
    prompt: str = typer.Option("Hello", "-p", "--prompt", help="Prompt text ('-' reads stdin)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Batched generation: one prompt per line."),
    batch_size: int = typer.Option(8, help="Sequences decoded together with --prompts-file."),
    system_prompt: Optional[str] = typer.Option(None),
    ignore_chat_template: bool = typer.Option(False),
    max_tokens: int = typer.Option(100, "-m", "--max-tokens", help="Tokens to generate (>= 1)."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (>= 0; 0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in [0, 1] (0 or 1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below this fraction of the top one's probability, in [0, 1]."),
    seed: Optional[int] = typer.Option(None, help="Random seed (>= 0)."),
    max_kv_size: Optional[int] = typer.Option(None, help="Keep a sliding window of this many tokens per producer cache."),
    kv_bits: Optional[int] = typer.Option(None, help="Quantize the KV cache to this many bits (4 or 8)."),
    kv_group_size: int = typer.Option(64, help="Group size of the KV-cache quantization."),
    quantized_kv_start: int = typer.Option(5000, help="Quantize the KV cache once it holds this many tokens."),
    prefill_step_size: int = typer.Option(2048),
    prompt_cache_file: Optional[Path] = typer.Option(None, help="Continue from a cache written by cache-prompt."),
    truncate_prompt: bool = typer.Option(False, help="Keep the last tokens of a prompt longer than the context."),
    verbose: str = typer.Option("True", help="Print the closing statistics (True/False, as mlx_lm.generate)."),
):
    """Stream a completion with the shared (reduced) KV cache."""
    verbose = _true_or_false(verbose, "--verbose")
    import mlx.core as mx

    from echo_mlx import generate as gen
    from echo_mlx.kernels import dispatch

    # Every option is checked before the model loads (seconds) so a typo fails at once.
    gen.check_options(kv_bits, kv_group_size, max_kv_size)
    gen.check_sampling(temp, top_p, top_k, min_p, max_tokens)
    _check_positive(batch_size=batch_size, prefill_step_size=prefill_step_size)
    if seed is not None and seed < 0:
        raise EchoError(f"--seed {seed} is out of range: use an integer >= 0")
    dispatch.check()  # a forced ECHO_MLX_ATTENTION=kernel without Metal fails before the model loads
    sampler = gen.sampler_from(temp, top_p, top_k, min_p)
    if seed is not None:
        mx.random.seed(seed)
    model_, tokenizer = load_model(model, plan, adapter_path, lora_rank)

    if prompts_file is not None:
        lines = [l for l in prompts_file.read_text().splitlines() if l.strip()] if prompts_file.is_file() else []
        if not lines:
            raise EchoError(f"{prompts_file} has no prompts: write one prompt per line")
        prompts = [gen.fit_prompt(chat_prompt(tokenizer, l, system_prompt, ignore_chat_template), model_, max_kv_size, truncate_prompt)
                   for l in lines]
        texts, stats = gen.generate_batch(model_, tokenizer, prompts, max_tokens=max_tokens, sampler=sampler,
                                          max_kv_size=max_kv_size, batch_size=batch_size, prefill_step_size=prefill_step_size)
        for i, text in enumerate(texts):
            typer.echo(f"--- {i}: {lines[i]}\n{text}")
        if verbose:
            typer.echo("=" * 10)
            typer.echo(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
            typer.echo(f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} tokens-per-sec")
            typer.echo(f"Peak memory: {stats.peak_memory:.3f} GB")
            typer.echo(f"Attention: {dispatch.summary()}")
        return

    if prompt_cache_file is not None:
        cache = gen.load_cache_file(prompt_cache_file, model_)
        # The cached prefix holds the conversation start: send the query alone.
        ids = tokenizer.encode(read_prompt(prompt), add_special_tokens=False)
    else:
        cache = gen.make_prompt_cache(model_, max_kv_size)
        ids = gen.fit_prompt(chat_prompt(tokenizer, prompt, system_prompt, ignore_chat_template), model_, max_kv_size, truncate_prompt)
    for piece in gen.stream(model_, tokenizer, ids, cache=cache, max_tokens=max_tokens, sampler=sampler,
                            kv_bits=kv_bits, kv_group_size=kv_group_size,
                            quantized_kv_start=quantized_kv_start, prefill_step_size=prefill_step_size):
        if isinstance(piece, gen.Stats):
            typer.echo()
            if verbose:
                for line in piece.lines():
                    typer.echo(line)
        else:
            typer.echo(piece, nl=False)


def _true_or_false(value: str, flag: str) -> bool:
    if value.lower() in ("true", "t", "1", "yes"):
        return True
    if value.lower() in ("false", "f", "0", "no"):
        return False
    raise EchoError(f"{flag} takes True or False, not {value!r}")


def _check_positive(**values):
    for name, value in values.items():
        if value < 1:
            raise EchoError(f"--{name.replace('_', '-')} {value} is out of range: use an integer >= 1")
