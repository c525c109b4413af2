import mlx.core as mx
import numpy as np
import pytest

from echo_mlx.errors import EchoError
from echo_mlx.tuner.distill import distillation_loss


def reference(student, teacher, targets, mask, alpha, tau):
    """float64 numpy: alpha*tau^2*KL(softmax(t/tau) || softmax(s/tau)) + (1-alpha)*CE, masked mean."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp_t, lp_s = log_softmax(teacher / tau), log_softmax(student / tau)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum(-1) * tau**2
    ce = -np.take_along_axis(log_softmax(student), targets[..., None], -1)[..., 0]
    return ((alpha * kl + (1 - alpha) * ce) * mask).sum() / mask.sum()


@pytest.mark.parametrize("alpha, tau", [(0.0, 1.0), (1.0, 1.0), (0.5, 2.0), (0.9, 4.0)])
def test_loss_and_gradient_match_a_direct_computation(alpha, tau):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (2, 5, 11)), rng.normal(0, 3, (2, 5, 11))
    targets = rng.integers(0, 11, (2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.float64)
    loss, count = distillation_loss(mx.array(student, dtype=mx.float32), mx.array(teacher, dtype=mx.float32),
                                    mx.array(targets), mx.array(mask), alpha=alpha, temperature=tau)
    assert count.item() == 8
    assert abs(loss.item() - reference(student, teacher, targets, mask, alpha, tau)) < 1e-4

    # Gradient w.r.t. the student logits against central finite differences of the float64 reference.
    grad = mx.grad(lambda s: distillation_loss(s, mx.array(teacher, dtype=mx.float32), mx.array(targets),
                                               mx.array(mask), alpha=alpha, temperature=tau)[0])(
        mx.array(student, dtype=mx.float32))
    grad = np.array(grad)
    eps = 1e-5
    for index in [(0, 0, 3), (0, 2, 7), (1, 4, 0), (0, 4, 5)]:  # (0, 4, *) is masked: zero gradient
        bumped = student.copy()
        bumped[index] += eps
        lowered = student.copy()
        lowered[index] -= eps
        numeric = (reference(bumped, teacher, targets, mask, alpha, tau)
                   - reference(lowered, teacher, targets, mask, alpha, tau)) / (2 * eps)
        assert abs(grad[index] - numeric) < 1e-4, index


def test_teacher_receives_no_gradient():
    s, t = mx.random.normal((1, 3, 7)), mx.random.normal((1, 3, 7))
    g = mx.grad(lambda t: distillation_loss(s, t, mx.array([[1, 2, 3]]), mx.ones((1, 3)), alpha=1.0)[0])(t)
    assert mx.all(g == 0).item()


def test_identical_logits_cost_nothing_under_pure_distillation():
    x = mx.random.normal((2, 4, 9))
    loss, _ = distillation_loss(x, x, mx.zeros((2, 4), dtype=mx.int32), mx.ones((2, 4)), alpha=1.0, temperature=2.0)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("alpha, tau, words", [(1.5, 1.0, "--kd-alpha"), (0.5, 0.0, "--kd-temperature")])
def test_bad_settings_are_one_line_errors(alpha, tau, words):
    x = mx.zeros((1, 2, 3))
    with pytest.raises(EchoError, match=words):
        distillation_loss(x, x, mx.zeros((1, 2), dtype=mx.int32), mx.ones((1, 2)), alpha=alpha, temperature=tau)
