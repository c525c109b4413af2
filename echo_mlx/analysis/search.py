"""Plan search by measured damage: which layers should share K/V, and with whom.

Similarity of raw K/V barely predicts what sharing costs (analyze's heatmaps:
each layer projects into its own basis). So we measure the cost directly:

1. For every candidate pair (consumer i, producer p), p among the ``reach``
   layers below i, convert *only* that layer, fit it (echo_mlx.conversion.fit: the
   fit of one layer depends on the teacher's stream alone, so it is the same
   fit the layer gets inside any plan), and measure the damage:
   KL(original || converted) per token on scoring windows, which are
   calibration text the fit did not see.
2. For each requested reduction R, keep floor(L / R) K/V layers: choose the
   consumers and their producers with the least summed single-pair damage,
   by dynamic programming over the layers (a consumer reads a layer that
   keeps its K/V; layer 0 always keeps its own).
3. Measure the chosen plan as a whole (all its fitted layers at once):
   KL on the scoring windows, and naive and fitted perplexity on the
   validation windows, for the frontier.

Summed single-pair damage ignores how errors compound, so step 3 reports
the plan's real KL next to the sum. Producers above the consumer (top/middle
targets) are not searched: they need iterative prefill, which costs more
than sharing saves on this hardware.
"""

import math
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..conversion.fit import Calibration, FitOptions, fit_layer
from ..errors import EchoError
from ..models.plans import SharingPlan


@dataclass
class SearchResult:
    num_layers: int
    reach: int
    damage: Dict[Tuple[int, int], float]  # (consumer, producer) -> KL nats/token, that layer alone
    plans: List[dict] = field(default_factory=list)  # per reduction: plan, predicted and measured KL, ppl
    minutes: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "num_layers": self.num_layers, "reach": self.reach, "minutes": self.minutes, "settings": self.settings,
            "damage": [{"consumer": i, "producer": p, "kl": d} for (i, p), d in sorted(self.damage.items())],
            "plans": self.plans,
        }


# ---- damage of one model -------------------------------------------------------------------
def reference_logprobs(cal: Calibration) -> List[tuple]:
    """Per chunk of the scoring windows, the teacher's next-token probabilities p and
    sum(p log p): all that KL(teacher || model) needs from the teacher, computed once."""
    t = cal.teacher
    out = []
    for rows in cal.chunks():
        logits = _head(t, t.model.norm(cal.states[-1][rows]))
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        p = mx.exp(logp)
        out.append((p, (p * logp).sum(-1)))
        mx.eval(out[-1])
    return out


def _head(model, h):
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h).astype(mx.float32)
    return model.lm_head(h).astype(mx.float32)


def kl_from(model, cal: Calibration, reference: List[tuple], start: int) -> float:
    """Mean KL(teacher || model) per token when layers below ``start`` are the teacher's:
    the model runs from the teacher's stream at ``start`` upwards."""
    args = model.args
    L = args.num_hidden_layers
    if model.model.cyclic_blocks:
        raise EchoError("damage is measured for plans whose producers sit below their consumers")
    total, count = 0.0, 0
    for rows, ref in zip(cal.chunks(), reference):
        kv = {}
        below = {args.kv_sources[i] for i in range(start, L)} | {args.attention_sources[i] for i in range(start, L)}
        for j in sorted(j for j in below if j < start):
            model.layers[j].self_attn(cal.x(model, j, rows), cal.mask(model, j), None, kv, 0)
        h = cal.states[start][rows]
        for i in range(start, L):
            h = model.layers[i](h, cal.mask(model, i), None, kv, 0)
        logits = _head(model, model.model.norm(h))
        p, p_log_p = ref
        # KL = sum p log p - sum p log q, with log q = logits - lse(logits) and sum p = 1.
        kl = p_log_p - (p * logits).sum(-1) + mx.logsumexp(logits, axis=-1)
        total += kl.sum().item()
        count += kl.size
    return total / count


# ---- choosing consumers ------------------------------------------------------------------------
def best_plan(damage: Dict[Tuple[int, int], float], num_layers: int, kv_layers: int, reach: int) -> Optional[List[int]]:
    """kv_sources with exactly ``kv_layers`` layers keeping K/V and the least summed damage;
    None if the pairs in ``damage`` cannot reach it."""
    L, consumers = num_layers, num_layers - kv_layers
    INF = float("inf")
    # State after layer i: which of the last ``reach`` layers are consumers (bit k = layer i - k), and how many so far.
    best = {(0, 0): (0.0, [0])}  # layer 0 keeps its K/V
    for i in range(1, L):
        nxt = {}
        for (mask, n), (cost, sources) in best.items():
            shifted = (mask << 1) & ((1 << reach) - 1)
            options = [(cost, shifted, n, sources + [i])]  # layer i keeps its K/V
            if n < consumers:
                for p in range(max(0, i - reach), i):
                    if (i, p) in damage and not (mask >> (i - 1 - p)) & 1:  # p keeps its K/V
                        options.append((cost + damage[(i, p)], shifted | 1, n + 1, sources + [p]))
            for c, m, k, s in options:
                if c < nxt.get((m, k), (INF,))[0]:
                    nxt[(m, k)] = (c, s)
        best = nxt
    finals = [v for (m, n), v in best.items() if n == consumers]
    return min(finals, key=lambda v: v[0])[1] if finals else None


# ---- the search -----------------------------------------------------------------------------------
def layer_weights(model, i: int) -> dict:
    return {f"model.layers.{i}.{k}": v for k, v in tree_flatten(model.layers[i].parameters())}


