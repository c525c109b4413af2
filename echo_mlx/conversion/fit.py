"""Calibrated conversion (``--kv-init fit``): closed-form repair of what a plan changes.

A naive conversion hands consumer layer i the K/V of producer p, which live
in p's basis, not i's: most of the damage is that change of basis, and
least squares on the original model's activations repairs most of it before
any training. Everything is fitted from the *teacher's* residual stream
(every layer reads the original model's input to that layer and its
producer's K/V projected from the original stream at p), so layers are
fitted independently; the issue's measurements found this better than
fitting each layer on the converted model's own, already damaged stream.

For a K/V consumer i reading producer p:

1. **Keys** (folded into i's q_proj). RoPE rotates every frequency pair of a
   head by the same angle in q and k, so the only linear maps on keys that
   commute with it are one complex scale per head and frequency pair. With
   k_i ~ c * k_p fitted by least squares (pre-RoPE keys suffice: both sides
   rotate alike), q . k_i = (q * conj(c)) . k_p, so the consumer's query rows
   absorb conj(c) exactly. Minimising the score error over any query map
   that is free per token leads to the same c, so nothing more general helps.
2. **Head matching** (a permutation of i's query heads, q_proj rows and
   o_proj columns alike). Query head h of i normally reads kv head h // G of
   the producer; any assignment with G query heads per producer kv head is
   an exact re-parametrisation. We score every (query head, producer kv head)
   pair by how well the teacher's head output can be linearly predicted
   from the student's (ridge residual), and pick the cheapest assignment.
3. **o_proj re-solve**: with i's new queries over p's K/V (or, for EchoAtt,
   p's probabilities over i's own V), the per-head outputs are the features
   and the teacher's attention-block output is the target of one ridge
   regression; it subsumes any per-head value map (P (V B) = (P V) B).
   Without it, ``values`` folds a per-head output map B into o_proj instead.
   ``producer_queries`` adds the producer's own query heads to the candidates
   (their rows re-expressed for i's input norm, exactly): where a teacher head's
   output is better predicted through the pattern p itself attends with, that
   slot takes p's query rows. Most of a consumer's error is its attention
   *pattern*, not the values it reads (measured: the teacher's own pattern over
   p's values leaves about half the o_proj residual).
   ``refine`` then takes a few Adam epochs on i's q_proj and o_proj against the
   teacher's attention-block output (teacher-forced, one layer at a time: cheap),
   the one nonlinear step, through the softmax, that least squares cannot make.
4. **down_proj re-solve** (``mlp``): the layer's MLP down-projection refitted
   so that the whole layer, fed the teacher's input, outputs the teacher's
   next residual state.
5. **correct** (opt-in, after every layer is fitted): one pass of the
   converted model over the calibration windows, layer by layer from the first
   changed one, re-solving each layer's down_proj on the model's *own* stream
   towards the teacher's next residual state, shrunk towards the fitted
   weights. The teacher-forced fits cannot see that errors compound; this lets
   every later layer (shared or not) undo part of the drift it receives.

Ridge strengths are relative: lambda = ridge * mean(diag(X^T X)), so one
value fits features of any scale. Everything is float64 sums over fixed
calibration windows in a fixed order: the same inputs give the same weights.
"""

import itertools
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import EchoError
from ..models.model import cyclic_blocks

PARTS = ("keys", "heads", "producer_queries", "values", "refine", "o_proj", "mlp", "correct")
DEFAULT_PARTS = ("keys", "heads", "producer_queries", "o_proj", "mlp")


