"""`echo-mlx convert`: a pretrained LLaMA -> an echo checkpoint with a sharing plan.

Every weight is copied; consumer layers drop their k/v projections; each
producer's W_K/W_V (and biases) are either its own (``--kv-init own``) or the
mean over the layers that will attend to it (``--kv-init mean``, the MLKV /
cross-layer-study initialisation; no head alignment). EchoAtt layers drop
their q/k projections and keep their own V (the student inherits the rest,
as in the EchoAtt paper). ``--kv-init fit`` starts from ``own`` and then
fits every changed layer to the original model on calibration text
(echo_mlx.conversion.fit): the result is an ordinary echo checkpoint.
"""

import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from ..errors import EchoError
from ..io import checkpoint
from ..models.model import Model, ModelArgs
from ..models.plans import SharingPlan

KV_INIT = ("own", "mean", "fit")
DTYPES = ("float32", "float16", "bfloat16")
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def default_dtype() -> Optional[str]:
    """float32 on CPU hosts (MLX's CPU float16 and quantized matmuls are ~20x
    slower there); None = keep the source's own precision on Apple silicon."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return None
    return "float32"


def share_kv_weights(weights: dict, plan: SharingPlan, kv_init: str) -> dict:
    """Drop consumers' k/v projections; set each producer's from ``kv_init``."""
    if kv_init not in KV_INIT:
        raise EchoError(f"unknown --kv-init {kv_init!r}: use one of {', '.join(KV_INIT)}")
    kv_init = "own" if kv_init == "fit" else kv_init
    out = {k: v for k, v in weights.items() if not _is_kv(k)}
    for producer, group in plan.groups().items():
        for proj in ("k_proj", "v_proj"):
            for leaf in ("weight", "bias"):
                key = lambda i: f"model.layers.{i}.self_attn.{proj}.{leaf}"
                if key(producer) not in weights:
                    continue
                members = group if kv_init == "mean" else [producer]
                stacked = mx.stack([weights[key(i)].astype(mx.float32) for i in members])
                out[key(producer)] = stacked.mean(axis=0).astype(weights[key(producer)].dtype)
    for i in plan.attention_consumers:
        prefix = (f"model.layers.{i}.self_attn.q_proj.", f"model.layers.{i}.self_attn.k_proj.")
        out = {k: v for k, v in out.items() if not k.startswith(prefix)}
    return out


def _is_kv(key: str) -> bool:
    return ".self_attn.k_proj." in key or ".self_attn.v_proj." in key


def echo_config(source_config: dict, plan: SharingPlan, *, source: str, kv_init: str) -> dict:
    # None values dropped: transformers (reading config.json for the tokenizer) warns on rope_scaling=None.
    config = {
        k: v for k, v in source_config.items() if k not in ("model_type", "model_file") and v is not None
    }
    config.update(plan.to_config())
    config["echo"] = {"plan": plan.name or str(plan), "kv_init": kv_init, "source": source}
    return config


def build_model(config: dict, weights: dict) -> Model:
    model = Model(ModelArgs.from_dict(dict(config, model_type=checkpoint.MODEL_TYPE)))
    weights = model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise EchoError(f"source weights do not fit the model ({e}): is it a LLaMA checkpoint?")
    mx.eval(model.parameters())
    model.eval()  # inference mode, as mlx-lm's load_model leaves models (finetune calls train())
    return model


def shared_model(config: dict, weights: dict, plan: SharingPlan, *, kv_init: str = "own", source: str = ""):
    """(echo model, echo config) from an unshared llama's config and weights
    (``kv_init`` "fit" gives the unfitted start: see fitted_model)."""
    echo = echo_config(config, plan, source=source, kv_init=kv_init)
    return build_model(echo, share_kv_weights(weights, plan, kv_init)), echo


def unshared_model(src):
    """The source as an unshared echo model: the teacher of a fit or a finetune."""
    L = src.config["num_hidden_layers"]
    teacher, _ = shared_model(src.config, src.weights, SharingPlan.parse("none", L), source=src.source)
    teacher.freeze()
    return teacher


def fitted_model(src, plan: SharingPlan, *, calibration: Optional[str] = None, options=None,
                 teacher=None, cal=None, cut=None, progress: bool = False):
    """(echo model, echo config): ``plan`` converted from ``src`` (float32) and fitted to
    the original on calibration text (default: the built-in training data: corpus, chat and general sets).
    ``cal``: an echo_mlx.conversion.fit.Calibration of these windows already computed (reused across plans);
    ``cut``: the (windows, description) fit.calibration already cut from the text."""
    from . import fit

    options = (options or fit.FitOptions()).checked()
    windows, described = cut or fit.calibration(src.tokenizer, calibration, options)
    model, config = shared_model(src.config, src.weights, plan, kv_init="fit", source=src.source)
    teacher = teacher or (cal.teacher if cal else unshared_model(src))
    report = fit.fit_model(model, teacher, windows, options, described, progress=progress, cal=cal)
    config["echo"]["fit"] = report.to_json()
    return model, config


@dataclass
class Summary:
    plan: SharingPlan
    params_before: int
    params_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    dtype: str
    quantization: Optional[dict]

    def lines(self):
        p = self.plan
        lost = ", ".join(map(str, p.consumers)) or "none"
        yield f"plan: {p.name or 'custom'} = {p}"
        yield f"layers without k/v projections ({len(p.consumers)}/{p.num_layers}): {lost}"
        if p.attention_consumers:
            echo = ", ".join(f"{i}<-{p.attention_sources[i]}" for i in p.attention_consumers)
            yield f"EchoAtt layers without q/k projections ({len(p.attention_consumers)}/{p.num_layers}): {echo}"
        yield f"parameters: {self.params_before:,} -> {self.params_after:,}"
        yield (
            f"KV cache per token: {self.kv_bytes_per_token_before:,} -> "
            f"{self.kv_bytes_per_token_after:,} bytes ({p.kv_reduction:.2f}x smaller, {self.dtype})"
        )
        if self.quantization:
            q = self.quantization
            yield f"weights quantized: {q['bits']} bits, group size {q['group_size']}"


def kv_bytes_per_token(config: dict, plan: Optional[SharingPlan], dtype_size: int) -> int:
    """K and V per producer, V only per EchoAtt layer; ``None``: the unshared model."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    halves = 2 * config["num_hidden_layers"]
    if plan is not None:
        halves = 2 * len(plan.producers) - len(plan.attention_consumers)
    return n_kv * head_dim * dtype_size * halves


