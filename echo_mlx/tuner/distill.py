"""Knowledge-distillation loss for adapting a converted model to its original.

loss = alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE(student, targets)

averaged over the positions where ``mask`` is 1. ``*_tau`` are the softmaxes
of logits / tau; the tau^2 factor keeps gradient magnitudes comparable across
temperatures (Hinton et al.). The teacher is the unshared model the checkpoint
was converted from; its logits carry no gradient. With no teacher the loss
is the cross-entropy alone.

Written for speed on CPU, where an exp over the 49k-entry vocabulary costs
more than the model's matmuls (MLX's CPU exp runs at ~30 ns/element). With
p = softmax(t/tau) and lse = logsumexp,

    KL(p || softmax(s/tau)) = lse(s/tau) - sum(p * s/tau) + [sum(p * t/tau) - lse(t/tau)]

The bracket is the teacher's, computed once without gradient; the student
needs one logsumexp (shared with the cross-entropy when tau = 1), and its
backward one softmax: three passes over the logits instead of mlx-lm's
kl_div_loss + cross_entropy (about 2x faster, same values to float rounding).
"""

import mlx.core as mx

from ..errors import EchoError


def distillation_loss(student_logits, teacher_logits, targets, mask, *, alpha: float = 0.5, temperature: float = 1.0,
                      teacher_stats=None, teacher_top_k=None):
    """Mean KD loss over masked positions, and the number of positions.
    ``teacher_stats``: teacher_statistics(teacher_logits, temperature), if already computed;
    ``teacher_top_k``: top_k_statistics(...) instead (a cached teacher: the KL is sparse_kl's)."""
    if not 0.0 <= alpha <= 1.0:
        raise EchoError(f"--kd-alpha {alpha} is outside [0, 1]: 1 = distillation only, 0 = cross-entropy only")
    if temperature <= 0:
        raise EchoError(f"--kd-temperature {temperature} must be positive, e.g. 1.0 or 2.0")
    mask = mask.astype(mx.float32)
    count = mask.sum()
    s = student_logits.astype(mx.float32)
    if teacher_logits is None and teacher_stats is None and teacher_top_k is None:  # no teacher: cross-entropy
        alpha = 0.0
    per_position = 0.0
    lse_s = None
    if alpha < 1.0:
        lse_s = mx.logsumexp(s, axis=-1)
        target_logit = mx.take_along_axis(s, targets[..., None], axis=-1)[..., 0]
        per_position = (1 - alpha) * (lse_s - target_logit)
    if alpha > 0.0 and teacher_top_k is not None:
        kl = sparse_kl(s, *teacher_top_k, temperature=temperature)
        per_position = per_position + alpha * temperature**2 * kl
    elif alpha > 0.0:
        p, teacher_term = teacher_stats or teacher_statistics(teacher_logits, temperature)
        s_tau = s / temperature
        lse_s_tau = lse_s if temperature == 1.0 and lse_s is not None else mx.logsumexp(s_tau, axis=-1)
        kl = lse_s_tau - (p * s_tau).sum(-1) + teacher_term
        per_position = per_position + alpha * temperature**2 * kl
    return (per_position * mask).sum() / mx.maximum(count, 1), count


def teacher_statistics(teacher_logits, temperature: float = 1.0):
    """(softmax(t/tau), sum(p * t/tau) - lse(t/tau)), with a single exp pass."""
    t = mx.stop_gradient(teacher_logits.astype(mx.float32)) / temperature
    shifted = t - t.max(axis=-1, keepdims=True)
    e = mx.exp(shifted)
    total = e.sum(axis=-1, keepdims=True)
    p = e / total
    return mx.stop_gradient(p), mx.stop_gradient((p * shifted).sum(-1) - mx.log(total[..., 0]))


# ---- the teacher's distribution kept sparse (echo_mlx.tuner.teacher_cache) -------------
def top_k_statistics(teacher_logits, temperature: float = 1.0, k: int = 64):
    """The teacher's distribution at temperature tau, kept as its k likeliest tokens:
    (token ids (..., k) int32, their log-probabilities (..., k), the rest's probability (...))."""
    t = mx.stop_gradient(teacher_logits.astype(mx.float32)) / temperature
    vocab = t.shape[-1]
    k = min(k, vocab)
    ids = mx.argpartition(-t, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    log_p = mx.take_along_axis(t, ids, axis=-1) - mx.logsumexp(t, axis=-1, keepdims=True)
    # Exactly 0 when every token is kept: rounding must not invent mass in an empty bucket.
    tail = mx.maximum(1.0 - mx.exp(log_p).sum(-1), 0.0) if k < vocab else mx.zeros(log_p.shape[:-1])
    return ids, log_p, tail


def sparse_kl(student_logits, ids, log_p, tail, temperature: float = 1.0):
    """KL between the teacher's and the student's distributions coarsened to k + 1 outcomes:
    the teacher's k likeliest tokens, and "any other token". By the data-processing
    inequality it is at most the full KL, and equals it when the other tokens carry no
    teacher mass (k = the vocabulary).

    One exp pass over the student's logits gives both its normaliser and its "other"
    mass (total minus the head's), floored at 1e-7 of the total where float32 cannot
    resolve it (a student that sure of its head gets the gradient towards more tail)."""
    s = student_logits.astype(mx.float32) / temperature
    top = mx.stop_gradient(s.max(axis=-1, keepdims=True))
    e = mx.exp(s - top)
    total = e.sum(-1)
    log_total = mx.log(total)
    log_q = mx.take_along_axis(s - top, ids, axis=-1) - log_total[..., None]
    head = (mx.exp(log_p) * (log_p - log_q)).sum(-1)
    others = mx.maximum(total - mx.take_along_axis(e, ids, axis=-1).sum(-1), 1e-7 * total)
    log_q_tail = mx.log(others) - log_total
    log_p_tail = mx.log(mx.maximum(tail, 1e-30))
    return head + tail * (log_p_tail - log_q_tail)
