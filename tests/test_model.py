"""The shared-KV model on tiny random llamas: equivalences that pin its semantics."""

import mlx.core as mx
import pytest
from conftest import TINY, tiny_llama_weights
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from echo_mlx.conversion.convert import share_kv_weights, shared_model
from echo_mlx.io.checkpoint import kv_cache_bytes
from echo_mlx.models.plans import SharingPlan

PLANS = ["none", "cla:2", "cla:3", "yoco", "pizza-top:3", "pizza-middle:3", "sandwich-middle:3",
         "sandwich-top:4", "lasagna-top:3", "lasagna-middle:4", "lckv:2", "0_0_2_2_2_5", "yoco:3",
         # EchoAtt, alone, with K/V sharing, and inside an iterated block (layer 3 reuses layer 2,
         # which attends to layer 5 above it)
         "echoatt:2", "echoatt:3", "0_0_2_3a2_4a2_5", "0_1_5_3a2_5_5"]


def echo_model(plan, kv_init="own", **overrides):
    weights = tiny_llama_weights(**overrides)
    config = dict(TINY, **overrides)
    sharing = SharingPlan.parse(plan, config["num_hidden_layers"])
    return shared_model(config, weights, sharing, kv_init=kv_init)[0]


def tokens(B=2, T=9, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(0, TINY["vocab_size"], (B, T))


def test_plan_none_equals_mlx_lm_llama():
    weights = tiny_llama_weights()
    reference = llama.Model(llama.ModelArgs(**TINY))
    reference.load_weights(list(weights.items()))
    x = tokens(T=16)
    assert mx.array_equal(echo_model("none")(x), reference(x))


@pytest.mark.parametrize("plan", PLANS)
def test_cached_decode_equals_uncached_forward(plan):
    # T=9 <= forward_passes + backward_passes, so the parallel forward of a
    # cyclic plan is exact too.
    model, x = echo_model(plan), tokens(T=9)
    full = model(x)
    cache = model.make_cache()
    steps = [model(x[:, :4], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(4, 9)]
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-5).item()


@pytest.mark.parametrize("plan", ["pizza-top:3", "sandwich-middle:3", "lasagna-top:3", "lckv:2"])
def test_iterative_forward_equals_sequential_for_short_prompts(plan):
    model = echo_model(plan)
    for T in (1, 2, 5, 9):
        x = tokens(T=T, seed=T)
        cache = model.make_cache()
        sequential = mx.concatenate([model(x[:, t : t + 1], cache=cache) for t in range(T)], axis=1)
        assert mx.allclose(model(x), sequential, atol=1e-5).item(), T


def test_iterative_forward_is_not_exact_beyond_its_passes():
    # Guards the test above: with too few passes the two computations differ.
    model = echo_model("pizza-top:3")
    x = tokens(T=8)
    model.model.args.forward_passes, model.model.args.backward_passes = 2, 1
    cache = model.make_cache()
    sequential = mx.concatenate([model(x[:, t : t + 1], cache=cache) for t in range(8)], axis=1)
    assert not mx.allclose(model(x), sequential, atol=1e-5).item()


def test_first_token_of_a_cyclic_consumer_sees_no_keys():
    # Layer 2 attends to layer 5 above it: the first token's attention output is zero,
    # so changing layer 5's K/V weights cannot change position 0 at all.
    model = echo_model("0_1_5_5_5_5")
    x = tokens(T=4)
    before = model(x)
    attn = model.layers[5].self_attn
    attn.k_proj.weight = attn.k_proj.weight * 3
    after = model(x)
    assert mx.array_equal(before[:, 0], after[:, 0])
    assert not mx.allclose(before[:, 1:], after[:, 1:]).item()


@pytest.mark.parametrize("plan", PLANS)
def test_consumers_hold_no_kv_parameters(plan):
    model = echo_model(plan)
    sharing = SharingPlan.parse(plan, 6)
    names = {k for k, _ in tree_flatten(model.parameters())}
    for i in range(6):
        has = lambda proj: f"model.layers.{i}.self_attn.{proj}.weight" in names
        echo = i in sharing.attention_consumers
        assert has("k_proj") == (i in sharing.producers and not echo)
        assert has("v_proj") == (i in sharing.producers)
        assert has("q_proj") == (not echo)


@pytest.mark.parametrize("plan", ["cla:2", "cla:3", "yoco", "sandwich-top:4", "lckv:2", "echoatt:2", "0_0_2_3a2_4a2_5"])
def test_kv_cache_bytes_shrink_exactly_by_the_plan(plan):
    x = tokens(B=1, T=300)
    sizes = {}
    for p in ("none", plan):
        model = echo_model(p)
        cache = model.make_cache()
        model(x, cache=cache)  # nbytes needs shapes only: no eval
        sizes[p] = kv_cache_bytes(cache)
    sharing = SharingPlan.parse(plan, 6)
    assert sizes[plan] * sharing.kv_reduction == pytest.approx(sizes["none"])
    halves = 2 * len(sharing.producers) - len(sharing.attention_consumers)  # K+V per producer, V per EchoAtt layer
    assert sizes[plan] * 12 == sizes["none"] * halves


def test_mean_init_averages_the_group_and_own_init_copies():
    weights = tiny_llama_weights()
    sharing = SharingPlan.parse("cla:3", 6)
    own = share_kv_weights(weights, sharing, "own")
    mean = share_kv_weights(weights, sharing, "mean")
    key = lambda i: f"model.layers.{i}.self_attn.k_proj.weight"
    assert mx.array_equal(own[key(3)], weights[key(3)])
    expected = (weights[key(3)] + weights[key(4)] + weights[key(5)]) / 3
    assert mx.allclose(mean[key(3)], expected, atol=1e-6).item()
    assert key(4) not in own and key(4) not in mean


def test_gradients_reach_producers_through_consumers_without_cache():
    import mlx.nn as nn

    model = echo_model("pizza-top:3")
    x = tokens(T=6)

    def loss(m):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    # layer 5 produces the K/V that layers 2..4 read from above
    assert mx.abs(grads["model.layers.5.self_attn.k_proj.weight"]).sum().item() > 0
    assert mx.abs(grads["model.layers.2.self_attn.q_proj.weight"]).sum().item() > 0
