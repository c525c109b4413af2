"""Read a llama GGUF file (llama.cpp's format) into mlx-lm llama weights.

``mx.load`` does the reading and turns Q4_0/Q4_1/Q8_0 into MLX affine triples
(uint32 ``.weight``, ``.scales``, ``.biases``, group 32). It does not say which
GGML type each tensor had, silently converts BF16 and K-quants to float16,
drops some types and can crash on a corrupt header, so we first walk the header
ourselves: that checks the file is whole and tells us every tensor's type.
"""

import math
import mmap
import struct
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import EchoError

# GGML tensor type ids (ggml.h), for messages.
GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}
# The types we read: id -> (elements per block, bytes per block).
BLOCK_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 30: (1, 2)}
QUANT_BITS = {2: 4, 3: 4, 8: 8}  # what mx.load makes of each GGML quant type
GROUP_SIZE = 32

# GGUF metadata value types -> struct format (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class TensorInfo(NamedTuple):
    type: int  # GGML type id
    shape: tuple  # numpy order (rows, cols), as mx.load returns it
    offset: int  # absolute byte offset of the data in the file


class GGUFModel(NamedTuple):
    config: dict
    weights: dict  # mlx-lm llama names -> float32 arrays
    metadata: dict  # GGUF metadata as plain Python values
    source_dtype: str
    quantization: dict | None


class _Corrupt(Exception):
    pass


def read_tensor_info(path) -> dict[str, TensorInfo]:
    """Walk the GGUF header; {name: TensorInfo}. EchoError if the file is not a whole GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EchoError(
                    f"{path} is not a GGUF file (no GGUF magic): pass a .gguf file from llama.cpp or another --model"
                )
            if size < 24:
                raise _corrupt(path, "header cut short")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise EchoError(
            f"cannot read {path} ({one_line(e.strerror or e)}): check the path and its permissions"
        ) from None
    try:
        return _parse(buf, size, path)
    except (_Corrupt, struct.error, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise _corrupt(path, str(e) or "header runs past the end of the file") from None
    finally:
        buf.close()


def one_line(text, limit=200) -> str:
    """`text` (an error from a library, maybe with file bytes in it) as one short printable line."""
    if isinstance(text, BaseException):
        text = str(text) or type(text).__name__
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path, why):
    why = one_line(why)
    return EchoError(f"GGUF file {path} is truncated or corrupt ({why}): re-download it or pass another --model")


def _parse(buf, size, path):
    pos = 4

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v

    def skip_string():
        nonlocal pos
        n = take("Q")
        if pos + n > size:
            raise _Corrupt("string runs past the end of the file")
        pos += n
        return pos - n

    def string():
        start = skip_string()
        return bytes(buf[start:pos]).decode("utf-8", errors="replace")

    def value(vtype):
        # Returns scalars; skips strings and arrays (token lists are long) without decoding them.
        nonlocal pos
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == 8:
            return skip_string()
        if vtype != 9:
            raise _Corrupt(f"unknown metadata value type {vtype}")
        etype, n = take("I"), take("Q")
        if etype in _SCALARS:
            pos += n * struct.calcsize("<" + _SCALARS[etype])
            if pos > size:
                raise _Corrupt("metadata array runs past the end of the file")
        elif etype == 8:
            for _ in range(n):
                (length,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + length
                if pos > size:
                    raise _Corrupt("metadata array runs past the end of the file")
        else:
            for _ in range(n):
                value(etype)

    version = take("I")
    if version not in (2, 3):
        raise EchoError(
            f"GGUF file {path} has version {version}, which echo-mlx cannot read: "
            "re-export it with a current llama.cpp (GGUF v3)"
        )
    n_tensors, n_kv = take("Q"), take("Q")
    if n_tensors > size // 8 or n_kv > size // 8:
        raise _Corrupt("tensor or metadata count exceeds the file size")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("I"))
        if key == "general.alignment":
            alignment = v
    if not isinstance(alignment, int) or alignment <= 0:
        raise _Corrupt(f"bad alignment {alignment}")

    infos = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        dims = [take("Q") for _ in range(n_dims)]
        ttype, offset = take("I"), take("Q")
        if ttype not in GGML_TYPES:
            raise _Corrupt(f"tensor {name!r} has unknown type id {ttype}")
        infos[name] = (ttype, tuple(reversed(dims)), offset)

    data_start = -(-pos // alignment) * alignment
    out = {}
    for name, (ttype, shape, offset) in infos.items():
        if ttype not in BLOCK_SIZES:
            raise EchoError(
                f"GGUF file {path}: tensor {name!r} has type {GGML_TYPES[ttype]}, which echo-mlx cannot read: "
                "re-export the model as F16/Q8_0/Q4_0/Q4_1 (e.g. llama-quantize --allow-requantize IN OUT Q8_0)"
            )
        block, block_bytes = BLOCK_SIZES[ttype]
        if shape[-1] % block:
            raise _Corrupt(f"tensor {name!r} row length {shape[-1]} is not a multiple of {block}")
        end = data_start + offset + math.prod(shape) // block * block_bytes  # Python ints: no overflow
        if end > size:
            raise _Corrupt(f"tensor {name!r} runs past the end of the file")
        out[name] = TensorInfo(ttype, shape, data_start + offset)
    return out


def _plain(v):
    """mx.load metadata values (0-d arrays, arrays, lists, str) as Python values."""
    if isinstance(v, mx.array):
        if v.dtype == mx.float32 and v.ndim == 0:
            return float(str(np.float32(v.item())))  # 1e-05, not 9.999999747378752e-06
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def mlx_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if not a llama tensor."""
    base, kind = gguf_name.rsplit(".", 1) if "." in gguf_name else (gguf_name, "")
    if kind not in ("weight", "bias"):
        return None
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def _mx_load(path):
    try:  # format: a GGUF need not be named *.gguf
        raw, md = mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise _corrupt(path, e) from None
    return raw, {k: _plain(v) for k, v in md.items()}


