"""Build transformers fast tokenizers from a model directory or GGUF metadata.

Every tokenizer returned here is a plain ``PreTrainedTokenizerFast``: its
``save_pretrained`` writes tokenizer.json with tokenizer_class
"TokenizersBackend", which mlx-lm's ``load_tokenizer`` reads back as written.
(A model class such as ``LlamaTokenizer`` would rebuild the pipeline from the
vocabulary on load and could split text differently.)
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import decoders, normalizers, pre_tokenizers

from ..errors import EchoError
from .gguf import one_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# llama.cpp pre-tokenizer names that split every digit off before the GPT-2
# regex (llama-vocab.cpp); transformers' GGUF converter does not know them.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_FIX = "copy the tokenizer files from the original model"


def load_tokenizer(model_dir) -> "PreTrainedTokenizerFast":
    """tokenizer.json (+ tokenizer_config.json), else a SentencePiece tokenizer.model."""
    from transformers import PreTrainedTokenizerFast  # slow import: only when needed

    d = Path(model_dir)
    try:
        if (d / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
        if (d / "tokenizer.model").is_file():
            return from_sentencepiece(d / "tokenizer.model", _tokenizer_config(d))
    except EchoError:
        raise
    except Exception as e:  # tokenizers/transformers/protobuf raise many types for bad files
        raise EchoError(f"could not read the tokenizer in {d} ({one_line(e)}): {_FIX}") from None
    raise EchoError(f"no tokenizer.json or tokenizer.model in {d}: {_FIX}")


def from_sentencepiece(model_file, tokenizer_config: dict | None = None) -> "PreTrainedTokenizerFast":
    """A SentencePiece BPE tokenizer.model as the same fast tokenizer llama.cpp's vocab gives."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    model_types = sentencepiece_model_pb2.TrainerSpec.ModelType
    if proto.trainer_spec.model_type != model_types.Value("BPE"):
        kind = model_types.Name(proto.trainer_spec.model_type).lower()
        raise EchoError(
            f"{model_file} is a SentencePiece {kind} model, not LLaMA's BPE: "
            "pass a llama checkpoint with tokenizer.json"
        )
    pieces = list(proto.pieces)
    spec = {
        "tokenizer_type": "llama",
        "tokens": [p.piece for p in pieces],
        "scores": [p.score for p in pieces],
        "token_type": [int(p.type) for p in pieces],  # the same enum as GGUF's token_type
    }
    t, cfg = proto.trainer_spec, tokenizer_config or {}

    def special(name, i):
        value = cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return value if value is not None else spec["tokens"][i] if 0 <= i < len(pieces) else None

    return _build(
        spec,
        bos=special("bos_token", t.bos_id),
        eos=special("eos_token", t.eos_id),
        unk=special("unk_token", t.unk_id),
        pad=special("pad_token", t.pad_id),
        chat_template=cfg.get("chat_template"),
        add_bos=cfg.get("add_bos_token", True),
        add_eos=cfg.get("add_eos_token", False),
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def from_gguf_metadata(md: dict) -> "PreTrainedTokenizerFast":
    """The tokenizer a GGUF file describes in its ``tokenizer.*`` metadata."""
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise EchoError(
            f"GGUF tokenizer type {kind!r} is not supported (gpt2 byte-level BPE and llama SentencePiece are): "
            "pass the model's Hugging Face directory, which has tokenizer.json"
        )
    spec = {"tokenizer_type": kind, "pre_tokenizer_type": md.get("tokenizer.ggml.pre"), "tokens": tokens}
    for key in ("scores", "token_type", "merges"):
        if f"tokenizer.ggml.{key}" in md:
            spec[key] = md[f"tokenizer.ggml.{key}"]

    def token(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    return _build(
        spec,
        bos=token("bos_token_id"),
        eos=token("eos_token_id"),
        unk=token("unknown_token_id"),
        pad=token("padding_token_id"),
        chat_template=md.get("tokenizer.chat_template"),
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        add_bos=md.get("tokenizer.ggml.add_bos_token", kind == "llama"),
        add_eos=md.get("tokenizer.ggml.add_eos_token", False),
        add_space_prefix=md.get("tokenizer.ggml.add_space_prefix", True),
    )


def _build(spec, *, bos, eos, unk, pad, chat_template, add_bos, add_eos, add_space_prefix):
    """transformers' GGUF converter, then llama.cpp's splitting where the converter differs."""
    try:
        backend, _ = _gguf_converter()("llama", spec)
    except Exception as e:
        raise EchoError(
            f"could not build a tokenizer from the vocabulary ({one_line(e)}): "
            "pass the model's Hugging Face directory instead"
        ) from None

    if spec["tokenizer_type"] == "gpt2" and spec.get("pre_tokenizer_type") in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if spec["tokenizer_type"] == "llama":
        # SentencePiece and llama.cpp put "▁" before every text run (also one that starts
        # with a space, and after a special token); Metaspace(prepend_scheme="first") does
        # not. This is the pipeline of LLaMA's own tokenizer.json.
        steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
        backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))

    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=chat_template,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        clean_up_tokenization_spaces=False,
    )


def _gguf_converter():
    """transformers' GGUF tokenizer converter (it moved between v4 and v5)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer


def _tokenizer_config(d: Path) -> dict:
    config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    if "chat_template" not in config and (d / "chat_template.jinja").is_file():
        config["chat_template"] = (d / "chat_template.jinja").read_text()
    return config
