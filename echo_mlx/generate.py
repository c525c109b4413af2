"""`echo-mlx generate` and `echo-mlx cache-prompt`: generation with the shared cache.

mlx-lm does the generating (``stream_generate``, ``batch_generate``, its
samplers and detokenizers); this module only does what sharing needs:

- build the compact prompt cache (one entry per K/V-producing layer) and
  honour ``--max-kv-size`` (mlx-lm ignores it for models with ``make_cache``),
  also together with ``--kv-bits`` (mlx-lm raises NotImplementedError there);
- refuse prompt caches saved for another model or plan;
- report resident KV bytes next to what the unshared model would hold.
"""

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, stream_generate
from mlx_lm.models.cache import RotatingKVCache, load_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .errors import EchoError
from .io.checkpoint import kv_cache_bytes
from .kernels import dispatch
from .models.plans import plan_id

DEFAULT_QUANTIZED_KV_START = 5000
KEEP_TOKENS = 4  # like mlx-lm: a rotating cache keeps the first tokens (attention sinks)


def make_prompt_cache(model, max_kv_size: Optional[int] = None) -> list:
    """One cache per producer. With ``max_kv_size``, every producer keeps a
    window of that many tokens (consumers see the same window through it)."""
    if max_kv_size is None:
        return model.make_cache()
    from .models.cache import QuantizableRotatingKVCache

    if max_kv_size <= KEEP_TOKENS:
        raise EchoError(f"--max-kv-size {max_kv_size} is too small: use at least {KEEP_TOKENS + 1} tokens")
    if model.model.cyclic_blocks:
        raise EchoError(
            "--max-kv-size is not supported with plans whose K/V producers sit above their consumers "
            "(top/middle targets): drop --max-kv-size or use a bottom-target plan"
        )
    args = model.args
    sliding = set(args.sliding_layers)
    caches = []
    for j in model.model.producers:
        if j in sliding and args.sliding_window <= max_kv_size:
            caches.append(RotatingKVCache(max_size=args.sliding_window))
        else:
            caches.append(QuantizableRotatingKVCache(max_size=max_kv_size, keep=KEEP_TOKENS))
    return caches


def unshared_kv_bytes(model, cache) -> int:
    """What the unshared model would hold for the same tokens: every layer
    caches as much as its producer does."""
    per_producer = {j: kv_cache_bytes([c]) for j, c in zip(model.model.producers, cache)}
    # An EchoAtt layer caches V only; unshared it would hold K as well, of the same size.
    own = lambda i: 2 * per_producer[i] if model.args.attention_sources[i] != i else per_producer[model.args.kv_sources[i]]
    return sum(own(i) for i in range(len(model.args.kv_sources)))


def model_fingerprint(model) -> str:
    """Identifies model + plan for prompt-cache files: the plan, the shapes, and
    a few weight values (so a finetuned or different model does not match)."""
    h = hashlib.sha256()
    h.update(json.dumps([model.args.kv_sources, model.args.sliding_layers]).encode())
    if model.args.attention_sources != list(range(len(model.args.kv_sources))):  # EchoAtt
        h.update(json.dumps(model.args.attention_sources).encode())
    for name, a in tree_flatten(model.parameters()):  # a slice of every tensor: cheap, catches any re-init
        h.update(f"{name}{a.shape}".encode())
        h.update(bytes(memoryview(a.reshape(-1)[:64].astype(mx.float32))))
    return h.hexdigest()[:16]


def save_cache_file(path, cache, model, model_id: str):
    metadata = {
        "model": model_id,
        "echo_plan": plan_id(model.args),
        "echo_fingerprint": model_fingerprint(model),
        "tokenizer_config": "{}",  # what mlx_lm.generate expects in a cache file
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    save_prompt_cache(str(tmp), cache, metadata)
    tmp.replace(path)


def load_cache_file(path, model) -> list:
    """A saved prompt cache, refused unless it was made with this model and plan."""
    from .models import cache as _registers_classes  # noqa: F401  (load_prompt_cache looks classes up by name)

    if not Path(path).is_file():
        raise EchoError(f"prompt cache file {path} does not exist: create it with `echo-mlx cache-prompt`")
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:  # safetensors/metadata errors of every kind
        raise EchoError(f"{path} is not a readable prompt cache ({type(e).__name__}): re-create it with `echo-mlx cache-prompt`")
    plan = plan_id(model.args)
    if metadata.get("echo_plan") != plan or len(cache) != len(model.model.producers):
        raise EchoError(
            f"{path} was made for plan {metadata.get('echo_plan', 'unknown')}, this model uses {plan}: "
            f"re-create it with `echo-mlx cache-prompt` for this model"
        )
    if metadata.get("echo_fingerprint") != model_fingerprint(model):
        raise EchoError(
            f"{path} was made with another model ({metadata.get('model', 'unknown')}): "
            f"re-create it with `echo-mlx cache-prompt` for this model"
        )
    return cache


KV_BITS = (4, 8)  # what the tests (and the Metal kernels) cover; mx.quantize allows more


def check_options(kv_bits: Optional[int], kv_group_size: int, max_kv_size: Optional[int]):
    if kv_bits is not None:
        from .models.cache import check_kv_quantization

        if kv_bits not in KV_BITS:
            raise EchoError(f"--kv-bits {kv_bits} is not supported: use 4 or 8")
        check_kv_quantization(kv_bits, kv_group_size)
    if max_kv_size is not None and max_kv_size < 1:
        raise EchoError(f"--max-kv-size must be positive, got {max_kv_size}")


def fit_prompt(prompt_ids: List[int], model, max_kv_size: Optional[int], truncate: bool) -> List[int]:
    """Refuse (or, when asked, left-truncate) prompts longer than the context."""
    context = model.args.max_position_embeddings
    if not prompt_ids:
        raise EchoError("the prompt is empty: pass text with --prompt or pipe it with --prompt -")
    if context is None or max_kv_size is not None or len(prompt_ids) <= context:
        return prompt_ids
    if truncate:
        return prompt_ids[-context:]
    raise EchoError(
        f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}: shorten it, "
        f"pass --max-kv-size to keep a sliding window, or --truncate-prompt to keep its last {context} tokens"
    )


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    kv_bytes: int = 0
    unshared_kv_bytes: int = 0
    producers: int = 0
    layers: int = 0
    attention: str = ""  # which attention ran (echo's decode kernel or ops) and why

    def lines(self) -> Iterable[str]:
        yield "=" * 10
        yield f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec"
        yield f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.3f} tokens-per-sec"
        yield f"Peak memory: {self.peak_memory:.3f} GB"
        saving = self.unshared_kv_bytes / self.kv_bytes if self.kv_bytes else 1.0
        yield (
            f"KV cache: {self.kv_bytes / 2**20:.2f} MiB resident in {self.producers} producer caches for "
            f"{self.layers} layers; the unshared model would hold {self.unshared_kv_bytes / 2**20:.2f} MiB "
            f"({saving:.2f}x)"
        )
        if self.attention:
            yield f"Attention: {self.attention}"


