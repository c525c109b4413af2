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
- ``echoatt:K``                EchoAtt: the inner layers 1..L-2 form blocks of K consecutive
                               layers; the other K-1 layers of a block reuse its first layer's
                               attention probabilities with their own V

N counts the layers that compute K/V, so the KV-cache reduction is L / N.

EchoAtt is a second, independent field: an entry ``iaS`` (e.g. ``3a2``) says
layer i keeps its own V but reuses the attention probabilities of layer S < i
(S's queries and keys): it has no q/k projections and caches V only, so it
saves half a layer's cache. ``0_1_2a1_3a1_4`` is ``echoatt:3`` on 5 layers.
Layer 0 always computes its own K/V (sharing it ruins quality, and its cache
carries the token offset). For lasagna with middle/top targets layer 0 is its
own group and the other layers form N-1 groups.
"""

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..errors import EchoError
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
    "echoatt:K",
)
_ENTRY = r"\d+s?(?:a\d+)?"
DEFAULT_SLIDING_WINDOW = 4096


@dataclass(frozen=True)
class SharingPlan:
    kv_sources: Tuple[int, ...]
    sliding: Tuple[bool, ...]
    name: Optional[str] = None  # the preset it came from, for display
    sliding_window: Optional[int] = None
    # EchoAtt: layer i reuses the attention probabilities of layer attention_sources[i].
    attention_sources: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.attention_sources is None:
            object.__setattr__(self, "attention_sources", tuple(range(len(self.kv_sources))))

    # ---- construction -------------------------------------------------
    @classmethod
    def parse(cls, text: str, num_layers: int) -> "SharingPlan":
        """A preset name or a raw plan string, resolved and validated."""
        text = text.strip()
        if re.fullmatch(rf"{_ENTRY}(_{_ENTRY})*", text):
            entries = [re.fullmatch(r"(\d+)(s?)(?:a(\d+))?", e).groups() for e in text.split("_")]
            sources = tuple(int(j) for j, _, _ in entries)
            sliding = tuple(s == "s" for _, s, _ in entries)
            attention = tuple(i if a is None else int(a) for i, (_, _, a) in enumerate(entries))
            window = DEFAULT_SLIDING_WINDOW if any(sliding) else None
            return cls(sources, sliding, None, window, attention).validated(num_layers)
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
            tuple(config.get("attention_sources") or range(L)),
        ).validated(L)

    def to_config(self) -> dict:
        """The keys the model file reads (see echo_mlx.models.model.ModelArgs)."""
        config = {
            "kv_sources": list(self.kv_sources),
            "sliding_layers": [i for i, s in enumerate(self.sliding) if s],
            "sliding_window": self.sliding_window,
        }
        if self.attention_consumers:  # absent otherwise: plain plans keep plain configs
            config["attention_sources"] = list(self.attention_sources)
        return config

    def __str__(self) -> str:
        return "_".join(
            f"{j}{'s' if s else ''}{f'a{a}' if a != i else ''}"
            for i, (j, s, a) in enumerate(zip(self.kv_sources, self.sliding, self.attention_sources))
        )

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
    def attention_consumers(self) -> Tuple[int, ...]:
        """EchoAtt layers: their own V, another layer's attention probabilities."""
        return tuple(i for i, a in enumerate(self.attention_sources) if a != i)

    @property
    def kv_reduction(self) -> float:
        """Unshared cache bytes / this plan's: a producer caches K and V, an EchoAtt layer V only."""
        halves = 2 * len(self.producers) - len(self.attention_consumers)
        return 2 * self.num_layers / halves

    @property
    def cyclic_blocks(self):
        return cyclic_blocks(list(self.kv_sources))

    @property
    def is_identity(self) -> bool:
        return self.kv_sources == tuple(range(self.num_layers)) and not self.attention_consumers

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
        self._validate_attention(where)
        if self.kv_sources[0] != 0:
            raise EchoError(
                f"{where}: layer 0 must compute its own K/V (entry 0 must be 0): "
                f"sharing the first layer's K/V ruins quality"
            )
        return self

    def _validate_attention(self, where: str):
        n = len(self.attention_sources)
        if n != len(self.kv_sources):
            raise EchoError(f"{where}: {n} attention sources for {len(self.kv_sources)} layers: give one per layer")
        for i, s in enumerate(self.attention_sources):
            if s == i:
                continue
            if s == 0:
                raise EchoError(
                    f"{where}: layer {i} reuses the attention of layer 0, but an EchoAtt block may not "
                    f"contain layer 0 (its attention is the least like any other): start blocks at layer 1"
                )
            if not 0 < s < i:
                raise EchoError(
                    f"{where}: layer {i} reuses the attention of layer {s}: an EchoAtt source must be a "
                    f"layer below it, use an index between 1 and {i - 1}"
                )
            if self.attention_sources[s] != s:
                raise EchoError(
                    f"{where}: layer {i} reuses the attention of layer {s}, which itself reuses layer "
                    f"{self.attention_sources[s]}'s: point layer {i} at {self.attention_sources[s]}"
                )
            if self.kv_sources[i] != i or any(j == i for k, j in enumerate(self.kv_sources) if k != i):
                raise EchoError(
                    f"{where}: layer {i} reuses layer {s}'s attention, so it has no keys and must compute "
                    f"its own V (entry {i} must be {i}a{s}) and no other layer may attend to its K/V"
                )
            if self.sliding[i] != self.sliding[s]:
                raise EchoError(
                    f"{where}: layer {i} and its attention source {s} differ in sliding-window type: "
                    f"mark both with 's' or neither"
                )


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
    elif name == "echoatt":
        k = need("block size K", 2, max(2, L - 2))
        if L < 4:
            raise EchoError(f"preset echoatt needs at least 4 layers (inner blocks keep the first and last), the model has {L}")
        return SharingPlan(tuple(range(L)), (False,) * L, text, None, _echoatt_blocks(k, L))
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


def _echoatt_blocks(k: int, L: int) -> Tuple[int, ...]:
    """Inner layers 1..L-2 in blocks of k; each block's first layer is the source."""
    sources = list(range(L))
    for start in range(1, L - 1, k):
        for i in range(start + 1, min(start + k, L - 1)):
            sources[i] = start
    return tuple(sources)


def plan_id(args) -> str:
    """The plan of a model's args (echo_mlx.models.model.ModelArgs) as a plan string:
    what adapters and prompt caches record, so they load onto the same plan only."""
    L = len(args.kv_sources)
    sliding = set(args.sliding_layers or ())
    attention = tuple(getattr(args, "attention_sources", None) or range(L))
    return str(SharingPlan(tuple(args.kv_sources), tuple(i in sliding for i in range(L)), attention_sources=attention))


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
