"""The Python entry point: ``echo_mlx.load``."""

from pathlib import Path

from .io import checkpoint


def load(model: str = "default", *, plan: str = "none", kv_init: str = "own", lazy: bool = False):
    """(model, tokenizer) from an echo checkpoint, or from any source
    (``"default"``, a .gguf, an HF/mlx-lm directory, a hub id) converted in
    memory with ``plan``."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if Path(model).is_dir() and checkpoint.is_echo_checkpoint(model):
        echo_model, tokenizer, _ = checkpoint.load(model, lazy=lazy)
        return echo_model, tokenizer
    from .conversion.convert import convert

    echo_model, tokenizer, config, _ = convert(model, plan, kv_init=kv_init)
    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    return echo_model, TokenizerWrapper(tokenizer, eos_token_ids=eos)
