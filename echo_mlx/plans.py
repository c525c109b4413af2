"""Sharing plans: which layer's K/V each layer attends to.

A plan is written in the string format of the cross-layer KV sharing study
(``layer_types``): one entry per layer, ``"_"``-joined, the i-th entry is the
index of the layer whose K/V layer i attends to, with an ``s`` suffix for a
sliding-window layer, e.g. ``0_0_2_2_4s_4s``. Named presets resolve to such a
string for a given number of layers:

- ``none``                     every layer keeps its own K/V
- ``cla:K``                    groups of K consecutive layers share the bottom layer's K/V (CLA-K)
- ``lasagna-{bottom,middle,top}:N``  N consecutive groups, one producer each
- ``pizza-{bottom,middle,top}:N``    the first N-1 layers keep their K/V, all others share one
- ``sandwich-{bottom,middle,top}:N`` as pizza, but the own-K/V layers split bottom and top
- ``yoco`` / ``yoco:W``       the top half reuses the K/V of the last bottom-half layer
                               (with ``:W``, bottom-half layers below it use a window of W)
- ``echo:B``                   layers B.. reuse the K/V of layer B-1: the plan of one stage of
                               ECHO-LLaMA's progressive conversion, whose boundary B moves down
- ``lckv:W``                   LCKV with W warm-up layers (= ``sandwich-top:W+1``)

N counts the layers that compute K/V, so the KV-cache reduction is L / N.
Layer 0 always computes its own K/V (sharing it ruins quality, and its cache
carries the token offset). For lasagna with middle/top targets layer 0 is its
own group and the other layers form N-1 groups.
"""

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .errors import EchoError
from .model import cyclic_blocks

TARGETS = ("bottom", "middle", "top")
PRESETS = (
    "none",
    "cla:K",
    *(f"{p}-{t}:N" for p in ("lasagna", "pizza", "sandwich") for t in TARGETS),
    "yoco",
    "yoco:W",
    "echo:B",
    "lckv:W",
)
DEFAULT_SLIDING_WINDOW = 4096


@dataclass(frozen=True)
class SharingPlan:
    kv_sources: Tuple[int, ...]
    sliding: Tuple[bool, ...]
    name: Optional[str] = None  # the preset it came from, for display
    sliding_window: Optional[int] = None

    # ---- construction -------------------------------------------------
    @classmethod
    def parse(cls, text: str, num_layers: int) -> "SharingPlan":
        """A preset name or a raw plan string, resolved and validated."""
        text = text.strip()
        if re.fullmatch(r"\d+s?(_\d+s?)*", text):
            sources, sliding = zip(*((int(e.rstrip("s")), e.endswith("s")) for e in text.split("_")))
            window = DEFAULT_SLIDING_WINDOW if any(sliding) else None
            return cls(tuple(sources), tuple(sliding), None, window).validated(num_layers)
        plan = _preset(text, num_layers)
        return plan.validated(num_layers)

    @classmethod
    def from_config(cls, config: dict) -> "SharingPlan":
        L = config["num_hidden_layers"]
        sources = tuple(config.get("kv_sources") or range(L))
        sliding = set(config.get("sliding_layers") or ())
        return cls(
            sources,
            tuple(i in sliding for i in range(L)),
            config.get("echo", {}).get("plan"),
            config.get("sliding_window"),
        ).validated(L)

    def to_config(self) -> dict:
        """The keys the model file reads (see echo_mlx.model.ModelArgs)."""
        return {
            "kv_sources": list(self.kv_sources),
            "sliding_layers": [i for i, s in enumerate(self.sliding) if s],
            "sliding_window": self.sliding_window,
        }

    def __str__(self) -> str:
        return "_".join(f"{j}{'s' if s else ''}" for j, s in zip(self.kv_sources, self.sliding))

    # ---- what the plan implies ------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kv_sources)

    @property
    def producers(self) -> Tuple[int, ...]:
        return tuple(sorted(set(self.kv_sources)))

    @property
    def consumers(self) -> Tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in set(self.kv_sources))

    @property
    def kv_reduction(self) -> float:
        return self.num_layers / len(self.producers)

    @property
    def cyclic_blocks(self):
        return cyclic_blocks(list(self.kv_sources))

    @property
    def is_identity(self) -> bool:
        return self.kv_sources == tuple(range(self.num_layers))

    def groups(self) -> dict:
        """producer -> the layers attending to its K/V (itself included)."""
        out = {j: [] for j in self.producers}
        for i, j in enumerate(self.kv_sources):
            out[j].append(i)
        return out

    def validated(self, num_layers: int) -> "SharingPlan":
        n = len(self.kv_sources)
        where = f"plan {self}"
        if n != num_layers:
            raise EchoError(
                f"{where} has {n} entries but the model has {num_layers} layers: "
                f"give one entry per layer or use a preset such as cla:2"
            )
        for i, j in enumerate(self.kv_sources):
            if not 0 <= j < n:
                raise EchoError(
                    f"{where}: layer {i} attends to layer {j}, which does not exist: "
                    f"use indices 0..{n - 1}"
                )
            if self.kv_sources[j] != j:
                raise EchoError(
                    f"{where}: layer {i} attends to layer {j}, but layer {j} computes no K/V "
                    f"of its own (it attends to {self.kv_sources[j]}): make entry {j} equal {j} "
                    f"or point layer {i} at {self.kv_sources[j]}"
                )
            if self.sliding[i] != self.sliding[j]:
                raise EchoError(
                    f"{where}: layer {i} and its K/V producer {j} differ in sliding-window "
                    f"type: mark both with 's' or neither"
                )
            if j > i and self.sliding[i]:
                raise EchoError(
                    f"{where}: layer {i} uses a sliding window and attends to layer {j} above "
                    f"it: sliding windows are supported with lower producers only"
                )
        if self.kv_sources[0] != 0:
            raise EchoError(
                f"{where}: layer 0 must compute its own K/V (entry 0 must be 0): "
                f"sharing the first layer's K/V ruins quality"
            )
        return self


