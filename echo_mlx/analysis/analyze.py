"""`echo-mlx analyze`: which layers should share K/V.

The original (unshared) model reads a few calibration windows. For every layer
we recompute, from the layer's own modules, its keys (post-RoPE), values and
attention probabilities softmax(QK^T * scale + causal mask), and compare every
pair of layers by cosine similarity: per head, averaged over heads and
windows. That gives three symmetric L x L matrices (K, V, attention).

A consumer reading producer p's K/V loses least where its own K and V already
look like p's. So for a target reduction R the suggested plan keeps layer 0
alone (as every plan does, no layer reads it), splits layers 1..L-1 into
floor(L / R) - 1 contiguous groups that read their bottom layer (no iterative
prefill), and picks the split by dynamic programming: maximum summed
(K + V) / 2 similarity of each consumer to its producer.

On real models these K/V cosines are small (SmolLM2, off the diagonal: K
within +-0.33, V +-0.08, attention probabilities 0.06 to 0.86): each layer
projects into its own basis, the very mismatch a naively converted consumer
meets, and the score only loosely predicts naive perplexity. So
``--evaluate N`` converts the N best-scoring candidates (this plan, the K-only
and V-only ones, the bottom presets with as many K/V layers) naively and
ranks them by perplexity on validation text (the built-in corpus's validation
part, in the training half: a choice made on held-out text would bias the
held-out figure of what it chose); the lowest becomes the suggestion.
``--search`` (echo_mlx.analysis.search) replaces similarity by measured damage.
"""

import json
import math
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import EchoError
from ..models.plans import SharingPlan

MATRICES = ("k", "v", "attention")
PAIR_SCORES = {"kv": "suggested (K+V)", "k": "suggested (K only)", "v": "suggested (V only)"}


@dataclass
class Similarity:
    """Layer x layer cosine similarities, each averaged over heads and windows."""

    k: np.ndarray
    v: np.ndarray
    attention: np.ndarray

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def pair_scores(self, by: str = "kv") -> np.ndarray:
        """score[consumer, producer]: how well the producer's K/V stand in for the consumer's."""
        return {"kv": (self.k + self.v) / 2, "k": self.k, "v": self.v}[by]


@dataclass
class Candidate:
    plan: SharingPlan
    name: str  # "suggested (...)" or the preset(s) it equals
    score: float  # mean (K + V) / 2 similarity of each consumer to its producer
    perplexity: Optional[float] = None

    def to_json(self) -> dict:
        out = {
            "plan": str(self.plan),
            "name": self.name,
            "kv_layers": len(self.plan.producers),
            "kv_reduction": self.plan.kv_reduction,
            "score": self.score,
            "perplexity": self.perplexity,
        }
        return out if self.perplexity is not None else {k: v for k, v in out.items() if k != "perplexity"}


@dataclass
class Capture:
    """One forward pass of an unshared model, layer by layer (float32)."""

    hidden: List[mx.array]  # residual stream entering each layer, then leaving the last (before the norm)
    keys: List[mx.array] = field(default_factory=list)  # (B, kv heads, T, head dim), post-RoPE
    values: List[mx.array] = field(default_factory=list)  # (B, kv heads, T, head dim)
    probs: List[mx.array] = field(default_factory=list)  # (B, heads, T, T)


# ---- calibration -----------------------------------------------------------
def calibration_windows(tokens: Sequence[int], window: int, count: int, what: str = "calibration text") -> List[List[int]]:
    """``count`` windows of ``window`` tokens spread evenly over ``tokens`` (they overlap if the text is short)."""
    if window < 2:
        raise EchoError(f"--window {window} is too small: attention needs at least 2 tokens, use e.g. 256")
    if count < 1:
        raise EchoError(f"--num-windows {count} is too small: use at least 1 (default 8)")
    if len(tokens) < window:
        raise EchoError(
            f"{what} has {len(tokens)} tokens, fewer than one window of {window}: "
            f"give a longer --calibration file or a smaller --window"
        )
    starts = np.linspace(0, len(tokens) - window, count).round().astype(int)
    return [list(tokens[s : s + window]) for s in starts]


# ---- capture and similarity -------------------------------------------------
def capture(model, tokens: mx.array) -> Capture:
    """K, V and attention probabilities of every layer for ``tokens`` (B, T).

    Recomputed here from each layer's modules, while the layer itself advances
    the hidden state exactly as LlamaModel does for an uncached forward (the
    tests check both against the model's own computation)."""
    inner = model.model
    h = inner.embed_tokens(tokens)
    out, kv = Capture(hidden=[]), {}
    for layer in inner.layers:
        keys, values, probs = _attention_of(layer, h)
        out.hidden.append(h.astype(mx.float32))
        out.keys.append(keys)
        out.values.append(values)
        out.probs.append(probs)
        h = layer(h, "causal", None, kv, 0)
    out.hidden.append(h.astype(mx.float32))
    return out


