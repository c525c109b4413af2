"""Tiny checkpoint writers for tests: HF safetensors dirs and GGUF files.

Everything is built locally (tokenizers/sentencepiece trained on a few lines
of text, random weights), so no test touches the network. GGUF files are
written with gguf-py, llama.cpp's own writer, so the reader is checked against
the reference format and quantizers.
"""

import functools
import json
from pathlib import Path

import numpy as np

CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE = "Hello world 2024-05-17\tcafé 😀 <|im_start|>user\nhi<|im_end|>  spaced   out 12345"
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Numbers like 12345 and 2024-05-17 appear in dates, tables\tand code.",
    "Hello world! Café, naïve, über and emoji 😀 are unicode text.",
    "def main():\n    return 42  # a tiny function with    spaces",
    "Large language models share keys and values across layers.",
] * 20

# llama.cpp tensor names -> HF names (the same as mlx-lm's for llama).
_LAYER = {
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


@functools.lru_cache(None)
def bpe_tokenizer_json() -> str:
    """A byte-level BPE trained on CORPUS, shaped like SmolLM2's (digits split off)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


@functools.lru_cache(None)
def spm_model_bytes() -> bytes:
    """A SentencePiece BPE model trained with LLaMA's tokenizer.model options."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
    )
    return out.getvalue()


def bpe_vocab():
    """(tokens by id, merges as 'a b', token types) of the BPE tokenizer."""
    model = json.loads(bpe_tokenizer_json())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def spm_vocab():
    """(tokens, scores, token types) as llama.cpp's convert writes a SentencePiece vocab."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_model_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


def random_weights(vocab_size, *, tied=True, seed=0, config=CONFIG):
    """HF-named float32 weights of a random llama."""
    rng = np.random.default_rng(seed)
    h, f = config["hidden_size"], config["intermediate_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    w = {
        "model.embed_tokens.weight": rng.normal(0, 0.02, (vocab_size, h)),
        "model.norm.weight": 1 + rng.normal(0, 0.1, h),
    }
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.02, (vocab_size, h))
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }
    for i in range(config["num_hidden_layers"]):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}.weight"] = rng.normal(0, 0.05, shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"model.layers.{i}.{name}.weight"] = 1 + rng.normal(0, 0.1, h)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_hf_dir(path, *, tokenizer="json", shards=1, dtype="float16", tied=True, model_type="llama", seed=0, config=CONFIG):
    """An HF llama checkpoint dir; returns its float32 weights. tokenizer: "json", "spm" or None."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        (path / "tokenizer.model").write_bytes(spm_model_bytes())
        vocab_size, bos, eos = len(spm_vocab()[0]), 1, 2
        tok_config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
        }
    else:
        vocab_size, bos, eos = len(bpe_vocab()[0]), 1, 2
        tok_config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": SPECIALS[1],
            "eos_token": SPECIALS[2],
            "unk_token": SPECIALS[0],
            "pad_token": SPECIALS[2],
            "add_bos_token": False,
        }
        if tokenizer == "json":
            (path / "tokenizer.json").write_text(bpe_tokenizer_json())
    if tokenizer:
        tok_config["chat_template"] = CHAT_TEMPLATE
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config))

    layout = config
    config = dict(
        layout,
        model_type=model_type,
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
        torch_dtype=dtype,
    )
    (path / "config.json").write_text(json.dumps(config))

    weights = random_weights(vocab_size, tied=tied, seed=seed, config=layout)
    stored = {k: v.astype(dtype) for k, v in weights.items()}
    if shards == 1:
        save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(stored)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: stored[k] for k in names[s::shards]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": sum(v.nbytes for v in stored.values())}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return {k: v.astype(np.float32) for k, v in stored.items()}


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's q/k row permutation (HF half-split RoPE -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    """HF/mlx-lm llama name -> llama.cpp name."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{next(k for k, v in _LAYER.items() if v == module)}.{kind}"


def write_gguf(
    path,
    qtype="F16",
    *,
    vocab="gpt2",
    tied=True,
    seed=0,
    weights=None,
    permute=False,
    tensor_types=None,
    arch="llama",
    metadata=None,
):
    """A tiny llama GGUF written by gguf-py; returns the float32 source weights (HF names).

    qtype is the type of the 2-D tensors (norms stay F32, as llama.cpp writes them);
    tensor_types overrides it per HF name. permute applies llama.cpp's q/k permutation.
    """
    import gguf

    tokens = bpe_vocab()[0] if vocab == "gpt2" else spm_vocab()[0]
    weights = weights if weights is not None else random_weights(len(tokens), tied=tied, seed=seed)
    c = CONFIG
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_vocab_size(len(tokens))
    if vocab == "gpt2":
        tokens, merges, types = bpe_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0), w.add_pad_token_id(2)
        w.add_add_bos_token(False)
    else:
        tokens, scores, types = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        w.add_key_value(key, value[0], value[1])

    for name, x in weights.items():
        if permute and name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, c["num_attention_heads"])
        elif permute and name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, c["num_key_value_heads"])
        t = (tensor_types or {}).get(name, qtype if x.ndim == 2 else "F32")
        add_tensor(w, gguf_name(name), x, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def add_tensor(writer, name, x, qtype):
    """Add float32 `x` as GGML type `qtype` (a name).

    Types gguf-py cannot quantize (K-quants) get random bytes, with rows of at
    least one 256-element super-block: only good for testing their rejection.
    """
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if t == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, x.astype(np.float32))
    elif t == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, x.astype(np.float16))
    else:
        try:
            data = gguf.quants.quantize(x, t)
        except (NotImplementedError, gguf.QuantError):
            block, size = gguf.GGML_QUANT_SIZES[t]
            data = np.random.default_rng(0).integers(
                0, 256, (x.shape[0], max(1, x.shape[1] // block) * size), dtype=np.uint8
            )
        writer.add_tensor(name, data, raw_dtype=t)


def reference_dequantize(x, qtype):
    """What llama.cpp reads back for float32 `x` stored as `qtype` (gguf-py's reference code)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(x, t), t).astype(np.float32)


# Finetune tests: a 6-layer llama and settings that keep a run to seconds.
SIX = dict(CONFIG, num_hidden_layers=6)
QUICK = dict(batch_size=2, max_seq_length=64, steps_per_report=1, steps_per_eval=3, save_every=2, learning_rate=1e-3)
