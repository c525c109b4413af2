# Copyright © 2026 echo-mlx authors. Derived from mlx-lm's models/llama.py (MIT).
"""LLaMA with cross-layer K/V sharing.

Layer ``i`` attends to the keys and values of layer ``kv_sources[i]``. A layer
that some layer attends to is a *producer*: it has k/v projections, applies RoPE
to its keys and caches them post-RoPE. Every other layer is a *consumer*: it
has no k/v projections and reads its producer's K/V. The cache holds one entry
per producer (``make_cache``), so resident KV bytes shrink by L / producers.

A consumer whose producer sits *above* it (top/middle targets of the
cross-layer KV sharing study) cannot see K/V for the tokens of the current
forward pass; it attends to the producer's K/V of earlier tokens only (the
diagonal is masked, the first token's attention output is zero), and the block
of layers up to that producer is iterated: ``forward_passes`` passes without
gradient, then ``backward_passes`` with it, each pass reading the K/V the
previous one wrote (zeros at first). After p passes the first p positions are
exact, so a block needs only ``min(tokens, passes)`` of them.

EchoAtt (``attention_sources``): layer ``i`` with source ``s < i`` reuses
layer s's attention probabilities with its own values, softmax(Q_s K_s^T) V_i.
It has no q/k projections; its cache entry holds V and zero-width keys, so
mlx-lm's caches (and their quantization) work unchanged. The source computes
its probabilities P once and keeps them for the forward pass, so a reusing
layer computes P V_i only: no scores, no softmax, no read of K. Where P would
exceed ``MAX_SHARED_PROBABILITIES`` elements (long prefill chunks), or the
source attends to earlier tokens only, the reusing layer instead runs fused
attention over the source's queries and keys and its own values (same result,
no P in memory).

This file only imports mlx and mlx_lm (and echo_mlx's decode kernels when
echo-mlx is installed, and transformers' config registry, which mlx_lm has
already imported): ``echo-mlx convert`` copies it into every checkpoint as the
``model_file`` that stock ``mlx_lm.load(..., trust_remote_code=True)`` imports.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.rope_utils import initialize_rope

try:  # Metal decode kernels for cached steps; see echo_mlx/kernels/dispatch.py
    from echo_mlx.kernels.dispatch import decode_attention
except ImportError:  # this file running from a checkpoint without echo-mlx
    decode_attention = None
try:  # EchoAtt's P V kernel (an older echo-mlx has none)
    from echo_mlx.kernels.dispatch import apply_probabilities as probabilities_kernel
except ImportError:
    probabilities_kernel = None


# EchoAtt: the largest P (batch x heads x queries x keys) a source keeps for the
# layers above; 2**24 float32 elements is 64 MiB: decode at any context, a
# training batch of 4 x 512, a prefill chunk of 512 tokens at ~3.6k context.
MAX_SHARED_PROBABILITIES = 1 << 24


def _register_model_type_with_transformers():
    """Tell transformers that ``echo_llama`` is a model type.

    mlx-lm loads the tokenizer with ``AutoTokenizer.from_pretrained``, which
    reads config.json first; for a model type transformers does not know it
    falls back to a bare config and prints "You are using a model of type
    `echo_llama` to instantiate a model of type ``..." on every load. mlx-lm
    imports this file (the checkpoint's ``model_file``) before the tokenizer,
    so registering here silences it for stock mlx-lm too. The config only
    carries the keys; nothing in transformers runs this model.
    """
    try:
        from transformers import AutoConfig, PretrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # transformers is optional for the model itself
        return
    if "echo_llama" in CONFIG_MAPPING:  # echo_mlx's copy and a checkpoint's copy both run this
        return

    class EchoLlamaConfig(PretrainedConfig):
        model_type = "echo_llama"

    try:
        AutoConfig.register("echo_llama", EchoLlamaConfig)
    except ValueError:  # registered meanwhile, or an API change: the warning is cosmetic
        pass


_register_model_type_with_transformers()


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000
    rope_traditional: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    tie_word_embeddings: bool = True
    # The sharing plan: layer i attends to the K/V of layer kv_sources[i].
    kv_sources: Optional[List[int]] = None
    sliding_window: Optional[int] = None
    sliding_layers: Optional[List[int]] = None
    attention_sources: Optional[List[int]] = None
    forward_passes: int = 7
    backward_passes: int = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.kv_sources is None:
            self.kv_sources = list(range(self.num_hidden_layers))
        if self.sliding_layers is None:
            self.sliding_layers = []
        if self.attention_sources is None:
            self.attention_sources = list(range(self.num_hidden_layers))
        if len(self.kv_sources) != self.num_hidden_layers:
            raise ValueError(
                f"kv_sources has {len(self.kv_sources)} entries for "
                f"{self.num_hidden_layers} layers"
            )


def cyclic_blocks(kv_sources: List[int]) -> List[Tuple[int, int]]:
    """Half-open layer ranges that must be iterated because some layer in
    them attends to a layer above it; grown until nothing inside points out."""
    blocks, i = [], 0
    while i < len(kv_sources):
        if kv_sources[i] <= i:
            i += 1
            continue
        start, end, j = i, kv_sources[i], i
        while j <= end:
            end = max(end, kv_sources[j])
            j += 1
        blocks.append((start, end + 1))
        i = end + 1
    return blocks


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim or args.hidden_size // n_heads
        self.scale = head_dim**-0.5
        self.layer_idx = layer_idx
        self.kv_source = args.kv_sources[layer_idx]
        self.produces_kv = layer_idx in args.kv_sources
        self.attention_source = args.attention_sources[layer_idx]
        self.reuses_attention = self.attention_source != layer_idx
        self.shares_attention = layer_idx in args.attention_sources[layer_idx + 1 :]
        bias = args.attention_bias

        if not self.reuses_attention:
            self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        if self.produces_kv and not self.reuses_attention:
            self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        if self.produces_kv:
            self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.rope = initialize_rope(
            head_dim,
            args.rope_theta,
            args.rope_traditional,
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x, mask, cache, kv: dict, offset: int) -> mx.array:
        if self.reuses_attention:
            return self._reuse_attention(x, mask, cache, kv, offset)
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        queries = self.rope(queries, offset=offset)

        if self.produces_kv:
            keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
            values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
            keys = self.rope(keys.transpose(0, 2, 1, 3), offset=offset)
            values = values.transpose(0, 2, 1, 3)
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
            kv[self.layer_idx] = (keys, values, cache)

        keys, values, source_cache = kv[self.kv_source]
        earlier_only = self.kv_source > self.layer_idx
        if self.shares_attention and not earlier_only and self._keeps_probabilities(queries, keys):
            # EchoAtt layers above reuse P: computed once, here.
            probabilities = _probabilities(queries, keys, self.scale, mask, source_cache)
            kv["probabilities", self.layer_idx] = probabilities
            output = self._apply(probabilities, values, source_cache)
        else:
            if self.shares_attention:  # EchoAtt layers above attend with these queries and keys
                # A handle of its own: mlx-lm's quantized attention scales its queries in place.
                kv["attention", self.layer_idx] = (mx.array(queries), keys, source_cache, earlier_only)
            output = self._attend(queries, keys, values, source_cache, mask, offset, earlier_only)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _keeps_probabilities(self, queries, keys):
        B, _, L, _ = queries.shape
        S = (keys if isinstance(keys, mx.array) else keys[0]).shape[-2]
        return B * self.n_heads * L * S <= MAX_SHARED_PROBABILITIES

    def _reuse_attention(self, x, mask, cache, kv: dict, offset: int) -> mx.array:
        """EchoAtt: the source layer's attention probabilities applied to this layer's own V."""
        B, L, _ = x.shape
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:  # keys of width 0: the cache holds V only
            _, values = cache.update_and_fetch(values[..., :0], values)
        probabilities = kv.get(("probabilities", self.attention_source))
        if probabilities is not None:
            output = self._apply(probabilities, values, cache)
        else:
            queries, keys, source_cache, earlier_only = kv["attention", self.attention_source]
            output = self._attend(queries, keys, values, source_cache, mask, offset, earlier_only)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _apply(self, probabilities, values, cache):
        output = None
        if probabilities_kernel is not None:  # echo's Metal kernel, or None: the ops below
            output = probabilities_kernel(probabilities, values, cache, self.training)
        return output if output is not None else _apply_probabilities(probabilities, values, cache)

    def _attend(self, queries, keys, values, source_cache, mask, offset, earlier_only):
        output = None
        if decode_attention is not None:  # echo's Metal kernel, or None: the ops below
            output = decode_attention(
                queries, keys, values, source_cache, self.scale, mask, earlier_only, self.training
            )
        if output is None and earlier_only:
            output = self._attend_to_earlier_tokens(queries, keys, values, source_cache, offset)
        elif output is None:
            output = scaled_dot_product_attention(
                queries, keys, values, cache=source_cache, scale=self.scale, mask=mask
            )
        return output

    def _attend_to_earlier_tokens(self, queries, keys, values, cache, offset):
        # The query at position p sees the producer's K/V at positions < p.
        # Dropping the newest key turns that into a plain bottom-right
        # aligned causal mask; the very first token sees nothing at all.
        keys, values = tree_map(lambda a: a[..., :-1, :], (keys, values))
        if offset == 0:
            first = mx.zeros_like(queries[:, :, :1])
            if queries.shape[2] == 1:
                return first
            queries = queries[:, :, 1:]
        mask = "causal" if queries.shape[2] > 1 else None
        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        return mx.concatenate([first, output], axis=2) if offset == 0 else output


def _probabilities(queries, keys, scale, mask, cache):
    """softmax(Q K^T * scale + mask), grouped by kv head: (B, kv heads, queries per kv head, L, S).

    The same arithmetic as mlx-lm's quantized attention (scores in the
    queries' dtype, a precise softmax), for float and quantized keys."""
    B, n_heads, L, D = queries.shape
    bits = getattr(cache, "bits", None)
    n_kv_heads = (keys[0] if bits else keys).shape[1]
    queries = (queries * scale).reshape(B, n_kv_heads, n_heads // n_kv_heads, L, D)
    if bits:
        keys = tree_map(lambda a: mx.expand_dims(a, -3), keys)
        scores = mx.quantized_matmul(queries, *keys, transpose=True, group_size=cache.group_size, bits=bits)
    else:
        scores = queries @ mx.expand_dims(keys, -3).swapaxes(-1, -2)
    if mask is not None:
        if isinstance(mask, str):  # "causal", aligned to the newest key
            S = scores.shape[-1]
            mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        elif mask.ndim == 4:  # (B or 1, 1, L, S): one for all heads
            mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    return mx.softmax(scores, axis=-1, precise=True)


def _apply_probabilities(probabilities, values, cache):
    """P V for grouped P (see _probabilities): (B, heads, L, D)."""
    B, n_kv_heads, n_repeats, L, _ = probabilities.shape
    bits = getattr(cache, "bits", None)
    if bits:
        values = tree_map(lambda a: mx.expand_dims(a, -3), values)
        out = mx.quantized_matmul(probabilities, *values, transpose=False, group_size=cache.group_size, bits=bits)
    else:
        out = probabilities.astype(values.dtype) @ mx.expand_dims(values, -3)
    return out.reshape(B, n_kv_heads * n_repeats, L, -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden_dim, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)

    def __call__(self, x) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.use_sliding = layer_idx in args.sliding_layers
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, cache, kv: dict, offset: int) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, kv, offset)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # The compact cache has one entry per producer, in layer order.
        self.producers = sorted(set(args.kv_sources))
        self.cyclic_blocks = cyclic_blocks(args.kv_sources)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.producers)
        layer_cache = dict(zip(self.producers, cache))
        # Read before any producer writes: every producer has seen the same tokens.
        offset = cache[0].offset if cache[0] is not None else 0
        masks = self._masks(h, layer_cache)
        kv = {}  # producer layer -> (keys, values, cache) of this forward pass

        run = lambda i, x: self.layers[i](
            x, masks[self.layers[i].use_sliding], layer_cache.get(i), kv, offset
        )
        blocks = dict(self.cyclic_blocks)
        i = 0
        while i < len(self.layers):
            if i in blocks:
                h = self._iterate_block(range(i, blocks[i]), h, run, kv, layer_cache)
                i = blocks[i]
            else:
                h = run(i, h)
                i += 1
        return self.norm(h)

    def _masks(self, h, layer_cache):
        # Index by use_sliding: False -> global causal mask, True -> windowed.
        sliding = set(self.args.sliding_layers)
        first = lambda want: next((j for j in self.producers if (j in sliding) == want), None)
        masks = [create_attention_mask(h, layer_cache.get(first(False)))]
        if sliding:
            window = self.args.sliding_window
            masks.append(create_attention_mask(h, layer_cache.get(first(True)), window_size=window))
        return masks

    def _iterate_block(self, block, h, run, kv, layer_cache):
        """Run a block whose layers read K/V from a layer above them."""
        T = h.shape[1]
        cached = [j for j in block if self.layers[j].self_attn.produces_kv]
        # K/V that layers read (an EchoAtt layer's V is its own only).
        producers = [j for j in cached if not self.layers[j].self_attn.reuses_attention]
        # Pass 0 reads zero K/V for the current tokens (after any cached prefix).
        for j in producers:
            attn = self.layers[j].self_attn
            shape = (h.shape[0], attn.n_kv_heads, T, attn.head_dim)
            zeros = mx.zeros(shape, dtype=h.dtype)
            kv[j] = self._write_tentatively(layer_cache.get(j), zeros, zeros)

        args = self.args
        passes = min(T, args.forward_passes + args.backward_passes)
        no_grad_passes = passes - min(args.backward_passes, passes)
        for p in range(passes):
            x = h
            for i in block:
                x = run(i, x)
            if p < passes - 1:
                # Earlier passes only propose K/V: roll the caches back.
                for j in cached:
                    if layer_cache.get(j) is not None:
                        layer_cache[j].trim(T)
            if p < no_grad_passes:
                for j in producers:
                    kv[j] = tree_map(mx.stop_gradient, kv[j][:2]) + (kv[j][2],)
        return x

    @staticmethod
    def _write_tentatively(cache, keys, values):
        if cache is None:
            return keys, values, None
        fetched = cache.update_and_fetch(keys, values)
        cache.trim(keys.shape[2])
        return fetched + (cache,)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        sliding = set(self.args.sliding_layers)
        return [
            RotatingKVCache(max_size=self.args.sliding_window) if j in sliding else KVCache()
            for j in self.model.producers
        ]
