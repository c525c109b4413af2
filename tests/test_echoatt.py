"""EchoAtt: layers that reuse a lower layer's attention probabilities with their own V."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import TINY
from fixtures import CONFIG, write_hf_dir
from mlx.utils import tree_flatten
from test_convert import cli_error
from test_model import echo_model, tokens

import echo_mlx
from echo_mlx import cli
from echo_mlx.errors import EchoError
from echo_mlx.models.plans import SharingPlan, plan_id
from echo_mlx.tuner.layerwise import changed_layers
from echo_mlx.tuner.schedule import build_stages, first_changed_layer


def test_echoatt_preset_blocks_the_inner_layers():
    plan = SharingPlan.parse("echoatt:3", 10)
    # inner layers 1..8 in blocks of 3: [1 2 3] [4 5 6] [7 8]
    assert plan.attention_sources == (0, 1, 1, 1, 4, 4, 4, 7, 7, 9)
    assert plan.attention_consumers == (2, 3, 5, 6, 8)
    assert plan.kv_sources == tuple(range(10)) and plan.is_identity is False
    assert str(plan) == "0_1_2a1_3a1_4_5a4_6a4_7_8a7_9"
    assert SharingPlan.parse(str(plan), 10).attention_sources == plan.attention_sources
    # K+V for 10 layers vs K+V for 5 and V only for 5
    assert plan.kv_reduction == pytest.approx(20 / 15)


def test_plan_strings_and_configs_round_trip_the_attention_sources():
    plan = SharingPlan.parse("0_0_2_3a2_4a2_5", 6)
    assert plan.consumers == (1,) and plan.attention_consumers == (3, 4)
    config = dict(num_hidden_layers=6, **plan.to_config())
    back = SharingPlan.from_config(config)
    assert str(back) == str(plan) == "0_0_2_3a2_4a2_5"
    assert "attention_sources" not in SharingPlan.parse("cla:2", 6).to_config()
    assert plan_id(echo_model(str(plan)).args) == str(plan)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0_1a0_2_3", "may not contain layer 0"),
        ("0_1_2a3_3", "must be a layer below it"),
        ("0_1_2a1_3a2", "which itself reuses layer 1's"),
        ("0_1_1a1_3", "must compute its own V"),
        ("0_1_2a1_2", "no other layer may attend to its K/V"),
        ("0s_1s_2a1_3", "differ in sliding-window type"),
        ("echoatt:1", "block size K between 2 and"),
    ],
)
def test_malformed_echoatt_plans_are_refused(text, message):
    with pytest.raises(EchoError, match=message):
        SharingPlan.parse(text, 4)


def _causal_probabilities(attn, x):
    """softmax(Q K^T / sqrt(d) + causal mask) of layer ``attn`` on its normed input, materialised."""
    B, T, _ = x.shape
    q = attn.rope(attn.q_proj(x).reshape(B, T, attn.n_heads, -1).transpose(0, 2, 1, 3))
    k = attn.rope(attn.k_proj(x).reshape(B, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3))
    k = mx.repeat(k, attn.n_heads // attn.n_kv_heads, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * attn.scale
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    return mx.softmax(mx.where(causal, scores, -mx.inf), axis=-1)


def test_fused_attention_equals_materialised_probabilities_times_own_values():
    # echoatt:3 on 6 layers: layers 2 and 3 reuse layer 1's probabilities, layer 5 reuses 4's.
    model, x = echo_model("echoatt:3"), tokens(T=12)
    plan = SharingPlan.parse("echoatt:3", 6)
    h, kv, probabilities = model.model.embed_tokens(x), {}, {}
    for i, layer in enumerate(model.layers):
        normed = layer.input_layernorm(h)
        attn = layer.self_attn
        if i in plan.attention_sources and i not in plan.attention_consumers and i in (1, 4):
            probabilities[i] = _causal_probabilities(attn, normed)
        out = layer(h, "causal", None, kv, 0)
        if i in plan.attention_consumers:
            B, T, _ = normed.shape
            v = attn.v_proj(normed).reshape(B, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = mx.repeat(v, attn.n_heads // attn.n_kv_heads, axis=1)
            mixed = (probabilities[plan.attention_sources[i]] @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)
            after_attention = h + attn.o_proj(mixed)
            expected = after_attention + layer.mlp(layer.post_attention_layernorm(after_attention))
            assert mx.allclose(out, expected, atol=1e-5).item(), i
        h = out
    assert mx.allclose(model.model.norm(h), model.model(x), atol=1e-6).item()


def test_echoatt_layers_drop_exactly_their_query_and_key_projections():
    full = sum(v.size for _, v in tree_flatten(echo_model("none").parameters()))
    echo = sum(v.size for _, v in tree_flatten(echo_model("echoatt:2").parameters()))
    d, hd = TINY["hidden_size"], TINY["hidden_size"] // TINY["num_attention_heads"]
    per_layer = d * TINY["num_attention_heads"] * hd + d * TINY["num_key_value_heads"] * hd
    assert full - echo == len(SharingPlan.parse("echoatt:2", 6).attention_consumers) * per_layer


def test_echoatt_v_and_source_queries_get_gradients():
    model, x = echo_model("echoatt:2"), tokens(T=8)
    loss = lambda m: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()
    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert mx.abs(grads["model.layers.2.self_attn.v_proj.weight"]).sum().item() > 0
    assert mx.abs(grads["model.layers.1.self_attn.q_proj.weight"]).sum().item() > 0
    assert "model.layers.2.self_attn.q_proj.weight" not in grads


def test_quantized_cache_decode_tracks_the_float_cache():
    from mlx_lm.generate import maybe_quantize_kv_cache

    model, x = echo_model("echoatt:2", hidden_size=128), tokens(B=1, T=40)  # head dim 32: one quantization group
    caches = {}
    for bits in (None, 8):
        cache = model.make_cache()
        model(x[:, :30], cache=cache)
        if bits:
            maybe_quantize_kv_cache(cache, 0, 32, bits)
            assert type(cache[2]).__name__ == "QuantizedKVCache" and cache[2].keys[0].shape[-1] == 0
        caches[bits] = mx.concatenate([model(x[:, t : t + 1], cache=cache) for t in range(30, 40)], axis=1)
    # 8-bit K/V moves the outputs by < 0.01 here (as for plan none); reusing the source's
    # queries after mlx-lm's quantized attention scaled them in place moved them by 0.1.
    assert mx.allclose(caches[8], caches[None], atol=2e-2).item()
    assert not mx.array_equal(caches[8], caches[None])  # the quantized path really ran


def test_layerwise_and_schedules_count_echoatt_layers_as_changed():
    plan = SharingPlan.parse("echoatt:2", 6)
    assert changed_layers(plan.kv_sources, plan.attention_sources) == [1, 2, 3, 4]
    assert first_changed_layer(plan) == 1
    stages = build_stages(plan, 10, layerwise_iters=4)
    assert [s.kind for s in stages] == ["layerwise", "kd"] and stages[0].trainable_from == 1
    with pytest.raises(EchoError, match="EchoAtt plans .* use --schedule direct"):
        build_stages(plan, 10, schedule="progressive")


def test_convert_echoatt_checkpoint_loads_in_stock_mlx_lm(tmp_path):
    import mlx_lm

    source = tmp_path / "src"
    write_hf_dir(source, dtype="float32", config=dict(CONFIG, num_hidden_layers=5))
    out = tmp_path / "echo"
    cli.main(["convert", "--model", str(source), "--plan", "echoatt:3", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["attention_sources"] == [0, 1, 1, 1, 4]
    stock, tok = mlx_lm.load(str(out), trust_remote_code=True)
    assert not hasattr(stock.layers[2].self_attn, "q_proj") and hasattr(stock.layers[2].self_attn, "v_proj")
    ours, _ = echo_mlx.load(str(out))
    ids = mx.array([tok.encode("Hello world, this is a test")])
    assert mx.array_equal(stock(ids), ours(ids))


def test_convert_refuses_an_echoatt_block_containing_layer_0(tmp_path, capsys):

    source = tmp_path / "src"
    write_hf_dir(source, dtype="float32", config=dict(CONFIG, num_hidden_layers=4))
    err = cli_error(capsys, "convert", "--model", str(source), "--plan", "0_1a0_2_3", "--out", str(tmp_path / "x"))
    assert "layer 0" in err and "start blocks at layer 1" in err
    assert not (tmp_path / "x").exists()
