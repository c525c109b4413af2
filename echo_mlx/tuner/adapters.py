"""Trainable weights on top of an echo model: LoRA, DoRA, dynamic-rank LoRA or full layers.

The adapter directory is mlx-lm's (``adapter_config.json`` with
``fine_tune_type``, ``num_layers``, ``lora_parameters``, and
``adapters.safetensors``), so ``mlx_lm.load(checkpoint, adapter_path=...)``
reads it. We add an ``echo`` block: the sharing plan and a fingerprint of
the base weights, so adapters are refused on a model or plan they were not
trained for instead of loading silently into the wrong layers.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import EchoError
from ..models.plans import plan_id
from .dylora import RankRange, set_rank, to_dynamic
from .rank_scales import factor, set_scale

FINE_TUNE_TYPES = ("lora", "dora", "dylora", "full")
CONFIG, WEIGHTS = "adapter_config.json", "adapters.safetensors"


def make_trainable(model: nn.Module, fine_tune_type: str, trainable_from: int, lora_parameters: dict) -> None:
    """Freeze everything, then open layers ``trainable_from``.. for training."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if fine_tune_type not in FINE_TUNE_TYPES:
        raise EchoError(f"unknown --fine-tune-type {fine_tune_type!r}: use one of {', '.join(FINE_TUNE_TYPES)}")
    model.freeze()
    num_layers = len(model.layers) - trainable_from
    if fine_tune_type == "full":
        for layer in model.layers[trainable_from:]:
            layer.unfreeze()
        return
    missing = {"rank", "scale", "dropout"} - set(lora_parameters)
    if missing:
        raise EchoError(f"lora_parameters lacks {', '.join(sorted(missing))}: give rank, scale and dropout (as mlx-lm)")
    ranks = RankRange.from_parameters(lora_parameters) if fine_tune_type == "dylora" else None  # refused before any change
    check_keys(model.layers[trainable_from:], lora_parameters.get("keys"))
    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")
    if ranks is not None:
        to_dynamic(model, ranks.scaling)  # same arrays (and initialisation) as LoRA at rank R; a rank per step


def check_keys(layers, keys) -> None:
    """mlx-lm adapts only the modules whose names are in ``keys`` and skips any other name without a word: a
    misspelt key would train nothing (or less than asked). Refuse names no trainable layer has."""
    if keys is None:
        return
    names = {name for layer in layers for name, module in layer.named_modules()
             if isinstance(module, (nn.Linear, nn.QuantizedLinear))}
    unknown = [k for k in keys if k not in names] if isinstance(keys, list) else [keys]
    if unknown or not keys:
        raise EchoError(f"lora_parameters keys {', '.join(map(str, unknown)) or '[]'} name no linear layer of the "
                        f"layers trained: use names such as {', '.join(sorted(names)[:4])}")


def trainable_weights(model: nn.Module) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def load_matching(model: nn.Module, weights: dict) -> None:
    """Load the weights whose names and shapes exist in ``model`` (progressive
    stages drop the k/v projections of layers that became consumers)."""
    params = dict(tree_flatten(model.parameters()))
    fitting = [(k, v) for k, v in weights.items() if k in params and params[k].shape == v.shape]
    model.load_weights(fitting, strict=False)


def adapter_config(fine_tune_type: str, trainable_from: int, lora_parameters: dict, *, plan: str, fingerprint: str, model: str) -> dict:
    if fine_tune_type == "dylora":  # the config names the whole rank range, defaults included
        ranks = RankRange.from_parameters(lora_parameters)
        lora_parameters = dict(lora_parameters, min_rank=ranks.min_rank, rank_sampling=ranks.sampling,
                               rank_scaling=ranks.scaling, rank_draw=ranks.draw, rank_lr=ranks.lr,
                               min_rank_weight=ranks.min_rank_weight)
    return {
        "fine_tune_type": fine_tune_type,
        "num_layers": None,  # filled by save(): counted from the top, as mlx-lm counts
        "trainable_from": trainable_from,
        "lora_parameters": lora_parameters,
        "echo": {"plan": plan, "fingerprint": fingerprint, "model": model},
    }


def save(path, model: nn.Module, config: dict) -> None:
    """Write ``adapters.safetensors`` and its config, each atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config, num_layers=len(model.layers) - config["trainable_from"])
    tmp = path / f".{WEIGHTS}.tmp.safetensors"
    mx.save_safetensors(str(tmp), trainable_weights(model))
    os.replace(tmp, path / WEIGHTS)
    write_config(path, config)


def write_config(path, config: dict) -> None:
    """Write the adapters' config in ``path`` atomically."""
    tmp = Path(path) / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, Path(path) / CONFIG)


def read_config(path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise EchoError(f"{path} has no {CONFIG}: pass the --adapter-path written by `echo-mlx finetune`")
    except json.JSONDecodeError as e:
        raise EchoError(f"{path / CONFIG} is not valid JSON ({e}): re-run finetune")


def rank_range(config: dict):
    """The RankRange of a dylora adapter's config; None for other adapters."""
    if config.get("fine_tune_type") != "dylora":
        return None
    return RankRange.from_parameters(config.get("lora_parameters", {}))


def apply(model: nn.Module, path, model_name: str = "the model", *, lora_rank=None) -> nn.Module:
    """Load the adapters in ``path`` onto ``model``, refusing ones trained for another model or plan.

    ``lora_rank`` picks the rank of a dylora adapter (default: its maximum); other
    adapters accept only the rank they were trained at."""
    from mlx_lm.tuner.utils import load_adapters

    from ..generate import model_fingerprint

    config = read_config(path)
    echo = config.get("echo", {})
    plan = plan_id(model.args)
    if echo.get("plan") not in (None, plan):
        raise EchoError(
            f"adapters in {path} were trained for plan {echo['plan']}, but {model_name} has plan {plan}: "
            f"pass the model and --plan they were trained on"
        )
    if echo.get("fingerprint") not in (None, model_fingerprint(model)):
        raise EchoError(
            f"adapters in {path} were trained on different base weights ({echo.get('model')}), not {model_name}: "
            f"pass the --model they were trained on"
        )
    ranks = rank_range(config)
    if ranks is None and lora_rank is not None:
        trained = config.get("lora_parameters", {}).get("rank") if config.get("fine_tune_type") != "full" else None
        if lora_rank != trained:
            kind = config.get("fine_tune_type", "lora")
            at = f"at the fixed rank {trained}" if trained else "as full layers"
            raise EchoError(
                f"adapters in {path} were trained {at} ({kind}), so --lora-rank {lora_rank} does not apply: "
                f"drop --lora-rank, or train with --fine-tune-type dylora"
            )
    if ranks is not None:
        lora_rank = ranks.check(ranks.max_rank if lora_rank is None else lora_rank, path)
    try:
        load_adapters(model, str(path))
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EchoError(f"adapters in {path} do not fit {model_name} ({first}): use adapters trained for this model and plan")
    if ranks is not None:
        to_dynamic(model, ranks.scaling)
        set_rank(model, lora_rank)
        if "rank_scales" in config["lora_parameters"]:  # calibrated: echo_mlx.tuner.rank_scales
            set_scale(model, config["lora_parameters"]["scale"] * factor(config, lora_rank))
    model.eval()
    return model


def fuse(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA updates into the base weights."""
    from mlx.utils import tree_unflatten

    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
