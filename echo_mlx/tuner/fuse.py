"""`echo-mlx fuse`: fold finetuned adapters into an echo checkpoint.

The result loads with ``echo-mlx generate`` and with ``mlx_lm.load(...,
trust_remote_code=True)``, like any converted checkpoint; its ``echo`` block
records the adapters it was fused from.
"""

from pathlib import Path

from . import adapters
from ..errors import EchoError
from ..io import checkpoint


def fuse(model: str, adapter_path, out, *, plan: str = "none", force: bool = False, lora_rank=None) -> Path:
    """``lora_rank`` picks the rank of a dylora adapter (default: its maximum)."""
    if Path(out).exists() and not force:
        raise EchoError(f"{out} already exists: choose another --out or pass --force to replace it")
    if checkpoint.is_echo_checkpoint(model):
        base, tokenizer, config = checkpoint.load(model)
    else:
        from ..conversion.convert import convert

        base, tokenizer, config, _ = convert(model, plan)
    adapters.apply(base, adapter_path, model, lora_rank=lora_rank)
    adapters.fuse(base)
    config = dict(config)
    fused_from = {"adapters": str(Path(adapter_path).resolve())}
    if lora_rank is not None:
        fused_from["lora_rank"] = lora_rank
    config["echo"] = dict(config.get("echo", {}), **fused_from)
    return checkpoint.save(out, base, config, tokenizer, force=force)