def read_metadata(path) -> dict:
    """A GGUF file's metadata as plain Python values (e.g. for ``tokenizer.from_gguf_metadata``)."""
    read_tensor_info(path)
    return _mx_load(path)[1]


def load_gguf(path) -> GGUFModel:
    """Config, float32 weights, metadata and quantization of a llama GGUF file."""
    path = Path(path)
    infos = read_tensor_info(path)
    raw, md = _mx_load(path)

    arch = md.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise EchoError(
            f"GGUF file {path} holds a {arch!r} model: echo-mlx ports LLaMA-architecture models only; pass a llama GGUF"
        )
    if md.get(f"{arch}.expert_count", 0):
        raise EchoError(
            f"GGUF file {path} is a mixture-of-experts model: echo-mlx ports dense LLaMA models only; "
            "pass a dense llama GGUF"
        )
    if "rope_freqs.weight" in infos:
        raise EchoError(
            f"GGUF file {path} uses llama3 RoPE frequency factors (rope_freqs.weight), which echo-mlx cannot map back: "
            "pass the model's Hugging Face safetensors directory or repo id instead"
        )

    weights, bits = {}, {}
    for name, info in infos.items():
        target = mlx_name(name)
        if target is None:
            raise EchoError(
                f"GGUF file {path} has tensor {name!r}, which a plain llama model does not have: pass a llama GGUF"
            )
        weights[target] = _read_tensor(path, name, info, raw)
        if target.endswith(".weight") and len(info.shape) == 2:
            bits[target[: -len(".weight")]] = QUANT_BITS.get(info.type)
    mx.eval(weights)
    del raw

    config = _config(md, weights, arch, path)
    return GGUFModel(config, weights, md, _source_dtype(infos), _quantization(bits))


