"""EchoAtt layers reuse their source's attention probabilities P (computed once per
forward pass) instead of recomputing softmax(Q_s K_s^T): the same outputs and gradients
as the fused form, which is also what runs when P would exceed MAX_SHARED_PROBABILITIES."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import BatchKVCache, RotatingKVCache
from test_model import echo_model, tokens

from echo_mlx.models import model as model_module

PLANS = ["echoatt:2", "0_0_2_3a2_4a2_5"]  # EchoAtt alone, and with K/V sharing underneath


@pytest.fixture
def counted(monkeypatch):
    """How many times a layer applied kept probabilities (sources and reusing layers alike)."""
    calls = []
    apply = model_module._apply_probabilities
    monkeypatch.setattr(model_module, "_apply_probabilities", lambda *a: calls.append(1) or apply(*a))
    return calls


def fused(monkeypatch):
    """Every source too large to keep P: today's fused form throughout."""
    monkeypatch.setattr(model_module, "MAX_SHARED_PROBABILITIES", -1)


def _float64(plan, **overrides):
    model = echo_model(plan, **overrides)
    model.set_dtype(mx.float64)
    return model


def _close(a, b, atol=1e-6):
    return mx.abs(a - b).max().item() <= atol


def _decode(model, x, prompt, chunk, make_cache=None, quantize_bits=None):
    """Prefill x[:, :prompt] in chunks of `chunk`, then decode the rest one token at a time."""
    cache = make_cache() if make_cache else model.make_cache()
    outputs = [model(x[:, t : min(t + chunk, prompt)], cache=cache) for t in range(0, prompt, chunk)]
    if quantize_bits:
        maybe_quantize_kv_cache(cache, 0, 32, quantize_bits)
    outputs += [model(x[:, t : t + 1], cache=cache) for t in range(prompt, x.shape[1])]
    return mx.concatenate(outputs, axis=1)


@pytest.mark.parametrize("plan", PLANS)
def test_training_forward_and_gradients_equal_the_fused_form(plan, monkeypatch, counted):
    model, x = _float64(plan), tokens(T=12)
    loss = lambda m: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()
    with mx.stream(mx.cpu):
        kept_loss, kept_grads = nn.value_and_grad(model, loss)(model)
        assert counted, "no layer reused kept probabilities"
        fused(monkeypatch)
        calls = len(counted)
        fused_loss, fused_grads = nn.value_and_grad(model, loss)(model)
        assert len(counted) == calls  # the fallback keeps no P
    # Every weight's gradient, the sources' q/k projections included: a reusing layer's
    # loss reaches its source's queries and keys through P as through the fused form.
    assert _close(kept_loss, fused_loss)
    fused_grads = dict(tree_flatten(fused_grads))
    for name, grad in tree_flatten(kept_grads):
        assert _close(grad, fused_grads[name]), name


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_cached_prefill_chunks_and_decode_equal_the_fused_form(plan, chunk, monkeypatch, counted):
    model, x = _float64(plan), tokens(B=2, T=22)
    with mx.stream(mx.cpu):
        kept = _decode(model, x, prompt=16, chunk=chunk)
        assert counted
        fused(monkeypatch)
        reference = _decode(model, x, prompt=16, chunk=chunk)
        uncached = model(x)
    assert _close(kept, reference)
    assert _close(kept, uncached)


def test_windowed_caches_equal_the_fused_form(monkeypatch, counted):
    """Rotating caches (--max-kv-size) hand mask arrays to the attention once they wrap."""
    model, x = _float64("echoatt:2"), tokens(B=1, T=30)
    windowed = lambda: [RotatingKVCache(max_size=8) for _ in model.model.producers]
    with mx.stream(mx.cpu):
        kept = _decode(model, x, prompt=20, chunk=6, make_cache=windowed)
        assert counted
        fused(monkeypatch)
        reference = _decode(model, x, prompt=20, chunk=6, make_cache=windowed)
    assert _close(kept, reference)


def test_batched_left_padded_caches_equal_the_fused_form(monkeypatch, counted):
    """mlx-lm's BatchKVCache (as --prompts-file uses): per-sequence (B, 1, L, S) masks."""
    model, x = _float64("0_0_2_3a2_4a2_5"), tokens(B=2, T=14)
    batched = lambda: [BatchKVCache(left_padding=[3, 0]) for _ in model.model.producers]
    with mx.stream(mx.cpu):
        kept = _decode(model, x, prompt=10, chunk=10, make_cache=batched)
        assert counted
        fused(monkeypatch)
        reference = _decode(model, x, prompt=10, chunk=10, make_cache=batched)
    assert _close(kept, reference)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_caches_equal_the_fused_form(bits, monkeypatch, counted):
    # Quantized matmuls run in float32 (MLX has no float64 ones); head dim 32: one quantization group.
    model, x = echo_model("echoatt:2", hidden_size=128), tokens(B=1, T=40)
    kept = _decode(model, x, prompt=30, chunk=30, quantize_bits=bits)
    assert counted
    fused(monkeypatch)
    reference = _decode(model, x, prompt=30, chunk=30, quantize_bits=bits)
    assert _close(kept, reference, atol=1e-5)
    assert not _close(kept, _decode(model, x, prompt=30, chunk=30), atol=1e-5)  # the quantized path really ran


def test_the_size_limit_switches_between_the_two_forms_with_the_same_result(monkeypatch, counted):
    """A source keeps P up to MAX_SHARED_PROBABILITIES elements (batch x heads x queries x
    keys) and not one more; long chunks fall back, and every chunk gives the same logits."""
    model, x = _float64("echoatt:2"), tokens(B=2, T=12)  # sources 1 and 3, each read by one layer
    heads = model.layers[1].self_attn.n_heads
    with mx.stream(mx.cpu):
        everything = model(x)
        monkeypatch.setattr(model_module, "MAX_SHARED_PROBABILITIES", 2 * heads * 12 * 12)
        counted.clear()
        at_limit = model(x)
        assert len(counted) == 4  # two sources and their two reusing layers
        monkeypatch.setattr(model_module, "MAX_SHARED_PROBABILITIES", 2 * heads * 12 * 12 - 1)
        counted.clear()
        over_limit = model(x)
        assert counted == []
    assert _close(at_limit, everything) and _close(over_limit, everything)
