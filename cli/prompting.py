"""What generate and cache-prompt share: loading the model to run, and turning --prompt into token ids."""

import sys
from typing import Optional

import typer

from echo_mlx.errors import EchoError


def load_model(model: str, plan: Optional[str], adapter_path: Optional[str], lora_rank: Optional[int] = None):
    from echo_mlx.api import load
    from echo_mlx.io import shipped

    if plan is None and model == "default" and adapter_path is None and shipped.available():
        loaded = shipped.load()  # weights/: the default model adapted to its sharing plan (checksum verified)
        card = shipped.read_card()
        r = card["results"]
        # stderr: piped output stays the reply alone.
        typer.echo(f"shipped model {shipped.SHIPPED.name}: plan {card['plan']} ({card['kv_reduction']:.2f}x smaller KV cache), "
                   f"held-out perplexity {r['adapted_ppl']:.2f} (original {r['original_ppl']:.2f}); --plan none runs the original",
                   err=True)
        return loaded
    return load(model, plan=plan or "none", adapter_path=adapter_path, lora_rank=lora_rank)


def read_prompt(prompt: str) -> str:
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise EchoError("the prompt is empty: pass text with --prompt or pipe it with --prompt -")
    return prompt


def chat_prompt(tokenizer, prompt: str, system_prompt: Optional[str], ignore_chat_template: bool,
                add_generation_prompt: bool = True):
    """Token ids of the prompt, through the chat template when there is one."""
    prompt = read_prompt(prompt)
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