def _read_tensor(path, name, info, raw):
    if info.type in QUANT_BITS:
        base = name[: -len(".weight")]
        try:
            w, s, b = raw[name], raw[base + ".scales"], raw[base + ".biases"]
        except KeyError:
            raise _corrupt(path, f"mx.load returned no quantized data for {name!r}") from None
        # float32 scales/biases: dequantizing in their float16 gives other values than llama.cpp.
        w = mx.dequantize(
            w, s.astype(mx.float32), b.astype(mx.float32), group_size=GROUP_SIZE, bits=QUANT_BITS[info.type]
        )
    elif info.type == 30:
        # mx.load turns BF16 into float16 (lossy, can overflow); BF16 -> float32 is exact from the raw bits.
        n = math.prod(info.shape)
        bits16 = np.fromfile(path, dtype="<u2", count=n, offset=info.offset).astype(np.uint32)
        w = mx.array((bits16 << 16).view(np.float32).reshape(info.shape))
    elif name in raw:
        w = raw[name]
    else:
        raise _corrupt(path, f"mx.load returned no data for {name!r}")
    if tuple(w.shape) != info.shape:
        raise _corrupt(path, f"tensor {name!r} has shape {tuple(w.shape)}, expected {info.shape}")
    return w.astype(mx.float32)


def _config(md, weights, arch, path):
    def get(key, default=None, required=True):
        v = md.get(f"{arch}.{key}", default)
        if v is None and required:
            raise EchoError(
                f"GGUF file {path} lacks metadata {arch}.{key}: "
                "re-export it with a current llama.cpp convert_hf_to_gguf.py"
            )
        return v

    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise EchoError(
            f"GGUF file {path} has per-layer head counts: echo-mlx ports plain llama models only; pass a llama GGUF"
        )
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads > 0 and kv_heads > 0):
        raise _corrupt(path, f"head counts {heads}/{kv_heads}")
    hidden = get("embedding_length")
    if "model.embed_tokens.weight" not in weights or "model.layers.0.self_attn.q_proj.weight" not in weights:
        raise EchoError(f"GGUF file {path} lacks token_embd or blk.0.attn_q tensors: pass a complete llama GGUF")
    q_rows = weights["model.layers.0.self_attn.q_proj.weight"].shape[0]
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "rope_theta": get("rope.freq_base", 10000.0),
        # llama.cpp permutes q/k rows for interleaved ("traditional") RoPE.
        "rope_traditional": True,
        "rope_scaling": _rope_scaling(md, arch, path),
        "max_position_embeddings": get("context_length", required=False),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in weights,
        "mlp_bias": "model.layers.0.mlp.gate_proj.bias" in weights,
    }
    if q_rows != hidden:  # head_dim differs from hidden/heads (also in attention.key_length)
        config["head_dim"] = q_rows // heads
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in md:
            config[key] = md[f"tokenizer.ggml.{key}"]
    return config


def _rope_scaling(md, arch, path):
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    if kind is None and md.get(f"{arch}.rope.scale_linear"):  # older files
        kind, factor = "linear", md[f"{arch}.rope.scale_linear"]
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return None if factor in (None, 0, 1.0) else {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        orig = md.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = orig
        for key in ("beta_fast", "beta_slow"):
            if f"{arch}.rope.scaling.yarn_{key}" in md:
                scaling[key] = md[f"{arch}.rope.scaling.yarn_{key}"]
        return scaling
    raise EchoError(
        f"GGUF file {path} uses RoPE scaling {kind!r}, which echo-mlx does not map: "
        "pass the Hugging Face safetensors model instead"
    )


def _source_dtype(infos):
    types = {i.type for i in infos.values() if len(i.shape) == 2}
    if types & set(QUANT_BITS):
        return "quantized"
    return "bfloat16" if 30 in types else "float16" if 1 in types else "float32"


def _quantization(bits):
    """mlx-lm style: the most common bits as default, other modules as per-path overrides."""
    quantized = {p: b for p, b in bits.items() if b}
    if not quantized:
        return None
    default = Counter(quantized.values()).most_common(1)[0][0]
    quant = {"group_size": GROUP_SIZE, "bits": default}
    for p, b in sorted(bits.items()):
        if b is None:
            quant[p] = False  # stored in float in this file: keep it unquantized
        elif b != default:
            quant[p] = {"group_size": GROUP_SIZE, "bits": b}
    return quant