def _attention_of(layer, h):
    attn = layer.self_attn
    if not attn.produces_kv or attn.reuses_attention or attn.kv_source != attn.layer_idx:
        raise EchoError(
            f"layer {attn.layer_idx} does not compute its own attention: analyze needs the original "
            "unshared model, pass the --model the checkpoint was converted from"
        )
    x = layer.input_layernorm(h)
    B, T, _ = x.shape
    heads = lambda a, n: a.reshape(B, T, n, -1).transpose(0, 2, 1, 3).astype(mx.float32)
    queries = attn.rope(heads(attn.q_proj(x), attn.n_heads), offset=0)
    keys = attn.rope(heads(attn.k_proj(x), attn.n_kv_heads), offset=0)
    values = heads(attn.v_proj(x), attn.n_kv_heads)
    # GQA: query head h reads kv head h // (n_heads / n_kv_heads), as mlx's attention does.
    group = attn.n_heads // attn.n_kv_heads
    q = queries.reshape(B, attn.n_kv_heads, group, T, -1) * attn.scale
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    causal = mx.arange(T)[:, None] >= mx.arange(T)[None]
    scores = mx.where(causal, scores, mx.array(-mx.inf, mx.float32))
    probs = mx.softmax(scores, axis=-1, precise=True).reshape(B, attn.n_heads, T, T)
    return keys, values, probs


def _head_cosines(per_layer: List[mx.array]) -> np.ndarray:
    """(L, L) cosine similarity of each layer pair, per head, averaged over heads.

    Per head rather than over the flattened tensor: every head is its own
    attention computation, and a flattened cosine would be decided by the few
    heads with large-norm keys or values."""
    x = mx.stack([a.swapaxes(0, 1).reshape(a.shape[1], -1) for a in per_layer], axis=1)  # (H, L, D)
    gram = np.array(x @ x.swapaxes(1, 2), dtype=np.float64)  # (H, L, L)
    norms = np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
    denom = norms[:, :, None] * norms[:, None, :]
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    return np.clip(cos.mean(axis=0), -1.0, 1.0)


def similarity(model, windows: Sequence[Sequence[int]], progress: bool = False) -> Similarity:
    """K, V and attention similarity of every layer pair, averaged over ``windows``.

    One window at a time: only that window's tensors for all layers are held
    (SmolLM2, 256 tokens: ~80 MB, mostly attention probabilities)."""
    from tqdm import tqdm

    totals = {name: 0.0 for name in MATRICES}
    for w in tqdm(windows, desc="analyze", unit="window", disable=not progress, leave=False):
        c = capture(model, mx.array([list(w)]))
        mx.eval(c.keys, c.values, c.probs)
        for name, tensors in zip(MATRICES, (c.keys, c.values, c.probs)):
            totals[name] = totals[name] + _head_cosines(tensors)
    return Similarity(**{name: total / len(windows) for name, total in totals.items()})


# ---- plans ----------------------------------------------------------------------
def check_target_reduction(R: float) -> float:
    if not R >= 1:  # also NaN
        raise EchoError(f"--target-reduction {R:g} is below 1: a plan cannot grow the KV cache, use a value >= 1 such as 2")
    return R


def kv_layers(num_layers: int, target_reduction: float) -> int:
    """How many layers keep K/V for a reduction of at least ``target_reduction``."""
    L, R = num_layers, check_target_reduction(target_reduction)
    n = math.floor(L / R + 1e-9)
    if L == 1 and n < 1:
        raise EchoError(f"--target-reduction {R:g} is impossible for a 1-layer model: it cannot share K/V, use 1")
    if L > 1 and n < 2:
        raise EchoError(
            f"--target-reduction {R:g} is impossible for a {L}-layer model: layer 0 keeps its own K/V, "
            f"so at most {L / 2:.1f}x: use a value <= {L / 2:g}"
        )
    return n


def plan_score(sim: Similarity, plan: SharingPlan) -> float:
    """Mean (K + V) / 2 similarity of each consumer to its producer (1 when nothing is shared)."""
    score = sim.pair_scores("kv")
    pairs = [(i, j) for i, j in enumerate(plan.kv_sources) if i != j]
    return float(np.mean([score[i, j] for i, j in pairs])) if pairs else 1.0


def suggest_plan(sim: Similarity, target_reduction: float, by: str = "kv") -> Candidate:
    """The contiguous bottom-producer plan with floor(L / R) K/V layers that
    maximises the ``by`` similarity (kv, k or v) of consumers to producers."""
    L = sim.num_layers
    n = kv_layers(L, target_reduction)
    sources = [0]
    if L > 1:
        starts = _best_partition(sim.pair_scores(by), n - 1)
        for a, b in zip(starts, starts[1:] + [L]):
            sources += [a] * (b - a)
    plan = SharingPlan.parse("_".join(map(str, sources)), L)
    return Candidate(plan, PAIR_SCORES[by], plan_score(sim, plan))