def convert(
    model: str = "default",
    plan: str = "none",
    *,
    kv_init: str = "own",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    out=None,
    force: bool = False,
    revision: Optional[str] = None,
    calibration: Optional[str] = None,
    fit_options=None,
    progress: bool = False,
):
    """Convert a source model; write it to ``out`` if given. Returns (model, tokenizer, config, summary).

    ``kv_init="fit"`` fits the changed layers on ``calibration`` (a UTF-8 text file;
    default: the built-in training data: corpus, chat and general sets) with ``fit_options`` (echo_mlx.conversion.fit.FitOptions)."""
    if dtype is not None and dtype not in DTYPES:
        raise EchoError(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if quantize and q_bits not in Q_BITS:
        raise EchoError(f"--q-bits {q_bits} is not supported: use one of {', '.join(map(str, Q_BITS))}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise EchoError(f"--q-group-size {q_group_size} is not supported: use 32, 64 or 128")
    if kv_init not in KV_INIT:
        raise EchoError(f"unknown --kv-init {kv_init!r}: use one of {', '.join(KV_INIT)}")
    if out is not None and Path(out).exists() and not force:
        raise EchoError(f"{out} already exists: choose another --out or pass --force to replace it")
    if kv_init == "fit" and checkpoint.is_echo_checkpoint(model):
        source = checkpoint.load_config(model).get("echo", {}).get("source", "the model it was converted from")
        raise EchoError(
            f"{model} is an echo checkpoint, so no unshared original can run as the fit's teacher: "
            f"convert from its source ({source}) with --kv-init fit"
        )

    from ..io.sources import load_source

    # Validate everything a user can get wrong before the progress bar starts,
    # so an error is one clean line.
    target_dtype = dtype or default_dtype()
    # The fit runs in float32 (its sums would lose the small differences it fits in float16).
    src = load_source(model, dtype="float32" if kv_init == "fit" else target_dtype or "float32", revision=revision)
    sharing = SharingPlan.parse(plan, src.config["num_hidden_layers"])
    if kv_init == "fit":
        from . import fit

        fit_options = (fit_options or fit.FitOptions()).checked()
        cut = fit.calibration(src.tokenizer, calibration, fit_options)  # too little text fails here

    steps = tqdm(total=3, desc="convert", disable=not progress, unit="step", leave=False)
    if kv_init == "fit":
        echo_model, config = fitted_model(src, sharing, cut=cut, options=fit_options, progress=progress)
        cast = target_dtype or ("float32" if src.source_dtype == "quantized" else src.source_dtype)
        if cast != "float32":
            echo_model.set_dtype(getattr(mx, cast))
    else:
        echo_model, config = shared_model(src.config, src.weights, sharing, kv_init=kv_init, source=src.source)
    params_after = sum(v.size for _, v in tree_flatten(echo_model.parameters()))  # before any quantization
    steps.update()

    quantization = None
    if quantize:
        quantization = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        nn.quantize(echo_model, q_group_size, q_bits, class_predicate=_quantizable(q_group_size))
    elif target_dtype is None and src.quantization:
        # Apple silicon default: keep a quantized source (e.g. GGUF Q4_1) quantized.
        quantization = dict(src.quantization, mode="affine")
        quantizable = _quantizable(src.quantization["group_size"])
        nn.quantize(
            echo_model,
            src.quantization["group_size"],
            src.quantization["bits"],
            class_predicate=lambda p, m: quantizable(p, m) and src.quantization.get(p, True),
        )
    if quantization:
        config["quantization"] = quantization
    steps.update()

    params_before = sum(v.size for v in src.weights.values())
    dtype_size = mx.array(0, dtype=getattr(mx, target_dtype or "float16")).itemsize
    summary = Summary(
        sharing,
        params_before,
        params_after,
        kv_bytes_per_token(config, None, dtype_size),
        kv_bytes_per_token(config, sharing, dtype_size),
        target_dtype or src.source_dtype,
        quantization,
    )
    if out is not None:
        checkpoint.save(out, echo_model, config, src.tokenizer, force=force)
    steps.update()
    steps.close()
    return echo_model, src.tokenizer, config, summary


def _quantizable(group_size: int):
    return lambda path, module: (
        hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
    )
