"""Layer-wise distillation: each changed layer learns to reproduce its
teacher layer's output from the teacher's input.

After conversion only some layers attend differently (consumers, and
producers whose K/V others now read). Instead of pushing one logit-level
signal back through the whole network, every such layer gets its own target:
run the teacher once, keep its residual stream ``h_0 .. h_L``, feed layer
``i`` of the student ``h_i`` (and its producer ``h_p``, so the shared K/V are
the student producer's own projections of the teacher's stream), and ask for
``h_{i+1}``. The error is measured relative to what the teacher layer adds,

    loss_i = |student_i(h_i) - h_{i+1}|^2 / scale_i,   scale_i = mean |h_{i+1} - h_i|^2,

so every layer counts alike whatever the size of its residual stream. It is
cheaper per token than logit distillation (no 49k-entry softmax, which
dominates a CPU step, and the teacher stops before its head) and far richer
per token (a 576-dim target per layer instead of one distribution). Layers
are independent given the teacher's stream, so errors do not compound during
this phase; an end-to-end KD phase afterwards fixes what remains.

Teacher forcing also removes the iteration that plans with targets above the
consumer need: the producer's K/V are computed from the teacher's ``h_p``,
the fixed point the iterative passes converge to once the student matches.
"""

from typing import Optional, Sequence

import mlx.core as mx

from ..errors import EchoError


def changed_layers(kv_sources: Sequence[int], attention_sources: Optional[Sequence[int]] = None) -> list:
    """Layers that attend differently after conversion: consumers, and the producers
    (of K/V, or of EchoAtt attention) they read."""
    pairs = list(enumerate(kv_sources)) + list(enumerate(attention_sources or ()))
    return sorted({k for i, j in pairs if i != j for k in (i, j)})


def _masks(model, h):
    return model.model._masks(h, {})


def teacher_states(teacher, inputs, upto=None) -> list:
    """The teacher's residual stream before each layer and after the last: L + 1 arrays
    (only the first ``upto + 1`` of them when ``upto`` is given)."""
    h = teacher.model.embed_tokens(inputs)
    masks = _masks(teacher, h)
    states, kv = [h], {}
    for layer in teacher.model.layers[:upto]:
        h = layer(h, masks[layer.use_sliding], None, kv, 0)
        states.append(h)
    return [mx.stop_gradient(s) for s in states]


def layer_scales(teacher, inputs, layers: Sequence[int]) -> mx.array:
    """mean |h_{i+1} - h_i|^2 per layer: fixed once per run so that the loss is a
    plain sum over tokens (exact across ranks and gradient-accumulation steps)."""
    states = teacher_states(teacher, inputs)
    return mx.stop_gradient(mx.stack([((states[i + 1] - states[i]) ** 2).mean() for i in layers]))


def make_layerwise_loss(teacher, kv_sources: Sequence[int], scales: mx.array, attention_sources=None, cache=None):
    """A loss with make_loss's signature: (sum over tokens, number of tokens). With a
    ``cache`` (echo_mlx.tuner.teacher_cache) the teacher's states come from it: a step then
    runs only the changed layers, and the teacher not at all once the batch is cached."""
    attention_sources = attention_sources or range(len(kv_sources))
    layers = changed_layers(kv_sources, attention_sources)
    if not layers:
        raise EchoError("the plan shares nothing: there is nothing to distil layer by layer")
    if teacher is None:
        raise EchoError("layer-wise distillation needs a teacher: drop --teacher none or --layerwise-iters")
    # Producers first (a consumer may read a producer above it), EchoAtt
    # layers last (they read their source's queries and keys).
    order = sorted(layers, key=lambda i: (attention_sources[i] != i, kv_sources[i] != i))
    needed = sorted({j for i in layers for j in (i, i + 1)})  # each layer's input and target

    def loss(model, batch, lengths):
        inputs = batch[:, :-1]
        # Every real token counts, prompts included (--mask-prompt is about targets):
        # their hidden states are what later tokens attend to.
        mask = (mx.arange(1, inputs.shape[1] + 1) <= lengths[:, 1:]).astype(mx.float32)
        if cache is not None:
            states = cache.states(inputs, needed)
        else:
            states = teacher_states(teacher, inputs, upto=max(needed))
        masks = _masks(model, states[order[0]])
        kv, per_token = {}, 0.0
        for i in order:
            layer = model.layers[i]
            out = layer(states[i], masks[layer.use_sliding], None, kv, 0)
            k = layers.index(i)
            per_token = per_token + ((out - states[i + 1]) ** 2).mean(-1) / scales[k]
        per_token = per_token / len(layers)
        return (per_token * mask).sum(), mask.sum()

    return loss