def _preset(text: str, L: int) -> SharingPlan:
    m = re.fullmatch(r"([a-z-]+)(?::(\d+))?", text)
    name, arg = (m.group(1), m.group(2)) if m else (text, None)
    n = int(arg) if arg is not None else None

    def need(what: str, lo: int, hi: int) -> int:
        if n is None or not lo <= n <= hi:
            raise EchoError(
                f"preset {text!r} needs {what} between {lo} and {hi} for a {L}-layer "
                f"model, e.g. {name}:{max(lo, min(hi, 2))}"
            )
        return n

    if name == "none" and n is None:
        sources = list(range(L))
    elif name == "cla":
        k = need("group size K", 1, L)
        sources = [(i // k) * k for i in range(L)]
    elif "-" in name and name.split("-", 1)[0] in ("lasagna", "pizza", "sandwich"):
        partition, target = name.split("-", 1)
        if target not in TARGETS:
            raise EchoError(f"unknown plan {text!r}: the target must be one of {', '.join(TARGETS)}")
        kv_layers = need("number of K/V layers N", 1, L)
        sources = _partitioned(partition, target, kv_layers, L)
    elif name == "yoco":
        if L < 2:
            raise EchoError(f"preset yoco needs at least 2 layers, the model has {L}")
        sources = _pizza(L // 2, "bottom", L)
        if n is not None:
            window = need("sliding window W", 1, 1 << 30)
            sliding = tuple(i < L // 2 - 1 for i in range(L))
            return SharingPlan(tuple(sources), sliding, text, window)
    elif name == "echo":
        b = need("boundary layer B", 1, L)
        sources = _pizza(b, "bottom", L)
    elif name == "lckv":
        w = need("number of warm-up layers W", 0, L - 1)
        sources = _partitioned("sandwich", "top", w + 1, L)
    else:
        raise EchoError(
            f"unknown plan {text!r}: use a preset ({', '.join(PRESETS)}) or a string "
            f"like 0_0_2_2 with one producer index per layer (see `echo-mlx plans`)"
        )
    return SharingPlan(tuple(sources), (False,) * L, text)


def _partitioned(partition: str, target: str, kv_layers: int, L: int) -> list:
    if partition == "pizza":
        return _pizza(kv_layers, target, L)
    if partition == "sandwich":
        bottom = -(-(kv_layers - 1) // 2)
        top = (kv_layers - 1) // 2
        sources = list(range(L))
        block = range(bottom, L - top)
        return _share(sources, block, target)
    # lasagna: consecutive groups; layer 0 stays its own producer for middle/top
    sources = list(range(L))
    first = 0 if target == "bottom" else 1
    groups = kv_layers - first
    if groups < 1 or groups > L - first:
        raise EchoError(
            f"lasagna-{target} needs between {first + 1} and {L} K/V layers for a {L}-layer model"
        )
    size, extra = divmod(L - first, groups)
    start = first
    for g in range(groups):
        stop = start + size + (1 if g < extra else 0)
        _share(sources, range(start, stop), target)
        start = stop
    return sources


def _pizza(kv_layers: int, target: str, L: int) -> list:
    return _share(list(range(L)), range(kv_layers - 1, L), target)


def _share(sources: list, block: Sequence[int], target: str) -> list:
    """Make every layer of ``block`` attend to its bottom, middle or top layer."""
    if len(block) == 0:
        return sources
    t = {"bottom": block[0], "top": block[-1], "middle": (block[0] + block[-1]) // 2}[target]
    for i in block:
        sources[i] = t
    return sources