@dataclass(frozen=True)
class FitOptions:
    tokens: int = 24576  # calibration tokens (whole windows)
    window: int = 512  # tokens per calibration window
    # Ridge 3e-2 shrinking towards the original's weights measured closer to the original than 1e-3 towards 0 on
    # validation text at 1.2x, 1.5x and 2x, most on text of another domain (benchmarks/candidates/fit-default-screen.log).
    ridge: float = 3e-2  # relative ridge strength for the o_proj / value / down_proj solves
    parts: Tuple[str, ...] = DEFAULT_PARTS
    prior: bool = True  # shrink re-solved matrices towards the original's instead of towards 0
    batch: int = 4  # windows per forward pass
    refine_epochs: int = 4  # ``refine``: Adam epochs over the calibration windows per consumer
    refine_lr: float = 3e-4  # ``refine``: Adam learning rate
    correct_ridge: float = 1e-2  # ``correct``: relative ridge, shrinking towards the fitted down_proj

    def checked(self) -> "FitOptions":
        if not (isinstance(self.ridge, (int, float)) and np.isfinite(self.ridge) and self.ridge > 0):
            raise EchoError(f"--ridge {self.ridge!r} must be a positive number, e.g. 1e-3")
        if self.window < 2:
            raise EchoError(f"--calibration-window {self.window} is too small: use e.g. 512")
        if self.tokens < self.window:
            raise EchoError(f"--calibration-tokens {self.tokens} is less than one window of {self.window}: use e.g. 24576")
        if "refine" in self.parts and not (isinstance(self.refine_epochs, int) and self.refine_epochs >= 1):
            raise EchoError(f"--refine-epochs {self.refine_epochs!r} must be a whole number of at least 1 with fit part refine")
        if "refine" in self.parts and not (np.isfinite(self.refine_lr) and self.refine_lr > 0):
            raise EchoError(f"refine learning rate {self.refine_lr!r} must be a positive number, e.g. 1e-4")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise EchoError(f"unknown fit part(s) {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
        return self

    @property
    def num_windows(self) -> int:
        return self.tokens // self.window


@dataclass
class FitReport:
    """What the fit did, for the checkpoint's provenance (config.json echo.fit)."""

    calibration: str
    options: dict
    layers: Dict[int, dict] = field(default_factory=dict)  # per fitted layer: assignment, residuals

    def to_json(self) -> dict:
        return {"calibration": self.calibration, **self.options, "layers": {str(k): v for k, v in self.layers.items()}}


# ---- calibration text ----------------------------------------------------------
def calibration(tokenizer, path: Optional[str], options: FitOptions):
    """(windows, description): ``options.num_windows`` consecutive windows from a UTF-8
    file, or from the built-in training data (``None`` or ``"builtin"``: the corpus's
    training part, the chat set's training conversations and the general set's training
    samples, taking turns, so the fit sees the documentation, the chat behaviour and
    everyday text the model must keep; ``"corpus"``, ``"chat"``, ``"general"`` or a
    ``+``-joined choice of them such as ``"corpus+chat"``)."""
    from ..datasets import BUILTIN_SETS, chat, corpus, general

    which = "builtin" if path is None else str(path)
    keywords = which.split("+")
    if all(k in BUILTIN_SETS for k in keywords):  # anything else is a file
        chosen = {"corpus", "chat", "general"} if "builtin" in keywords else set(keywords)
        sources = []
        if "corpus" in chosen:
            sources.append(("the corpus training part", corpus.windows(corpus.training_segments(tokenizer), options.window)))
        if "chat" in chosen and chat.usable(tokenizer):
            sources.append(("the chat set training split", corpus.windows([chat.packed(tokenizer, "train")], options.window)))
        if "general" in chosen and general.available():
            sources.append(("the general set training split", corpus.windows([general.packed(tokenizer, "train")], options.window)))
        if not sources:
            raise EchoError(f"--calibration {which} is not available with this tokenizer: use --calibration corpus or a text file")
        found = _alternate(*[w for _, w in sources])
        names = [name for name, _ in sources]
        what = f"the built-in training data ({', '.join(names)}{', taking turns' if len(names) > 1 else ''})"
        have = sum(len(w) for w in found)
    else:
        tokens = tokenizer.encode(corpus.read_text_file(path, "--calibration"), add_special_tokens=False)
        found = corpus.windows([tokens], options.window)
        what, have = f"calibration file {path}", len(tokens)
    n = options.num_windows
    if len(found) < n:
        raise EchoError(
            f"{what} has {have:,} tokens; the fit needs {n * options.window:,} ({n} windows of "
            f"{options.window}): give a longer --calibration file or lower --calibration-tokens"
        )
    return found[:n], f"{what}: {n} windows of {options.window} tokens"


def _alternate(*lists: list) -> list:
    """a[0], b[0], c[0], a[1], b[1], ...: one from each list in turn, skipping lists that ran out."""
    longest = max((len(x) for x in lists), default=0)
    return [x[k] for k in range(longest) for x in lists if k < len(x)]


# ---- the teacher's stream ---------------------------------------------------------
def teacher_stream(teacher, windows, batch: int, progress=None) -> List[mx.array]:
    """The residual stream entering every layer and leaving the last: L + 1 arrays (N, T, D)."""
    chunks = []
    for b in range(0, len(windows), batch):
        inputs = mx.array(windows[b : b + batch])
        h = teacher.model.embed_tokens(inputs)
        masks = teacher.model._masks(h, {})
        states, kv = [h], {}
        for layer in teacher.model.layers:
            h = layer(h, masks[layer.use_sliding], None, kv, 0)
            states.append(h)
        mx.eval(states)
        chunks.append(states)
        if progress:
            progress.update(1)
    return [mx.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


# ---- small linear-algebra helpers ----------------------------------------------
class Gram:
    """Running sums X^T X, X^T Y and |Y|^2 for ridge regressions Y ~ X W, float64.

    Inputs are (..., N, d): leading axes are independent regressions (one per
    head, say). The products run in MLX (its BLAS); only the d x d sums are
    accumulated in float64."""

    def __init__(self):
        self.xx = self.xy = self.yy = None

    def add(self, x: mx.array, y: mx.array):
        if x.dtype not in (mx.float32, mx.float64):
            x, y = x.astype(mx.float32), y.astype(mx.float32)
        xt = x.swapaxes(-1, -2)
        sums = (xt @ x, xt @ y, (y * y).sum(axis=(-2, -1)))
        mx.eval(sums)
        xx, xy, yy = (_numpy64(a) for a in sums)
        if self.xx is None:
            self.xx, self.xy, self.yy = xx, xy, yy
        else:
            self.xx += xx
            self.xy += xy
            self.yy += yy

    def solve(self, ridge: float, prior: Optional[np.ndarray] = None) -> np.ndarray:
        """argmin |X W - Y|^2 + lam |W - prior|^2, lam = ridge * mean(diag(X^T X)) (prior 0 by default)."""
        d = self.xx.shape[-1]
        lam = (ridge * np.trace(self.xx, axis1=-2, axis2=-1) / d)[..., None, None]
        rhs = self.xy if prior is None else self.xy + lam * prior
        return np.linalg.solve(self.xx + lam * np.eye(d), rhs)

    def residual(self, ridge: float, prior: Optional[np.ndarray] = None):
        """Unexplained fraction of Y's energy after the ridge fit (one per leading index)."""
        w = self.solve(ridge, prior)
        explained = 2 * np.sum(w * self.xy, axis=(-2, -1)) - np.sum(w * (self.xx @ w), axis=(-2, -1))
        return (self.yy - explained) / np.maximum(self.yy, 1e-30)


def rope_pairs(head_dim: int, traditional: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (real, imaginary) of the dimension pairs RoPE rotates together."""
    if traditional:
        return np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)
    half = head_dim // 2
    return np.arange(half), np.arange(half, head_dim)


def _numpy64(a: mx.array) -> np.ndarray:
    return np.asarray(a if a.dtype in (mx.float32, mx.float64) else a.astype(mx.float32), dtype=np.float64)


def complex_keys(keys: mx.array, pairs) -> np.ndarray:
    """(..., D) real keys -> (..., D/2) complex, one entry per RoPE frequency pair."""
    k = _numpy64(keys)
    return k[..., pairs[0]] + 1j * k[..., pairs[1]]


def fold_complex_scale(w_q: np.ndarray, scale: np.ndarray, pairs) -> np.ndarray:
    """q_proj rows of one head (D, d_in) -> rows producing q * conj(scale) per pair."""
    re, im = pairs
    a, b = w_q[re], w_q[im]
    out = np.empty_like(w_q)
    out[re] = scale.real[:, None] * a + scale.imag[:, None] * b
    out[im] = scale.real[:, None] * b - scale.imag[:, None] * a
    return out


def assign_heads(cost: np.ndarray, per_group: int) -> List[int]:
    """Producer kv head for each query head: min total cost, ``per_group`` query heads each.

    Exhaustive for small head counts (SmolLM2: 1,680 assignments), else the
    Hungarian algorithm on the cost matrix with each kv head repeated."""
    n_q, n_kv = cost.shape
    slots = np.repeat(np.arange(n_kv), per_group)
    if n_kv == 1:
        return [0] * n_q
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # scipy is optional: exhaustive search, fine for small models
        linear_sum_assignment = None
    if linear_sum_assignment is not None:
        rows, cols = linear_sum_assignment(cost[:, slots])
        out = [0] * n_q
        for r, c in zip(rows, cols):
            out[r] = int(slots[c])
        return out
    best, best_cost = None, np.inf
    for perm in set(itertools.permutations(slots.tolist())):
        c = cost[np.arange(n_q), perm].sum()
        if c < best_cost:
            best, best_cost = list(perm), c
    return best


def _per_head(a: mx.array) -> mx.array:
    """(B, H, T, D) -> (H, B*T, D): one regression per head over every token."""
    return a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1, a.shape[-1])


def parse_parts(text: Optional[str]) -> Tuple[str, ...]:
    """``--fit-parts`` as given ("keys,heads,..."); None or empty: the default parts."""
    parts = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    return parts or DEFAULT_PARTS


def _like(values: np.ndarray, weight: mx.array) -> mx.array:
    """A fitted float64 solution as a weight of ``weight``'s dtype."""
    return mx.array(values, dtype=mx.float64).astype(weight.dtype)


# ---- the fit -------------------------------------------------------------------------
class _Identity(nn.Module):
    def __call__(self, x):
        return x


def _head_outputs(attn, x, mask, kv):
    """A layer's attention output before o_proj, through the model's own code path."""
    o_proj = attn.o_proj
    attn.o_proj = _Identity()
    try:
        return attn(x, mask, None, kv, 0)
    finally:
        attn.o_proj = o_proj


class Calibration:
    """The teacher's residual stream over calibration windows, and the
    teacher-forced inputs any student layer reads from it."""

    def __init__(self, teacher, windows, batch: int = 4, progress=None):
        self.teacher, self.batch = teacher, batch
        self.states = teacher_stream(teacher, windows, batch, progress)
        self.masks = teacher.model._masks(self.states[0][:1], {})

    @property
    def tokens(self) -> int:
        return self.states[0].shape[0] * self.states[0].shape[1]

    def chunks(self):
        n = self.states[0].shape[0]
        return [slice(b, min(b + self.batch, n)) for b in range(0, n, self.batch)]

    def mask(self, model, i):
        return self.masks[model.layers[i].use_sliding]

    def x(self, model, i, rows):
        """Layer i's normalised input (its input_layernorm is never changed by a plan or a fit)."""
        return model.layers[i].input_layernorm(self.states[i][rows])

    def kv_for(self, model, i, rows) -> dict:
        """The K/V (and EchoAtt queries/keys) layer i of ``model`` reads, from the teacher's stream."""
        kv, args = {}, model.args
        needed = {args.kv_sources[i], args.attention_sources[i]} - {i}
        # An EchoAtt source that itself reads another producer needs that producer first.
        needed |= {args.kv_sources[s] for s in needed}
        for j in sorted(needed, key=lambda j: (args.kv_sources[j] != j, j)):
            model.layers[j].self_attn(self.x(model, j, rows), self.mask(model, j), None, kv, 0)
        return kv


def fitted_layers(args) -> List[int]:
    """Layers a plan changes the attention of: K/V consumers and EchoAtt layers."""
    return [i for i in range(args.num_hidden_layers) if args.kv_sources[i] != i or args.attention_sources[i] != i]


def fit_layer(student, cal: Calibration, i: int, options: FitOptions) -> dict:
    """Fit layer i of ``student`` in place (its other layers are not touched)."""
    info = {}
    consumer = student.args.kv_sources[i] != i
    if consumer and ("keys" in options.parts or "heads" in options.parts):
        info.update(_fit_queries(student, cal, i, options))
    if consumer and "refine" in options.parts and "q_proj" in student.layers[i].self_attn:
        if "o_proj" in options.parts:  # refine from the best o_proj for the fitted queries
            _fit_o_proj(student, cal, i, options)
        info.update(refine_attention(student, cal, i, options))
    if "o_proj" in options.parts:
        info["o_proj_residual"] = _fit_o_proj(student, cal, i, options)
    if "mlp" in options.parts:
        info["down_proj_residual"] = _fit_down_proj(student, cal, i, options)
    mx.eval(student.layers[i].parameters())
    return info


def fit_model(student, teacher, windows, options: FitOptions, calibration: str, progress: bool = False,
              cal: Optional[Calibration] = None) -> FitReport:
    """Fit every layer the plan of ``student`` (a naive conversion) changed, in place, on ``windows``
    (or on ``cal``, the teacher's stream over them, when several plans share one calibration)."""
    from tqdm import tqdm

    options = options.checked()
    targets = fitted_layers(student.args)
    if "correct" in options.parts and cyclic_blocks(student.args.kv_sources):
        raise EchoError("fit part correct runs the model layer by layer, so its consumers must read K/V from "
                        "layers below them: drop correct for this plan")
    report = FitReport(calibration, dict(asdict(options), parts=list(options.parts)))
    if not targets:
        return report
    chunks = -(-len(windows) // options.batch) if cal is None else 0
    corrected = student.args.num_hidden_layers - targets[0] if "correct" in options.parts else 0
    bar = tqdm(total=chunks + len(targets) + corrected, desc="fit", unit="step", disable=not progress, leave=False)
    cal = cal or Calibration(teacher, windows, options.batch, bar)
    for i in targets:
        report.layers[i] = fit_layer(student, cal, i, options)
        bar.update(1)
    if "correct" in options.parts:
        for j, residual in correct_stream(student, cal, options, bar).items():
            report.layers.setdefault(j, {})["corrected_down_proj_residual"] = residual
    bar.close()
    return report


def _teacher_heads(cal: Calibration, i, rows):
    """The teacher's per-head attention outputs (B, H, T, D) for layer i."""
    t = cal.teacher
    x = cal.x(t, i, rows)
    attn = t.layers[i].self_attn
    out = _head_outputs(attn, x, cal.mask(t, i), {})
    return out.reshape(x.shape[0], x.shape[1], attn.n_heads, -1).transpose(0, 2, 1, 3)


def _teacher_attention(cal: Calibration, i, rows):
    """The teacher's attention-block output for layer i: what o_proj must reproduce."""
    t = cal.teacher
    return t.layers[i].self_attn(cal.x(t, i, rows), cal.mask(t, i), None, {}, 0)


def _student_heads(student, cal: Calibration, i, rows):
    attn = student.layers[i].self_attn
    x = cal.x(student, i, rows)
    out = _head_outputs(attn, x, cal.mask(student, i), cal.kv_for(student, i, rows))
    return out.reshape(x.shape[0], x.shape[1], attn.n_heads, -1).transpose(0, 2, 1, 3)


def key_scales(student, cal: Calibration, i: int) -> np.ndarray:
    """Least-squares complex scales c with k_i ~ c * k_p, per (layer i's kv head, its
    producer's kv head, RoPE pair): pre-RoPE keys suffice, RoPE turns both alike."""
    t_attn = cal.teacher.layers[i].self_attn
    attn = student.layers[i].self_attn
    n_kv, D = attn.n_kv_heads, attn.head_dim
    pairs = rope_pairs(D, getattr(attn.rope, "traditional", False))
    p_attn = student.layers[attn.kv_source].self_attn
    cross = np.zeros((n_kv, n_kv, D // 2), complex)
    power = np.zeros((n_kv, D // 2))
    for rows in cal.chunks():
        x_i = cal.x(cal.teacher, i, rows)
        k_i = t_attn.k_proj(x_i).reshape(*x_i.shape[:2], n_kv, D)
        k_p = p_attn.k_proj(cal.x(student, attn.kv_source, rows)).reshape(*x_i.shape[:2], n_kv, D)
        ci, cp = complex_keys(k_i, pairs), complex_keys(k_p, pairs)
        cross += np.einsum("tsbf,tsaf->abf", np.conj(cp), ci)
        power += (np.abs(cp) ** 2).sum(axis=(0, 1))
    return cross / np.maximum(power[None], 1e-30)


def _fit_queries(student, cal: Calibration, i, options: FitOptions) -> dict:
    """Steps 1 and 2: complex key scales into q_proj, then query heads matched to producer kv heads."""
    teacher = cal.teacher
    attn, t_attn = student.layers[i].self_attn, teacher.layers[i].self_attn
    if "bias" in t_attn.q_proj:
        raise EchoError("--kv-init fit does not support attention biases yet: use --kv-init own or mean")
    n_q, n_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    G = n_q // n_kv
    pairs = rope_pairs(D, getattr(attn.rope, "traditional", False))
    if "keys" in options.parts:
        scale = key_scales(student, cal, i)  # (consumer kv head, producer kv head, pair)
    else:
        scale = np.ones((n_kv, n_kv, D // 2), complex)

    w_q = _numpy64(t_attn.q_proj.weight).reshape(n_q, D, -1)
    candidate_rows = {(h, b): fold_complex_scale(w_q[h], scale[h // G, b], pairs) for h in range(n_q) for b in range(n_kv)}
    identity = [h // G for h in range(n_q)]
    cost, assignment, from_producer = None, identity, set()
    if "heads" in options.parts:
        producer_rows = None
        if "producer_queries" in options.parts and "q_proj" in student.layers[attn.kv_source].self_attn:
            producer_rows = producer_query_rows(student, i)
        cost, producer_cost = _pair_costs(student, cal, i, candidate_rows, options, producer_rows)
        if producer_rows is not None:
            cost, candidate_rows, from_producer = _with_producer_queries(cost, producer_cost, candidate_rows, producer_rows)
        assignment = assign_heads(cost, G)
    # Slot j of producer kv head b gets the query heads assigned to b, in order.
    order = [h for b in range(n_kv) for h in range(n_q) if assignment[h] == b]
    rows = np.concatenate([candidate_rows[(h, assignment[h])] for h in order])
    attn.q_proj.weight = _like(rows, t_attn.q_proj.weight)
    o = t_attn.o_proj.weight.reshape(-1, n_q, D)
    attn.o_proj.weight = o[:, mx.array(order)].reshape(o.shape[0], -1)
    if "values" in options.parts and "o_proj" not in options.parts:
        maps = value_maps(student, cal, i, order, options.ridge)
        attn.o_proj.weight = _like(fold_value_maps(_numpy64(t_attn.o_proj.weight), order, maps), t_attn.o_proj.weight)
    info = {"head_order": order}
    if "producer_queries" in options.parts:
        info["producer_query_heads"] = sum((h, assignment[h]) in from_producer for h in range(n_q))
    if cost is not None:
        info["head_cost"] = float(cost[np.arange(n_q), assignment].mean())
        info["head_cost_default"] = float(cost[np.arange(n_q), identity].mean())
    return info


def _pair_costs(student, cal: Calibration, i, candidate_rows, options, producer_rows=None):
    """cost[h, b]: unexplained fraction of the teacher's head h output when query head h
    (with its fitted scale) reads producer kv head b, after a per-head ridge map. With the
    producer's query rows (H, D, d_in), also producer_cost[h, h']: the same residual when the
    producer's query head h' stands in for h (None without them). One pass over the
    calibration chunks serves both: the producer's K/V and the teacher's heads are computed once."""
    attn = student.layers[i].self_attn
    n_q, n_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    grams = [Gram() for _ in range(n_kv)]  # per producer kv head: one regression per query head
    w = {b: _like(np.concatenate([candidate_rows[(h, b)] for h in range(n_q)]), attn.q_proj.weight) for b in range(n_kv)}
    if producer_rows is not None:
        producer_gram = Gram()  # leading axes (producer head h', teacher head h)
        w_producer = _like(producer_rows.reshape(n_q * D, -1), attn.q_proj.weight)
    earlier_only = attn.kv_source > i
    for rows in cal.chunks():
        keys, values, _ = cal.kv_for(student, i, rows)[attn.kv_source]
        x = cal.x(student, i, rows)
        mask = cal.mask(student, i)
        teacher_out = _per_head(_teacher_heads(cal, i, rows))
        for b in range(n_kv):
            out = attn._attend(_queries(attn, x, w[b]), keys[:, b : b + 1], values[:, b : b + 1], None, mask, 0, earlier_only)
            grams[b].add(_per_head(out), teacher_out)
        if producer_rows is not None:
            out = _per_head(attn._attend(_queries(attn, x, w_producer), keys, values, None, mask, 0, earlier_only))
            shape = (n_q, n_q) + out.shape[1:]
            producer_gram.add(mx.broadcast_to(out[:, None], shape), mx.broadcast_to(teacher_out[None], shape))
    cost = np.stack([g.residual(options.ridge) for g in grams], axis=1)
    return cost, (producer_gram.residual(options.ridge).T if producer_rows is not None else None)


def _queries(attn, x, w) -> mx.array:
    """Query heads (B, H, T, D) of q_proj rows ``w`` on input x, after RoPE from position 0."""
    B, T, _ = x.shape
    return attn.rope((x @ w.T).reshape(B, T, attn.n_heads, attn.head_dim).transpose(0, 2, 1, 3), offset=0)


def producer_query_rows(student, i) -> np.ndarray:
    """The producer's q_proj rows (H, D, d_in) acting on layer i's normalised input: RMSNorm's gains
    differ per layer, so columns are scaled by g_p / g_i, exactly (q_p(x_p-norm) = W (g_p * x / rms))."""
    p = student.args.kv_sources[i]
    attn = student.layers[i].self_attn
    gain = _numpy64(student.layers[p].input_layernorm.weight) / _numpy64(student.layers[i].input_layernorm.weight)
    w = _numpy64(student.layers[p].self_attn.q_proj.weight) * gain[None]
    return w.reshape(attn.n_heads, attn.head_dim, -1)


def _with_producer_queries(cost, producer_cost, candidate_rows, producer_rows):
    """For each (teacher head h, producer kv head b), the better of i's fitted query h and the
    producer's query heads that read b (by _pair_costs' residuals); also the (h, b) pairs where
    the producer's won."""
    n_q, n_kv = cost.shape
    G = n_q // n_kv
    cost, candidate_rows, taken = cost.copy(), dict(candidate_rows), set()
    for h in range(n_q):
        for b in range(n_kv):
            best = b * G + int(np.argmin(producer_cost[h, b * G : (b + 1) * G]))
            if producer_cost[h, best] < cost[h, b]:
                cost[h, b] = producer_cost[h, best]
                candidate_rows[(h, b)] = producer_rows[best]
                taken.add((h, b))
    return cost, candidate_rows, taken


def refine_attention(student, cal: Calibration, i, options: FitOptions) -> dict:
    """Adam on layer i's q_proj and o_proj: its attention-block output, fed the teacher's input and
    its producer's K/V, against the teacher's, as squared error relative to the target's energy.
    Float32 whatever the model's dtype; a fixed order of windows, so it is deterministic."""
    import mlx.optimizers as optim

    attn = student.layers[i].self_attn
    dtype = attn.q_proj.weight.dtype
    data = []
    for rows in cal.chunks():
        k, v, _ = cal.kv_for(student, i, rows)[attn.kv_source]
        x, target = cal.x(student, i, rows), _teacher_attention(cal, i, rows)
        batch = tuple(a.astype(mx.float32) for a in (x, k, v, target))
        mx.eval(batch)
        data.append(batch)
    mask = cal.mask(student, i)
    energy = sum(float((t * t).mean()) for *_, t in data) / len(data)

    def loss_fn(module, x, k, v, target):
        out = module(x, mask, None, {attn.kv_source: (k, v, None)}, 0)
        return ((out - target) ** 2).mean() / energy

    attn.set_dtype(mx.float32)
    attn.freeze()
    attn.q_proj.unfreeze()
    attn.o_proj.unfreeze()
    step = nn.value_and_grad(attn, loss_fn)
    optimizer = optim.Adam(learning_rate=options.refine_lr)
    total = lambda: sum(float(loss_fn(attn, *b)) for b in data) / len(data)
    before = best = total()
    kept = attn.trainable_parameters()
    for _ in range(options.refine_epochs):
        for batch in data:
            _, grads = step(attn, *batch)
            optimizer.update(attn, grads)
            mx.eval(attn.parameters(), optimizer.state)
        loss = total()
        if loss < best:  # an epoch that overshoots is not kept: refine never ends worse than it began
            best, kept = loss, attn.trainable_parameters()
    attn.update(kept)
    attn.unfreeze()
    attn.set_dtype(dtype)
    return {"refine_loss": [before, best]}


def value_maps(student, cal: Calibration, i, order, ridge: float) -> List[np.ndarray]:
    """Per slot j, the ridge map B_j (D x D) with teacher head order[j]'s output ~ slot j's output @ B_j."""
    gram = Gram()
    for rows in cal.chunks():
        out, teacher_out = _student_heads(student, cal, i, rows), _teacher_heads(cal, i, rows)
        gram.add(_per_head(out), _per_head(teacher_out[:, mx.array(order)]))
    return list(gram.solve(ridge))


def fold_value_maps(w_o: np.ndarray, order, maps) -> np.ndarray:
    """o_proj (d, H*D) whose slot j reads head order[j]'s columns through map B_j:
    o_proj'(out) = o_proj(out_j @ B_j placed at head order[j]), exactly, since attention is linear in V."""
    d, H = w_o.shape[0], len(order)
    w = w_o.reshape(d, H, -1)
    return np.stack([w[:, h] @ maps[j].T for j, h in enumerate(order)], axis=1).reshape(d, -1)


def _fit_o_proj(student, cal: Calibration, i, options) -> float:
    """Step 3: o_proj <- ridge(the student's head outputs -> the teacher's attention-block output)."""
    attn = student.layers[i].self_attn
    gram = Gram()
    for rows in cal.chunks():
        x = cal.x(student, i, rows)
        features = _head_outputs(attn, x, cal.mask(student, i), cal.kv_for(student, i, rows))
        target = _teacher_attention(cal, i, rows)
        gram.add(features.reshape(-1, features.shape[-1]), target.reshape(-1, target.shape[-1]))
    # Shrunk towards the o_proj the layer has (the original's, heads in the fitted order), not towards 0.
    prior = _numpy64(attn.o_proj.weight).T if options.prior else None
    attn.o_proj.weight = _like(gram.solve(options.ridge, prior).T, attn.o_proj.weight)
    return float(gram.residual(options.ridge, prior))


def _fit_down_proj(student, cal: Calibration, i, options) -> float:
    """Step 4: down_proj <- ridge(MLP hidden features -> what the teacher's layer output still needs)."""
    layer = student.layers[i]
    gram = Gram()
    for rows in cal.chunks():
        gram.add(*_down_proj_problem(layer, cal.states[i][rows], cal.mask(student, i), cal.kv_for(student, i, rows),
                                     cal.states[i + 1][rows]))
    prior = _numpy64(layer.mlp.down_proj.weight).T if options.prior else None
    layer.mlp.down_proj.weight = _like(gram.solve(options.ridge, prior).T, layer.mlp.down_proj.weight)
    return float(gram.residual(options.ridge, prior))


def _down_proj_problem(layer, h, mask, kv, next_state):
    """(features, target) of a down_proj re-solve, one row per token: the MLP's hidden features for the
    layer's input ``h``, and what its down_proj must add for the layer to output ``next_state``."""
    from mlx_lm.models.activations import swiglu

    mid = h + layer.self_attn(layer.input_layernorm(h), mask, None, kv, 0)
    z = layer.post_attention_layernorm(mid)
    features = swiglu(layer.mlp.gate_proj(z), layer.mlp.up_proj(z))
    target = next_state - mid
    return features.reshape(-1, features.shape[-1]), target.reshape(-1, target.shape[-1])


def correct_stream(student, cal: Calibration, options: FitOptions, progress=None) -> Dict[int, float]:
    """Step 5: from the first changed layer on, each layer's down_proj re-solved on the student's own
    stream (ridge ``correct_ridge``, shrunk towards the fitted weights) so that the layer outputs the
    teacher's next residual state; the stream then moves on through the corrected layer. Returns the
    ridge residual per corrected layer."""
    args = student.args
    changed = fitted_layers(args)
    if not changed:
        return {}
    last_reader = _last_readers(args)
    chunks = cal.chunks()
    states = [cal.states[0][rows] for rows in chunks]  # embeddings: never changed by a plan
    kvs = [{} for _ in chunks]
    residuals = {}
    for j, layer in enumerate(student.layers):
        mask = cal.mask(student, j)
        if j >= changed[0]:  # below the first changed layer the stream is the teacher's
            gram = Gram()
            for c, rows in enumerate(chunks):  # a copy of the K/V: the pass below writes this layer's own
                gram.add(*_down_proj_problem(layer, states[c], mask, dict(kvs[c]), cal.states[j + 1][rows]))
            w = layer.mlp.down_proj.weight
            prior = _numpy64(w).T
            layer.mlp.down_proj.weight = _like(gram.solve(options.correct_ridge, prior).T, w)
            residuals[j] = float(gram.residual(options.correct_ridge, prior))
            if progress:
                progress.update(1)
        for c in range(len(chunks)):
            states[c] = layer(states[c], mask, None, kvs[c], 0)
            # What no later layer reads is dropped: K/V, and EchoAtt's probabilities, are big.
            for key in [k for k in kvs[c] if last_reader[k if isinstance(k, int) else k[1]] <= j]:
                del kvs[c][key]
            mx.eval(states[c], [v[:2] if isinstance(v, tuple) else v for v in kvs[c].values()])
    return residuals


def _last_readers(args) -> List[int]:
    """For each layer s, the last layer that reads its K/V or its attention (s itself if none)."""
    last = list(range(args.num_hidden_layers))
    for i in range(args.num_hidden_layers):
        for s in (args.kv_sources[i], args.attention_sources[i]):
            last[s] = max(last[s], i)
    return last