def _best_partition(score: np.ndarray, groups: int) -> List[int]:
    """First layers of the ``groups`` contiguous groups of layers 1..L-1 that
    maximise sum over consumers c of score[c, first layer of c's group]."""
    L = len(score)
    # gain[a, b]: group [a, b) read from a, i.e. sum of score[c, a] for a < c < b.
    gain = np.zeros((L + 1, L + 1))
    for a in range(1, L):
        gain[a, a + 1 :] = np.concatenate([[0.0], np.cumsum(score[a + 1 :, a])])
    # best[g, b]: layers 1..b-1 in g groups; last[g, b]: the start of the g-th.
    best = np.full((groups + 1, L + 1), -np.inf)
    last = np.zeros((groups + 1, L + 1), dtype=int)
    best[0, 1] = 0.0
    for g in range(1, groups + 1):
        for b in range(g + 1, L + 1):
            options = [best[g - 1, a] + gain[a, b] for a in range(g, b)]
            last[g, b] = g + int(np.argmax(options))
            best[g, b] = max(options)
    starts, b = [], L
    for g in range(groups, 0, -1):
        starts.append(last[g, b])
        b = last[g, b]
    return starts[::-1]


def candidates(sim: Similarity, target_reduction: float) -> List[Candidate]:
    """Plans with floor(L / R) K/V layers, best (K + V) score first, duplicates merged."""
    L = sim.num_layers
    n = kv_layers(L, target_reduction)
    found = [suggest_plan(sim, target_reduction, by) for by in PAIR_SCORES]
    presets = [f"{p}-bottom:{n}" for p in ("lasagna", "pizza", "sandwich")] + ["yoco"]
    presets += [f"cla:{k}" for k in range(2, L + 1) if -(-L // k) == n]
    for text in presets:
        try:
            plan = SharingPlan.parse(text, L)
        except EchoError:  # e.g. yoco on one layer
            continue
        if len(plan.producers) == n:
            found.append(Candidate(plan, text, plan_score(sim, plan)))
    unique = {}
    for c in found:
        seen = unique.get(c.plan.kv_sources)
        unique[c.plan.kv_sources] = replace(seen, name=f"{seen.name} = {c.name}") if seen else c
    return sorted(unique.values(), key=lambda c: -c.score)


# ---- evaluation -------------------------------------------------------------------
def ranking_windows(tokenizer, count: int, length: int) -> List[List[int]]:
    """``count`` windows of ``length`` scored tokens from the built-in corpus's validation part."""
    from ..datasets.corpus import validation_windows

    if count < 2 or length < 1:
        raise EchoError(f"--eval-windows {count} / --eval-length {length}: use at least 2 windows of at least 1 token")
    found = validation_windows(tokenizer, length + 1)
    if len(found) < count:
        raise EchoError(f"the validation part holds {len(found)} windows of {length} scored tokens, fewer than "
                        f"--eval-windows {count}: lower --eval-windows or --eval-length")
    return found[:count]


def evaluate_candidates(src, found: Sequence[Candidate], windows, *, kv_init: str = "own", progress: bool = False) -> List[Candidate]:
    """Convert each candidate naively from the loaded source (echo_mlx.io.sources.SourceModel) and
    measure its perplexity on ``windows``; lowest first."""
    from tqdm import tqdm

    from ..conversion.convert import shared_model
    from .evaluate import perplexity

    ranked = []
    for c in tqdm(found, desc="evaluate", unit="plan", disable=not progress, leave=False):
        model, _ = shared_model(src.config, src.weights, c.plan, kv_init=kv_init, source=src.source)
        ranked.append(replace(c, perplexity=perplexity(model, windows)))
        del model
    return sorted(ranked, key=lambda c: c.perplexity)


# ---- the whole command --------------------------------------------------------------
@dataclass
class Analysis:
    model: str  # as the user gave it
    source: str  # what it resolved to
    calibration: str
    window: int
    num_windows: int
    similarity: Similarity
    target_reduction: float
    suggestion: Candidate
    evaluation: Optional[dict] = None  # protocol, kv_init, baseline perplexity, ranking

    def convert_command(self) -> str:
        return f"echo-mlx convert --model {shlex.quote(self.model)} --plan {self.suggestion.plan} --out echo-analyzed"


def analyze(
    model: str = "default",
    *,
    calibration: Optional[str] = None,
    window: int = 256,
    num_windows: int = 8,
    target_reduction: float = 2.0,
    evaluate: int = 0,
    kv_init: str = "own",
    eval_windows: int = 4,
    eval_length: int = 256,
    progress: bool = False,
) -> Analysis:
    """Similarity of the unshared ``model``'s layers, a suggested plan and, with
    ``evaluate`` > 0, the naive perplexity of the best-scoring candidates."""
    from ..io import checkpoint
    from ..conversion.convert import KV_INIT, shared_model
    from ..datasets.corpus import builtin_tokens, split
    from .evaluate import perplexity
    from ..io.sources import load_source

    check_target_reduction(target_reduction)  # before the model loads; the upper bound needs L
    if kv_init not in KV_INIT:
        raise EchoError(f"unknown --kv-init {kv_init!r}: use one of {', '.join(KV_INIT)}")
    if evaluate < 0:
        raise EchoError(f"--evaluate {evaluate}: give the number of plans to evaluate, 0 for none")
    text, described = _calibration_text(calibration)
    if checkpoint.is_echo_checkpoint(model):
        raise EchoError(f"{model} is an echo checkpoint: analyze the original model it was converted from (its config.json echo.source)")
    # Loaded once: the unshared model and every evaluated candidate are built from these weights.
    src = load_source(model, dtype="float32")
    L = src.config["num_hidden_layers"]
    kv_layers(L, target_reduction)
    tokens = builtin_tokens(src.tokenizer) if text is None else src.tokenizer.encode(text, add_special_tokens=False)
    tokens = split(tokens)[0] if text is None else tokens
    windows = calibration_windows(tokens, window, num_windows, described)
    test_windows = ranking_windows(src.tokenizer, eval_windows, eval_length) if evaluate else None

    unshared, _ = shared_model(src.config, src.weights, SharingPlan.parse("none", L), source=src.source)
    sim = similarity(unshared, windows, progress=progress)
    result = Analysis(model, src.source, f"{described} ({len(tokens):,} tokens)", window, num_windows, sim,
                      target_reduction, suggest_plan(sim, target_reduction))
    if evaluate:
        ranking = evaluate_candidates(src, candidates(sim, target_reduction)[:evaluate], test_windows,
                                      kv_init=kv_init, progress=progress)
        result.evaluation = {
            "protocol": f"built-in corpus, validation part: {eval_windows} windows of {eval_length} scored tokens, no BOS",
            "kv_init": kv_init,
            "baseline_perplexity": perplexity(unshared, test_windows),
            "ranking": [c.to_json() for c in ranking],
        }
        # Similarity is a proxy; measured perplexity decides once it is there.
        result.suggestion = ranking[0]
    return result


def _calibration_text(path: Optional[str]):
    """(text or None for the built-in corpus, a description for messages and the report)."""
    from ..datasets.corpus import read_text_file

    if path is None:
        return None, "built-in corpus, training half"
    return read_text_file(path, "--calibration"), f"calibration file {path}"


# ---- output ---------------------------------------------------------------------
def write_report(out, result: Analysis) -> List[Path]:
    """``report.json`` and one heatmap per matrix in ``out``; returns the paths written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EchoError(f"cannot create --out {out} ({e.strerror}): choose another directory")
    sim, s = result.similarity, result.suggestion
    report = {
        "model": result.model,
        "source": result.source,
        "layers": sim.num_layers,
        "calibration": result.calibration,
        "window": result.window,
        "num_windows": result.num_windows,
        "method": "cosine similarity per head (K, V: kv heads post-RoPE; attention: query heads), "
        "averaged over heads and windows; plan score = mean over consumers of (K + V) / 2 to the producer",
        "similarity": {name: np.round(getattr(sim, name), 6).tolist() for name in MATRICES},
        "suggestion": dict(s.to_json(), target_reduction=result.target_reduction,
                           convert=result.convert_command()),
        "evaluation": result.evaluation,
    }
    paths = [out / "report.json"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    titles = {"k": "keys (post-RoPE)", "v": "values", "attention": "attention probabilities"}
    for name in MATRICES:
        paths.append(out / f"similarity_{name}.png")
        plot_similarity(getattr(sim, name), paths[-1], f"{titles[name]}: cosine similarity", s.plan)
    return paths


def plot_similarity(matrix: np.ndarray, path, title: str, plan: Optional[SharingPlan] = None):
    """A heatmap of one matrix; the plan's groups outlined on the diagonal."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    L = len(matrix)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0, origin="upper")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    for members in (plan.groups().values() if plan else ()):
        first, last = min(members), max(members)
        ax.add_patch(Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1, fill=False, ec="white", lw=1.2))
    ticks = range(0, L, max(1, L // 10))
    ax.set_xticks(ticks), ax.set_yticks(ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title + (f"\n(outlined: suggested plan {plan.kv_reduction:.2f}x)" if plan else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
