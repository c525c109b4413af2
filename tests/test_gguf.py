"""echo_mlx.io.gguf on tiny GGUF files written by gguf-py (llama.cpp's writer)."""

import numpy as np
import pytest
from fixtures import CONFIG, random_weights, reference_dequantize, spm_vocab, write_gguf

from echo_mlx.errors import EchoError
from echo_mlx.io.gguf import load_gguf, mlx_name, read_tensor_info
from echo_mlx.io.tokenizer import from_gguf_metadata

gguf = pytest.importorskip("gguf")


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and ": " in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def error_bound(x, qtype):
    """Largest |dequantized - x| each element may have for type `qtype` (per block of 32)."""
    if qtype == "F32":
        return np.zeros_like(x)
    if qtype == "F16":
        return np.abs(x) * 2.0**-11 + 1e-7
    if qtype == "BF16":
        return np.abs(x) * 2.0**-8
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(1, keepdims=True)
    if qtype == "Q8_0":  # d = amax/127, rounding to d/2, plus float16 rounding of d
        bound = 0.6 * amax / 127
    elif qtype == "Q4_0":  # d = amax/8; the +amax end clamps to 7d: error up to d
        bound = 1.01 * amax / 8
    else:  # Q4_1: d = (max-min)/15, rounding to d/2, plus float16 rounding of d and min
        d = (b.max(1, keepdims=True) - b.min(1, keepdims=True)) / 15
        bound = 0.6 * d + np.abs(b.min(1, keepdims=True)) * 1e-3
    return np.broadcast_to(bound, b.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_types_dequantize_like_llama_cpp(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    source = write_gguf(path, qtype)
    g = load_gguf(path)
    assert set(g.weights) == set(source)
    for name, x in source.items():
        got = np.array(g.weights[name])
        assert got.dtype == np.float32
        t = qtype if x.ndim == 2 else "F32"  # norms stay F32, as llama.cpp writes them
        # Exactly what llama.cpp's reference code reads back (float32 scales make this exact).
        np.testing.assert_array_equal(got, reference_dequantize(x, t), err_msg=name)
        assert np.all(np.abs(got - x) <= error_bound(x, t)), name
    expected_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(qtype, "quantized")
    assert g.source_dtype == expected_dtype
    bits = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}.get(qtype)
    assert g.quantization == ({"group_size": 32, "bits": bits} if bits else None)


@pytest.mark.parametrize("vocab", ["gpt2", "llama"])
def test_config_from_metadata(tmp_path, vocab):
    write_gguf(tmp_path / "m.gguf", "Q4_1", vocab=vocab)
    g = load_gguf(tmp_path / "m.gguf")
    c = g.config
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
    ):
        assert c[key] == CONFIG[key], key
    assert c["model_type"] == "llama" and c["rope_traditional"] is True and c["rope_scaling"] is None
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in g.weights
    assert c["attention_bias"] is False and c["mlp_bias"] is False and "head_dim" not in c
    assert c["vocab_size"] == g.weights["model.embed_tokens.weight"].shape[0]
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert g.metadata["tokenizer.ggml.model"] == vocab


def test_untied_mixed_precision_and_overrides(tmp_path):
    # Like real files: 8-bit embedding, float output head, 4-bit layers.
    types = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "F16"}
    source = write_gguf(tmp_path / "m.gguf", "Q4_0", tied=False, tensor_types=types)
    g = load_gguf(tmp_path / "m.gguf")
    assert g.config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(
        np.array(g.weights["lm_head.weight"]), reference_dequantize(source["lm_head.weight"], "F16")
    )
    assert g.quantization == {
        "group_size": 32,
        "bits": 4,
        "lm_head": False,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }


