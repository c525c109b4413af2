"""Adaptation schedules: which plan is trained at which step.

``direct`` trains the target plan from step 1. ``progressive`` is
ECHO-LLaMA's layer-wise adaptation: the model is converted top-down, the
sharing boundary ``b`` moving down ``layers_per_stage`` layers per stage until
it reaches the target plan's lowest consumer. The stage plan with boundary
``b`` keeps every layer below ``b`` unshared; a layer ``i >= b`` attends to
the target plan's producer ``kv(i)`` if that producer is at or above ``b - 1``
and to layer ``b - 1`` otherwise. For ``yoco`` (layers 15.. reuse 14) this
gives ``echo:29, echo:28, ..., echo:15`` -- the boundary *and* its producer
move down, as in ECHO-LLaMA's YOCO stages (crossDecoder_start_idx 20 -> 15);
for ``cla:2`` it converts one pair after the other from the top, the
producers staying where they are. The last stage is always the target plan.

Each stage trains only the layers from the lowest one its plan changed
(a consumer, or a producer whose K/V others now read) upwards; everything
below is frozen, and since nothing trainable depends on it, MLX computes no
gradient through it. That is where the training tokens/s come from: early
stages back-propagate through a few top layers only.
"""

from dataclasses import dataclass
from typing import List, Optional

from ..errors import EchoError
from ..models.plans import SharingPlan

SCHEDULES = ("direct", "progressive")


@dataclass(frozen=True)
class Stage:
    plan: SharingPlan
    first_step: int  # 1-based, inclusive
    last_step: int  # inclusive
    trainable_from: int  # layers >= this one train; the rest are frozen
    kind: str = "kd"  # "kd": end-to-end loss; "layerwise": echo_mlx.tuner.layerwise


    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1


def first_changed_layer(plan: SharingPlan) -> int:
    """The lowest layer whose attention differs from the unshared model."""
    pairs = list(enumerate(plan.kv_sources)) + list(enumerate(plan.attention_sources))
    changed = [min(i, j) for i, j in pairs if i != j]
    return min(changed) if changed else plan.num_layers


def stage_plan(target: SharingPlan, boundary: int) -> SharingPlan:
    """``target`` applied to the layers at and above ``boundary`` (see module doc)."""
    sources = list(range(boundary))
    for i in range(boundary, target.num_layers):
        j = target.kv_sources[i]
        sources.append(j if j >= boundary - 1 else boundary - 1)
    return SharingPlan(tuple(sources), target.sliding, None, target.sliding_window).validated(target.num_layers)


def progressive_plans(target: SharingPlan, *, stages: Optional[int] = None, layers_per_stage: Optional[int] = None) -> List[SharingPlan]:
    if any(target.sliding):
        raise EchoError(
            f"--schedule progressive does not support sliding-window plans ({target}): use --schedule direct"
        )
    if target.attention_consumers:
        raise EchoError(
            f"--schedule progressive moves a K/V sharing boundary; EchoAtt plans ({target}) use --schedule direct"
        )
    if stages is not None and layers_per_stage is not None:
        raise EchoError("pass --stages or --layers-per-stage, not both")
    L = target.num_layers
    if not target.consumers:
        raise EchoError("plan 'none' shares nothing: there is nothing to adapt progressively, pass --plan")
    # Boundaries from the top layer down to the lowest consumer.
    lowest_consumer = min(target.consumers)
    span = L - lowest_consumer  # layers that change their K/V over the whole schedule
    if stages is not None:
        if stages < 1:
            raise EchoError(f"--stages {stages} must be at least 1")
        step = -(-span // stages)
    else:
        step = layers_per_stage or 1
        if step < 1:
            raise EchoError(f"--layers-per-stage {step} must be at least 1")
    boundaries = list(range(L - step, lowest_consumer, -step))
    plans = [stage_plan(target, b) for b in boundaries]
    plans.append(target)
    # Drop repeats (a boundary that changes nothing), keeping order.
    unique = []
    for p in plans:
        if not unique or p.kv_sources != unique[-1].kv_sources:
            unique.append(p)
    return unique


def build_stages(
    target: SharingPlan,
    iters: int,
    *,
    schedule: str = "direct",
    stages: Optional[int] = None,
    layers_per_stage: Optional[int] = None,
    num_layers: Optional[int] = None,
    layerwise_iters: int = 0,
) -> List[Stage]:
    """The run's stages; ``iters`` steps are split evenly (the last stage takes the rest).
    ``layerwise_iters`` > 0 (direct only) opens with that many layer-wise steps on the target plan."""
    if schedule not in SCHEDULES:
        raise EchoError(f"unknown --schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if layerwise_iters:
        if schedule != "direct":
            raise EchoError("--layerwise-iters replaces the progressive schedule's layer-by-layer walk: use --schedule direct")
        if not 0 < layerwise_iters < iters:
            raise EchoError(f"--layerwise-iters {layerwise_iters} must be between 1 and --iters - 1 ({iters - 1})")
        if target.is_identity:
            raise EchoError("plan 'none' shares nothing: there is nothing to distil layer by layer, pass --plan")
        kd = build_stages(target, iters - layerwise_iters, num_layers=num_layers)[0]
        return [Stage(target, 1, layerwise_iters, kd.trainable_from, "layerwise"),
                Stage(target, layerwise_iters + 1, iters, kd.trainable_from)]
    if schedule == "direct":
        plans = [target]
    else:
        plans = progressive_plans(target, stages=stages, layers_per_stage=layers_per_stage)
    if iters < len(plans):
        raise EchoError(f"--iters {iters} is less than the {len(plans)} stages: raise --iters or use fewer --stages")
    L = target.num_layers
    if num_layers is not None and not (num_layers == -1 or 1 <= num_layers <= L):
        raise EchoError(f"--num-layers {num_layers} must be -1 (all) or between 1 and {L}")
    per_stage = iters // len(plans)
    out, first = [], 1
    for k, plan in enumerate(plans):
        last = iters if k == len(plans) - 1 else first + per_stage - 1
        if num_layers is None:
            trainable_from = min(first_changed_layer(plan), L - 1)
        else:
            trainable_from = 0 if num_layers == -1 else L - num_layers
        out.append(Stage(plan, first, last, trainable_from))
        first = last + 1
    return out


def stage_at(stages: List[Stage], step: int) -> int:
    """Index of the stage that runs ``step`` (1-based)."""
    for k, s in enumerate(stages):
        if s.first_step <= step <= s.last_step:
            return k
    return len(stages) - 1
