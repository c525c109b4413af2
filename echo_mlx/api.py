"""The Python entry point: ``echo_mlx.load``."""

from pathlib import Path
from typing import Optional

from .errors import EchoError
from .io import checkpoint


def load(model: str = "default", *, plan: str = "none", kv_init: str = "own", lazy: bool = False,
         adapter_path: Optional[str] = None, lora_rank: Optional[int] = None):
    """(model, tokenizer) from an echo checkpoint, or from any source
    (``"default"``, a .gguf, an HF/mlx-lm directory, a hub id) converted in
    memory with ``plan``; with ``adapter_path``, finetune's adapters applied
    (``lora_rank``: the rank of a dylora adapter, default its largest)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if lora_rank is not None and adapter_path is None:
        raise EchoError("--lora-rank picks the rank of adapters: pass --adapter-path too")
    if Path(model).is_dir() and checkpoint.is_echo_checkpoint(model):
        echo_model, tokenizer, _ = checkpoint.load(model, lazy=lazy)
    else:
        from .conversion.convert import convert

        echo_model, tokenizer, config, _ = convert(model, plan, kv_init=kv_init)
        eos = config.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos
        tokenizer = TokenizerWrapper(tokenizer, eos_token_ids=eos)
    if adapter_path is not None:
        from .tuner import adapters

        echo_model = adapters.apply(echo_model, adapter_path, model, lora_rank=lora_rank)
    return echo_model, tokenizer
