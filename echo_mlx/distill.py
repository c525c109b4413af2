"""Knowledge-distillation loss for adapting a converted model to its original.

loss = alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE(student, targets)

averaged over the positions where ``mask`` is 1. ``*_tau`` are the softmaxes
of logits / tau; the tau^2 factor keeps gradient magnitudes comparable across
temperatures (Hinton et al.). The teacher is the unshared model the checkpoint
was converted from; its logits carry no gradient. With no teacher the loss
is the cross-entropy alone.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.losses import kl_div_loss

from .errors import EchoError


def distillation_loss(student_logits, teacher_logits, targets, mask, *, alpha: float = 0.5, temperature: float = 1.0):
    """Mean KD loss over masked positions, and the number of positions."""
    if not 0.0 <= alpha <= 1.0:
        raise EchoError(f"--kd-alpha {alpha} is outside [0, 1]: 1 = distillation only, 0 = cross-entropy only")
    if temperature <= 0:
        raise EchoError(f"--kd-temperature {temperature} must be positive, e.g. 1.0 or 2.0")
    mask = mask.astype(mx.float32)
    count = mask.sum()
    student = student_logits.astype(mx.float32)
    ce = nn.losses.cross_entropy(student, targets)
    if teacher_logits is None:  # no teacher: plain next-token cross-entropy
        per_position = ce
    else:
        teacher = mx.stop_gradient(teacher_logits.astype(mx.float32))
        kl = kl_div_loss(student / temperature, teacher / temperature) * temperature**2
        per_position = alpha * kl + (1 - alpha) * ce
    return (per_position * mask).sum() / mx.maximum(count, 1), count
