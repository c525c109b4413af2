"""Scale calibration: per rank, a factor on a trained adapter's LoRA scale, chosen on validation text.

A short run leaves an adapter's update pointing the right way but too small,
and a dynamic-rank adapter's lowest ranks most: their few components serve
every rank and are trained alone on few examples. One number per rank
recovers much of that without a training token: from 1, the factor walks by
x1.5 (or /1.5) while the validation cross-entropy falls.

``calibrate`` writes the result into the run's adapter_config.json:
``lora_parameters.scale`` becomes the calibrated scale of the largest rank (so
mlx-lm, which reads only that, runs the adapter as echo-mlx does at that
rank) and ``lora_parameters.rank_scales`` maps each calibrated rank to its
factor relative to it (the powers of two from min_rank, and the largest
rank); a rank in between takes the factor of the nearest calibrated rank
below it. ``adapters.apply`` uses it whenever it picks a rank.
"""

from typing import Callable, Dict, List

import mlx.nn as nn

STEP = 1.5  # the factor's walk: x1.5 per move; finer steps cost evaluations for little gain
MAX_MOVES = 4  # at most 1.5^4 ~ 5x either way


def lora_layers(model: nn.Module) -> list:
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


def set_scale(model: nn.Module, scale: float) -> None:
    for layer in lora_layers(model):
        layer.scale = scale


def calibrated_ranks(config: dict) -> List[int]:
    """The ranks a calibration measures: a fixed adapter's rank; a dylora adapter's
    powers of two from min_rank, and its largest rank."""
    from .adapters import rank_range

    ranks = rank_range(config)
    if ranks is None:
        return [config["lora_parameters"]["rank"]]
    return ranks.powers() + [ranks.max_rank]


def factor(config: dict, rank: int) -> float:
    """The calibrated factor on ``lora_parameters.scale`` at ``rank`` (1 if never calibrated)."""
    table = {int(r): f for r, f in config.get("lora_parameters", {}).get("rank_scales", {}).items()}
    below = [r for r in table if r <= rank]
    return table[max(below)] if below else 1.0


def best_factor(score: Callable[[float], float]) -> tuple:
    """(factor, score) with the lowest score found walking from 1 by STEP, up first, then down."""
    best_f, best = 1.0, score(1.0)
    for move in (STEP, 1 / STEP):
        moved = False
        for _ in range(MAX_MOVES):
            s = score(best_f * move)
            if not s < best:
                break
            best_f, best, moved = best_f * move, s, True
        if moved:
            break
    return best_f, best


def calibrate(run_dir, model: nn.Module, score: Callable[[nn.Module], float], progress=print) -> Dict[int, float]:
    """Calibrate the adapters in ``run_dir``, already applied to ``model`` (echo_mlx.tuner.adapters.apply),
    on ``score`` (validation cross-entropy of the model as it is), and record the factors in their config."""
    from .adapters import read_config, write_config
    from .dylora import dynamic_layers, set_rank

    config = read_config(run_dir)
    parameters = config["lora_parameters"]
    scale = parameters.get("trained_scale", parameters["scale"])  # a second calibration starts from training's
    found = {}
    for rank in calibrated_ranks(config):
        if dynamic_layers(model):
            set_rank(model, rank)

        def at(f):
            set_scale(model, scale * f)
            return score(model)

        found[rank], loss = best_factor(at)
        progress(f"rank {rank}: scale x{found[rank]:.3g} (validation loss {loss:.4f})")
    top = found[max(found)]
    parameters.update(scale=scale * top, trained_scale=scale,
                      rank_scales={str(r): f / top for r, f in sorted(found.items())})
    write_config(run_dir, config)
    return found
