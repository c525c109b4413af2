"""The teacher's work kept per batch (echo_mlx.tuner.teacher_cache) and the sparse KL it feeds."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from echo_mlx.conversion.convert import shared_model
from echo_mlx.errors import EchoError
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner.distill import distillation_loss, sparse_kl, top_k_statistics
from echo_mlx.tuner.finetune import FinetuneArgs, finetune
from echo_mlx.tuner.layerwise import changed_layers, make_layerwise_loss
from echo_mlx.tuner.teacher_cache import TeacherCache

from fixtures import QUICK


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def coarse_kl(student, teacher, k, tau):
    """float64: KL of the distributions coarsened to (the teacher's top k, everything else)."""
    lp, lq = log_softmax(teacher / tau), log_softmax(student / tau)
    top = np.argsort(-teacher, axis=-1)[..., :k]
    p, q = np.take_along_axis(np.exp(lp), top, -1), np.take_along_axis(np.exp(lq), top, -1)
    head = (p * (np.log(p) - np.log(q))).sum(-1)
    if k == teacher.shape[-1]:
        return head
    pt, qt = 1 - p.sum(-1), 1 - q.sum(-1)
    return head + pt * (np.log(pt) - np.log(qt))


@pytest.mark.parametrize("k, tau", [(1, 1.0), (5, 1.0), (5, 2.0), (30, 1.0)])
def test_sparse_kl_is_the_coarsened_kl_and_at_most_the_full_one(k, tau):
    rng = np.random.default_rng(k)
    s, t = rng.normal(0, 3, (2, 4, 30)), rng.normal(0, 3, (2, 4, 30))
    kl = np.array(sparse_kl(mx.array(s, dtype=mx.float32), *top_k_statistics(mx.array(t, dtype=mx.float32), tau, k), tau))
    assert np.allclose(kl, coarse_kl(s, t, k, tau), atol=2e-5)
    full = (np.exp(log_softmax(t / tau)) * (log_softmax(t / tau) - log_softmax(s / tau))).sum(-1)
    assert np.all(kl <= full + 1e-5)
    assert (k == 30) == np.allclose(kl, full, atol=2e-5)  # equal exactly when every token is kept


def test_kd_loss_and_gradient_with_every_token_kept_equal_the_exact_loss():
    rng = np.random.default_rng(0)
    s, t = mx.array(rng.normal(0, 3, (2, 5, 11)), dtype=mx.float32), mx.array(rng.normal(0, 3, (2, 5, 11)), dtype=mx.float32)
    targets, mask = mx.array(rng.integers(0, 11, (2, 5))), mx.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    exact = lambda s: distillation_loss(s, t, targets, mask, alpha=0.7, temperature=2.0)[0]
    sparse = lambda s: distillation_loss(s, None, targets, mask, alpha=0.7, temperature=2.0,
                                         teacher_top_k=top_k_statistics(t, 2.0, 11))[0]
    assert abs(exact(s).item() - sparse(s).item()) < 1e-5
    assert np.allclose(np.array(mx.grad(exact)(s)), np.array(mx.grad(sparse)(s)), atol=1e-5)


@pytest.fixture
def teacher(six_layer_source):
    src = load_source(six_layer_source)
    model, _ = shared_model(src.config, src.weights, SharingPlan.parse("none", 6))
    model.freeze()
    return model


class Counting:
    """The teacher, counting its forward passes."""

    def __init__(self, model):
        self._wrapped, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def __call__(self, *a, **kw):
        self.calls += 1
        return self._wrapped(*a, **kw)


def test_a_cached_batch_is_read_back_without_running_the_teacher(teacher, tmp_path):
    inputs = mx.random.randint(0, 50, (2, 16), key=mx.random.key(1))
    counting = Counting(teacher)
    cache = TeacherCache(tmp_path, counting, top_k=8)
    first = cache.top_k(inputs)
    assert not list(Path(tmp_path).iterdir())  # written once evaluated: at the next lookup or flush
    cache.flush()
    second = TeacherCache(tmp_path, counting, top_k=8).top_k(inputs)  # a new run, the same directory
    assert counting.calls == 1
    for a, b in zip(first, second):
        assert mx.array_equal(a, b).item()
    assert mx.array_equal(first[0], top_k_statistics(teacher(inputs), 1.0, 8)[0]).item()
    # Another batch, k or temperature is another entry.
    TeacherCache(tmp_path, counting, top_k=4).top_k(inputs)
    TeacherCache(tmp_path, counting, top_k=8, temperature=2.0).top_k(inputs)
    cache.top_k(inputs[:, :-1])
    cache.top_k(inputs[:, :-1])  # the same instance finds its own pending entry on disk
    assert counting.calls == 4 and (cache.hits, cache.misses) == (1, 2)


def test_another_teacher_never_reads_this_ones_entries(six_layer_source, teacher, tmp_path):
    inputs = mx.random.randint(0, 50, (2, 16), key=mx.random.key(2))
    first = TeacherCache(tmp_path, teacher)
    first.top_k(inputs)
    first.flush()
    src = load_source(six_layer_source)
    other, _ = shared_model(src.config, {k: v * 1.01 for k, v in src.weights.items()}, SharingPlan.parse("none", 6))
    cache = TeacherCache(tmp_path, other)
    cache.top_k(inputs)
    assert (cache.hits, cache.misses) == (0, 1)


def test_a_damaged_entry_is_recomputed(teacher, tmp_path):
    inputs = mx.random.randint(0, 50, (2, 16), key=mx.random.key(3))
    cache = TeacherCache(tmp_path, teacher, top_k=8)
    good = cache.top_k(inputs)
    cache.flush()
    (path,) = list(Path(tmp_path).glob("kd-*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])  # a truncated file
    with pytest.warns(UserWarning, match="unreadable"):
        again = TeacherCache(tmp_path, teacher, top_k=8).top_k(inputs)
    assert mx.array_equal(good[1], again[1]).item()
    assert not list(Path(tmp_path).glob(".*tmp*"))  # written atomically: no temporary left


def test_layerwise_loss_from_the_cache_equals_the_uncached_loss(six_layer_source, teacher, tmp_path):
    src = load_source(six_layer_source)
    plan = SharingPlan.parse("cla:2", 6)
    student, _ = shared_model(src.config, src.weights, plan)
    batch = mx.random.randint(0, 50, (2, 25), key=mx.random.key(4))
    lengths = mx.array([[0, 24], [0, 19]])
    scales = mx.ones((len(changed_layers(plan.kv_sources)),))
    cache = TeacherCache(tmp_path, teacher)
    direct = make_layerwise_loss(teacher, plan.kv_sources, scales)(student, batch, lengths)
    cached = make_layerwise_loss(teacher, plan.kv_sources, scales, cache=cache)
    first, second = cached(student, batch, lengths), cached(student, batch, lengths)
    assert (cache.misses, cache.hits) == (1, 1)
    for value in (first, second):
        assert value[0].item() == direct[0].item() and value[1].item() == direct[1].item()


def test_finetune_with_a_teacher_cache_trains_and_a_second_run_reuses_every_batch(six_layer_source, tmp_path):
    cache_dir = tmp_path / "teacher"
    settings = dict(QUICK, plan="cla:2", iters=4, layerwise_iters=2, teacher_cache=str(cache_dir), teacher_top_k=16)
    first = finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "a"), **settings))
    written = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    assert sum(n.startswith("kd-") for n in written) == 2 and sum(n.startswith("states-") for n in written) >= 2
    second = finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "b"), **settings))
    # Nothing new and nothing rewritten: every batch was read back.
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == written
    curve = lambda run: [json.loads(l)["train_loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                         if "train_loss" in l]
    assert curve("a") == curve("b") and len(curve("a")) == 4
    assert first.best_val_loss == second.best_val_loss


def test_a_top_k_below_one_is_refused(teacher, tmp_path):
    with pytest.raises(EchoError, match="--teacher-top-k 0"):
        TeacherCache(tmp_path, teacher, top_k=0)