def test_rope_scaling_and_head_dim_metadata(tmp_path):
    md = {
        "llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
    }
    write_gguf(tmp_path / "m.gguf", "F16", metadata=md)
    assert load_gguf(tmp_path / "m.gguf").config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    # head_dim 32 with hidden 64 and 4 heads: q/k/v/o shapes follow heads * head_dim.
    w = random_weights(len(spm_vocab()[0]))
    rng = np.random.default_rng(1)
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn"
        w[f"{p}.q_proj.weight"] = rng.normal(0, 0.05, (128, 64)).astype(np.float32)
        w[f"{p}.k_proj.weight"] = rng.normal(0, 0.05, (64, 64)).astype(np.float32)
        w[f"{p}.v_proj.weight"] = rng.normal(0, 0.05, (64, 64)).astype(np.float32)
        w[f"{p}.o_proj.weight"] = rng.normal(0, 0.05, (64, 128)).astype(np.float32)
    write_gguf(tmp_path / "hd.gguf", "F32", vocab="llama", weights=w)
    assert load_gguf(tmp_path / "hd.gguf").config["head_dim"] == 32


def test_names():
    assert mlx_name("token_embd.weight") == "model.embed_tokens.weight"
    assert mlx_name("output.weight") == "lm_head.weight"
    assert mlx_name("output_norm.weight") == "model.norm.weight"
    assert mlx_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert mlx_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert mlx_name("blk.0.ffn_gate_exps.weight") is None
    assert mlx_name("rope_freqs.weight") is None


@pytest.mark.parametrize("qtype", ["Q5_0", "Q6_K", "TQ1_0"])
def test_unsupported_tensor_type(tmp_path, qtype):
    # mx.load fails on Q5_0, turns Q6_K into float16 and silently drops TQ1_0.
    write_gguf(tmp_path / "m.gguf", "Q4_0", tensor_types={"model.layers.1.mlp.up_proj.weight": qtype})
    with pytest.raises(EchoError) as e:
        load_gguf(tmp_path / "m.gguf")
    one_line_error(e, qtype, "blk.1.ffn_up.weight", "re-export", "Q8_0")


@pytest.mark.parametrize("cut", [0.5, 0.9, 200, 30])
def test_truncated(tmp_path, cut):
    write_gguf(tmp_path / "m.gguf", "Q4_1")
    data = (tmp_path / "m.gguf").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    (tmp_path / "cut.gguf").write_bytes(data[:n])
    with pytest.raises(EchoError) as e:
        load_gguf(tmp_path / "cut.gguf")
    one_line_error(e, "truncated or corrupt", "re-download")


def test_corrupt_header_does_not_crash(tmp_path):
    # A GGUF magic followed by noise makes mx.load segfault; the header walk must stop it.
    rng = np.random.default_rng(0)
    for _ in range(10):
        (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + rng.bytes(4000))
        with pytest.raises(EchoError) as e:
            load_gguf(tmp_path / "x.gguf")
        one_line_error(e, "x.gguf")
    # Bytes changed anywhere in a real header: a clean load or a one-line EchoError, never a crash.
    write_gguf(tmp_path / "m.gguf", "Q4_1")
    data = (tmp_path / "m.gguf").read_bytes()
    header = min(i.offset for i in read_tensor_info(tmp_path / "m.gguf").values())
    for _ in range(100):
        bad = bytearray(data)
        for p in rng.integers(4, header, 3):
            bad[p] = rng.integers(0, 256)
        (tmp_path / "x.gguf").write_bytes(bad)
        try:
            from_gguf_metadata(load_gguf(tmp_path / "x.gguf").metadata)
        except EchoError as e:
            assert "\n" not in str(e) and str(e).isprintable(), str(e)


def test_not_gguf(tmp_path):
    (tmp_path / "r.gguf").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "e.gguf").write_bytes(b"")
    for name in ("r.gguf", "e.gguf"):
        with pytest.raises(EchoError) as e:
            read_tensor_info(tmp_path / name)
        one_line_error(e, "not a GGUF file")


def test_non_llama_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(EchoError) as e:
        load_gguf(tmp_path / "q.gguf")
    one_line_error(e, "qwen2", "llama")
