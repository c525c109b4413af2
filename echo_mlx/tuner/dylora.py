"""Dynamic-rank LoRA (DyLoRA; QDyLoRA on a quantized base): one adapter for every rank up to R.

Each training example (or, with ``rank_draw`` ``step``, each step) samples one
rank b from the configured range and trains the truncated adapter: the first b
columns of A and the first b rows of B (mlx-lm's layout, ``x @ A @ B``). Components past b take no part in that
example, so their gradients are zero; the leading components, in every sampled
adapter, learn the most. After one run, the first r components are a usable
adapter for any trained rank r: pick it at deploy time.

``rank_draw`` ``example`` (the default) draws a rank per example instead of
per step (``step``): the batch's examples take the range's ranks in a
shuffled order, so every step trains several ranks at once and even a short
run gives each rank its share of steps. Example i's output is exactly the
rank-b_i adapter's. Measured (benchmarks/dylora.py, 16 steps), per-example
draws cut the gap to a run per rank from 8-26% to 1-13%, and lowered the
validation loss at ranks 1 and 4 (uniform: 2.285 -> 2.252, 2.096 -> 2.067).

A rank-r forward is exactly the first r components' updates, times the
scale of rank r: ``rank_scaling`` ``constant`` (the default) keeps one scale
at every rank, ``inverse`` (DyLoRA's alpha / b) uses scale * R / r, so that
every step moves the output about as much whatever its rank. Measured on
validation text (benchmarks/dylora.py, 16 steps from a naive start), the
inverse scale made the low ranks much worse (rank 1: 2.60 against 2.29
cross-entropy): R times the scale on one component overshoots. At rank R
both are mlx-lm's LoRA, so mlx-lm
(which reads these adapters as ordinary LoRA, ``fine_tune_type`` aside) runs
them at rank R.

``lora_parameters`` as mlx-lm's, plus ``min_rank`` (default 1),
``rank_sampling``: ``uniform`` (every rank in min_rank..rank equally likely)
or ``powers`` (min_rank, 2 min_rank, 4 min_rank, ..., and rank) or ``log``
(each octave min_rank·2^k .. min_rank·2^(k+1) - 1 as likely, then a rank in it,
and rank itself: every rank drawn, the low ones as often as with powers),
``rank_scaling``, ``rank_draw`` (``step`` or ``example``), ``rank_lr`` and
``min_rank_weight`` (how many times the lowest bucket, min_rank or its octave,
counts in the draw; default 1): the lowest rank has the fewest components to
serve on its own, and its component is otherwise trained mostly as a part of
larger adapters.

``rank_lr`` ``sqrt`` (the default) or ``linear`` gives component j a learning
rate times (its share of the examples)^(1/2 or 1), the share being the
probability that a draw reaches j; ``constant`` one learning rate for all. The
top components learn from few examples per step (the rank-16 component, with
``log`` draws over 1..16, from one example in five), and Adam turns those few,
noisy gradients into full-size steps; the square-root and linear batch-size
rules scale a step to the examples behind it. Measured (benchmarks/dylora.py),
``sqrt`` took rank 16 from 9.8% behind its own run to 2.4% and had the lowest
mean validation cross-entropy over ranks 1, 4 and 16 (2.112; constant 2.120,
linear 2.124), which is what made it the default.
"""

from dataclasses import dataclass
from typing import List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear
from mlx.utils import tree_unflatten

from ..errors import EchoError

SAMPLINGS = ("uniform", "powers", "log")
SCALINGS = ("constant", "inverse")
DRAWS = ("step", "example")
# rank_lr: each component's learning rate times its share of the examples to this power.
COMPONENT_LRS = {"constant": 0.0, "sqrt": 0.5, "linear": 1.0}


class DyLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear whose first ``active_rank`` components are used.

    ``active_rank`` is an int, or a tuple with one rank per example of the
    batch (a training step with ``rank_draw`` ``example``): a tuple, not an
    array, so that it is not taken for a parameter of the module."""

    @classmethod
    def from_lora(cls, lora: LoRALinear, rank_scaling: str = "constant") -> "DyLoRALinear":
        max_rank, output_dims = lora.lora_b.shape
        # (Its own random A is discarded unevaluated: MLX is lazy.)
        layer = cls(lora.lora_a.shape[0], output_dims, r=max_rank, scale=lora.scale)
        layer.linear, layer.dropout = lora.linear, lora.dropout
        layer.lora_a, layer.lora_b = lora.lora_a, lora.lora_b
        layer.rank_scaling = rank_scaling
        return layer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_rank = self.lora_b.shape[0]
        self.rank_scaling = "constant"

    @property
    def max_rank(self) -> int:
        return self.lora_b.shape[0]

    @property
    def active_scale(self) -> float:
        return self.scale * (self.max_rank / self.active_rank if self.rank_scaling == "inverse" else 1.0)

    def __call__(self, x):
        r = self.active_rank
        if isinstance(r, tuple):
            return self.linear(x) + self._per_example(self.dropout(x), r).astype(x.dtype)
        z = (self.dropout(x) @ self.lora_a[:, :r]) @ self.lora_b[:r]
        return self.linear(x) + (self.active_scale * z).astype(x.dtype)

    def _per_example(self, x, ranks):
        """Example i through its first ranks[i] components: masking the rest
        zeroes both their output and their gradients, as truncation does."""
        if len(ranks) != x.shape[0]:
            raise ValueError(f"{len(ranks)} ranks for a batch of {x.shape[0]}")
        b = mx.array(ranks)
        keep = (mx.arange(self.max_rank)[None] < b[:, None]).astype(x.dtype)
        scale = self.scale * (self.max_rank / b.astype(mx.float32) if self.rank_scaling == "inverse" else mx.ones(b.shape))
        keep = keep * scale[:, None].astype(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (self.max_rank,)
        return ((x @ self.lora_a) * keep.reshape(shape)) @ self.lora_b

    def fuse(self, dequantize: bool = False):
        """The base with the rank-``active_rank`` update folded in."""
        truncated = LoRALinear.from_base(self.linear, r=self.active_rank, scale=self.active_scale)
        truncated.lora_a, truncated.lora_b = self.lora_a[:, : self.active_rank], self.lora_b[: self.active_rank]
        return truncated.fuse(dequantize)


@dataclass(frozen=True)
class RankRange:
    """The ranks an adapter trains for, and how each step draws one."""

    min_rank: int
    max_rank: int
    sampling: str = "log"
    scaling: str = "constant"
    draw: str = "example"
    lr: str = "sqrt"
    min_rank_weight: int = 1

    @classmethod
    def from_parameters(cls, lora_parameters: dict) -> "RankRange":
        max_rank, min_rank = lora_parameters.get("rank"), lora_parameters.get("min_rank", 1)
        # The defaults are the dataclass's own, stated once above.
        sampling = lora_parameters.get("rank_sampling", cls.sampling)
        scaling = lora_parameters.get("rank_scaling", cls.scaling)
        draw = lora_parameters.get("rank_draw", cls.draw)
        lr = lora_parameters.get("rank_lr", cls.lr)
        weight = lora_parameters.get("min_rank_weight", cls.min_rank_weight)
        for name, value in (("rank", max_rank), ("min_rank", min_rank), ("min_rank_weight", weight)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EchoError(f"lora_parameters {name} must be a whole number >= 1, not {value!r}")
        if min_rank > max_rank:
            raise EchoError(f"the rank range {min_rank}..{max_rank} is empty: give min_rank <= rank")
        if sampling not in SAMPLINGS:
            raise EchoError(f"unknown rank_sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
        if scaling not in SCALINGS:
            raise EchoError(f"unknown rank_scaling {scaling!r}: use one of {', '.join(SCALINGS)}")
        if draw not in DRAWS:
            raise EchoError(f"unknown rank_draw {draw!r}: use one of {', '.join(DRAWS)}")
        if lr not in COMPONENT_LRS:
            raise EchoError(f"unknown rank_lr {lr!r}: use one of {', '.join(COMPONENT_LRS)}")
        return cls(min_rank, max_rank, sampling, scaling, draw, lr, weight)

    def buckets(self) -> List[List[int]]:
        """The draw: a bucket, all equally likely, then a rank within it; the
        lowest bucket is listed ``min_rank_weight`` times."""
        if self.sampling == "uniform":
            buckets = [[r] for r in range(self.min_rank, self.max_rank + 1)]
        else:
            powers = self.powers()
            if self.sampling == "powers":
                buckets = [[r] for r in powers + [self.max_rank]]
            else:  # log: every octave [b, 2b) as likely, and the full rank: all ranks drawn, the low ones often.
                buckets = [list(range(b, min(2 * b, self.max_rank))) for b in powers] + [[self.max_rank]]
        return [buckets[0]] * (self.min_rank_weight - 1) + buckets

    def powers(self) -> List[int]:
        """min_rank, 2 min_rank, 4 min_rank, ... below max_rank."""
        powers, r = [], self.min_rank
        while r < self.max_rank:
            powers.append(r)
            r *= 2
        return powers

    def choices(self) -> List[int]:
        return [r for bucket in self.buckets() for r in bucket]

    def component_shares(self) -> List[float]:
        """Per component j = 1..max_rank, the probability that a draw reaches it
        (rank >= j): the share of examples (or steps) whose gradient trains it."""
        buckets, shares = self.buckets(), [0.0] * self.max_rank
        for bucket in buckets:
            for r in bucket:
                for j in range(r):
                    shares[j] += 1.0 / (len(buckets) * len(bucket))
        return shares

    def lr_multipliers(self) -> List[float]:
        """Per component, the factor on its learning rate (``rank_lr``): 1 for every
        component (``constant``), or its share of the examples to the power 1/2 (``sqrt``)
        or 1 (``linear``), the batch-size rules for a gradient averaged over fewer examples."""
        power = COMPONENT_LRS[self.lr]
        return [min(1.0, s) ** power for s in self.component_shares()]

    def sample(self, seed: int, step: int) -> int:
        """The rank of training step ``step``: a function of (seed, step) alone, so
        every distributed rank draws the same one and ``--resume`` redraws them exactly."""
        import numpy as np

        rng, buckets = np.random.default_rng([seed, step, 0x0D71]), self.buckets()
        return _within(buckets[int(rng.integers(len(buckets)))], rng)

    def sample_examples(self, seed: int, step: int, micro: int, batch_size: int) -> tuple:
        """One rank per example of micro-batch ``micro`` of step ``step`` (the
        global batch: distributed rank k takes every world_size-th, as it does the
        examples). The range's ranks in a shuffled order, repeated as needed, so a
        batch with at least as many examples as ranks (``log``: octaves) trains every one."""
        import numpy as np

        buckets = self.buckets()
        rng = np.random.default_rng([seed, step, micro, 0x0D72])
        order = np.concatenate([rng.permutation(len(buckets)) for _ in range(-(-batch_size // len(buckets)))])
        return tuple(_within(buckets[int(i)], rng) for i in order[:batch_size])

    def check(self, rank: int, path) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not self.min_rank <= rank <= self.max_rank:
            raise EchoError(
                f"--lora-rank {rank} is outside the ranks the adapters in {path} were trained for "
                f"({self.min_rank}..{self.max_rank}): pick one in that range"
            )
        return rank


def _within(bucket: List[int], rng) -> int:
    return bucket[int(rng.integers(len(bucket)))] if len(bucket) > 1 else bucket[0]


def to_dynamic(model: nn.Module, rank_scaling: str = "constant") -> List[DyLoRALinear]:
    """Replace every LoRALinear in ``model`` by a DyLoRALinear holding the same arrays."""
    swapped = [(name, DyLoRALinear.from_lora(m, rank_scaling)) for name, m in model.named_modules() if type(m) is LoRALinear]
    if swapped:
        model.update_modules(tree_unflatten(swapped))
    return [m for _, m in swapped]


def scale_updates(layers: List[DyLoRALinear], before: list, multipliers: List[float]) -> None:
    """Scale the optimizer's last update of each component by its multiplier:
    ``before`` holds every layer's (lora_a, lora_b) from before the update. Any
    optimizer's state depends on the gradients alone, so this is exactly a
    learning rate per component."""
    m = mx.array(multipliers)
    for layer, (a, b) in zip(layers, before):
        layer.lora_a = a + (layer.lora_a - a) * m.astype(a.dtype)
        layer.lora_b = b + (layer.lora_b - b) * m[:, None].astype(b.dtype)


def dynamic_layers(model: nn.Module) -> List[DyLoRALinear]:
    return [m for _, m in model.named_modules() if isinstance(m, DyLoRALinear)]


def set_rank(model: nn.Module, rank) -> None:
    """Use the first ``rank`` components of every dynamic adapter in ``model``
    (an int, or a sequence of one rank per example of the next batch)."""
    rank = rank if isinstance(rank, int) else tuple(int(r) for r in rank)
    for layer in dynamic_layers(model):
        # Past nn.Module.__setattr__, which would file a tuple among the parameters.
        object.__setattr__(layer, "active_rank", rank)