def stream(
    model,
    tokenizer,
    prompt_ids: List[int],
    *,
    cache: list,
    max_tokens: int = 100,
    sampler=None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prefill_step_size: int = 2048,
):
    """Yield text segments; the last value yielded is the Stats."""
    last = None
    dispatch.reset_usage()
    for last in stream_generate(
        model,
        tokenizer,
        mx.array(prompt_ids),
        max_tokens=max_tokens,
        sampler=sampler,
        prompt_cache=cache,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prefill_step_size=prefill_step_size,
    ):
        yield last.text
    if last is not None:
        yield Stats(
            last.prompt_tokens,
            last.prompt_tps,
            last.generation_tokens,
            last.generation_tps,
            last.peak_memory,
            kv_cache_bytes(cache),
            unshared_kv_bytes(model, cache),
            len(cache),
            len(model.layers),
            dispatch.summary(),
        )


def prefill(model, prompt_ids: List[int], cache: list, prefill_step_size: int = 2048,
            kv_bits=None, kv_group_size=64, quantized_kv_start=DEFAULT_QUANTIZED_KV_START):
    """Run a prompt through the model, filling ``cache`` (for cache-prompt)."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    ids = mx.array(prompt_ids)
    start = time.perf_counter()
    for i in range(0, len(prompt_ids), prefill_step_size):
        model(ids[None, i : i + prefill_step_size], cache=cache)
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        mx.eval([c.state for c in cache])
    return len(prompt_ids) / (time.perf_counter() - start)


def generate_batch(model, tokenizer, prompts: List[List[int]], *, max_tokens: int, sampler,
                   max_kv_size: Optional[int], batch_size: int, prefill_step_size: int = 2048):
    """Batched generation through mlx-lm's BatchGenerator; returns (texts, stats)."""
    if model.model.cyclic_blocks:
        raise EchoError(
            "batched generation supports plans whose producers sit below their consumers: "
            "run top/middle-target plans one prompt at a time (without --prompts-file)"
        )
    caches = [make_prompt_cache(model, max_kv_size) for _ in prompts]
    dispatch.reset_usage()
    response = batch_generate(
        model,
        tokenizer,
        prompts,
        prompt_caches=caches,
        max_tokens=max_tokens,
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
        prefill_step_size=prefill_step_size,
    )
    return response.texts, response.stats


def check_sampling(temp: float, top_p: float, top_k: int, min_p: float, max_tokens: int = 1):
    """Refuse values mlx-lm's sampler would take silently and misuse (e.g. a top-p of 5 keeps every token)."""
    def bad(flag, value, valid):
        return EchoError(f"{flag} {value} is out of range: use {valid}")

    if not math.isfinite(temp) or temp < 0:
        raise bad("--temp", temp, "a number >= 0 (0 = greedy)")
    if not 0 <= top_p <= 1:  # also refuses NaN
        raise bad("--top-p", top_p, "a number in [0, 1] (0 or 1 = off)")
    if not 0 <= min_p <= 1:
        raise bad("--min-p", min_p, "a number in [0, 1] (0 = off)")
    if top_k < 0:
        raise bad("--top-k", top_k, "an integer >= 0 (0 = off)")
    if max_tokens < 1:
        raise bad("--max-tokens", max_tokens, "an integer >= 1")


def sampler_from(temp: float, top_p: float, top_k: int, min_p: float):
    check_sampling(temp, top_p, top_k, min_p)
    return make_sampler(temp, top_p, min_p, top_k=top_k)