def search(src, teacher, fit_windows, score_windows, reductions: Sequence[float], *, options: FitOptions,
           reach: int = 3, validation=None, progress: bool = False) -> SearchResult:
    """Measure every candidate pair, then the best plan per reduction (see the module docstring).

    ``src``: the loaded source (echo_mlx.io.sources.SourceModel); ``teacher``: its unshared model."""
    from tqdm import tqdm

    from .analyze import kv_layers
    from ..conversion.convert import shared_model
    from .evaluate import perplexity

    L = src.config["num_hidden_layers"]
    if reach < 1:
        raise EchoError(f"--reach {reach} must be at least 1 (how many layers below a consumer its producer may be)")
    targets = {R: kv_layers(L, R) for R in reductions}  # raises for impossible reductions
    pairs = [(i, p) for i in range(1, L) for p in range(max(0, i - reach), i)]
    for R, n in targets.items():  # reachability does not depend on the damage: refuse before measuring it
        if best_plan(dict.fromkeys(pairs, 0.0), L, n, reach) is None:
            raise EchoError(
                f"--target-reduction {R:g} needs {L - n} consumers, more than producers within --reach {reach} "
                f"allow: raise --reach or lower the reduction"
            )
    tic = time.perf_counter()
    bar = tqdm(total=len(pairs) + 2, desc="search", unit="step", disable=not progress, leave=False)
    fit_cal = Calibration(teacher, fit_windows, options.batch)
    bar.update(1)
    score_cal = Calibration(teacher, score_windows, options.batch)
    reference = reference_logprobs(score_cal)
    bar.update(1)

    damage, fitted = {}, {}
    for i, p in pairs:
        sources = list(range(L))
        sources[i] = p
        student, _ = shared_model(src.config, src.weights, SharingPlan.parse("_".join(map(str, sources)), L))
        fit_layer(student, fit_cal, i, options)
        damage[(i, p)] = kl_from(student, score_cal, reference, i)
        fitted[(i, p)] = layer_weights(student, i)
        bar.update(1)
    bar.close()

    result = SearchResult(L, reach, damage, settings={"fit": dict(options.__dict__, parts=list(options.parts)),
                                                       "fit_tokens": fit_cal.tokens, "score_tokens": score_cal.tokens})
    for R, n in targets.items():
        sources = best_plan(damage, L, n, reach)
        plan = SharingPlan.parse("_".join(map(str, sources)), L)
        student, _ = shared_model(src.config, src.weights, plan)
        naive = perplexity(student, validation) if validation else None
        student.load_weights([kv for i, p in enumerate(sources) if p != i for kv in fitted[(i, p)].items()], strict=False)
        consumers = [i for i, p in enumerate(sources) if p != i]
        row = {
            "target_reduction": R, "plan": str(plan), "kv_reduction": plan.kv_reduction,
            "predicted_kl": sum(damage[(i, sources[i])] for i in consumers),
            "kl": kl_from(student, score_cal, reference, min(consumers)) if consumers else 0.0,
        }
        if validation:
            row.update(naive_ppl=naive, fitted_ppl=perplexity(student, validation))
        result.plans.append(row)
    result.minutes = (time.perf_counter() - tic) / 60
    return result



# ---- the command ---------------------------------------------------------------------------------
def run(model: str = "default", *, reductions: Sequence[float] = (1.25, 1.5, 2.0), reach: int = 3,
        calibration: Optional[str] = None, calibration_tokens: int = 4096, score_tokens: int = 2048,
        window: int = 512, options: Optional[FitOptions] = None, progress: bool = False) -> SearchResult:
    """``echo-mlx analyze --search``: the source loaded once, the fit and scoring windows cut from
    the calibration text (consecutive, scoring after fitting), the frontier on validation text."""
    from ..io import checkpoint
    from ..datasets import corpus
    from .analyze import check_target_reduction
    from ..conversion.convert import unshared_model
    from .evaluate import perplexity
    from ..conversion.fit import calibration as calibration_windows
    from ..io.sources import load_source

    for R in reductions:
        check_target_reduction(R)
    if checkpoint.is_echo_checkpoint(model):
        raise EchoError(f"{model} is an echo checkpoint: search plans on the original model it was converted from (its config.json echo.source)")
    fit_count, score_count = max(1, calibration_tokens // window), max(1, score_tokens // window)
    options = replace(options or FitOptions(), tokens=(fit_count + score_count) * window, window=window).checked()
    src = load_source(model, dtype="float32")
    L = src.config["num_hidden_layers"]
    from .analyze import kv_layers

    for R in reductions:
        kv_layers(L, R)
    windows, described = calibration_windows(src.tokenizer, calibration, options)
    validation = corpus.validation_windows(src.tokenizer)
    teacher = unshared_model(src)
    result = search(src, teacher, windows[:fit_count], windows[fit_count:], reductions, reach=reach,
                    options=replace(options, tokens=fit_count * window), validation=validation,
                    progress=progress)
    result.settings.update(model=model, source=src.source, calibration=described,
                           validation=f"built-in corpus validation part: {len(validation)} windows of {len(validation[0]) - 1} targets",
                           original_ppl=perplexity(teacher, validation))
    return result


def plot_frontier(result: SearchResult, path):
    """KV reduction against validation perplexity (log): naive and fitted per searched plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result.plans, key=lambda r: r["kv_reduction"])
    x = [r["kv_reduction"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, [r["naive_ppl"] for r in rows], "o--", color="0.6", label="naive conversion")
    ax.plot(x, [r["fitted_ppl"] for r in rows], "o-", color="tab:blue", label="fitted (--kv-init fit)")
    for r in rows:
        ax.annotate(f"{r['fitted_ppl']:.1f}", (r["kv_reduction"], r["fitted_ppl"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    original = result.settings.get("original_ppl")
    if original:
        ax.axhline(original, color="k", lw=1, label=f"original {original:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache reduction (x)")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title("searched plans: KV reduction vs perplexity", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
