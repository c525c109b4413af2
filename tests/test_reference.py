"""Logits match transformers' LlamaForCausalLM (torch, CPU) on random small configs."""

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from echo_mlx.conversion.convert import shared_model  # noqa: E402
from echo_mlx.models.plans import SharingPlan  # noqa: E402

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def hf_and_echo(num_kv_heads, tie, rope_scaling, seed=0):
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0} if rope_scaling is None else dict(
        rope_scaling, rope_theta=500000.0
    )
    hf_config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=tie, rope_parameters=rope,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so they are checked
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    weights = {k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}
    config = dict(
        model_type="llama", vocab_size=101, hidden_size=96, intermediate_size=160,
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tie,
        rope_theta=rope["rope_theta"], rope_scaling=rope_scaling,
    )
    plan = SharingPlan.parse("none", 3)
    ours, _ = shared_model(config, weights, plan)
    return hf, ours


@pytest.mark.parametrize(
    "num_kv_heads, tie, rope_scaling",
    [(6, True, None), (2, True, None), (3, False, None), (2, False, LLAMA3_SCALING), (1, True, LLAMA3_SCALING)],
    ids=["mha-tied", "gqa3-tied", "gqa2-untied", "gqa3-untied-llama3", "mqa-tied-llama3"],
)
def test_logits_match_transformers(num_kv_heads, tie, rope_scaling):
    hf, ours = hf_and_echo(num_kv_heads, tie, rope_scaling)
    ids = np.random.default_rng(0).integers(0, 101, size=(2, 70))  # past original_max_position_embeddings
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    got = np.array(ours(mx.array(ids)))
    assert np.abs(got - expected).max() <= 1e-4
