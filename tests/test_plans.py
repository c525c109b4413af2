import pytest

from echo_mlx.errors import EchoError
from echo_mlx.models.plans import PRESETS, SharingPlan


def test_plan_string_round_trips():
    text = "0_0_2_2_4s_4s"
    plan = SharingPlan.parse(text, 6)
    assert str(plan) == text
    assert plan.kv_sources == (0, 0, 2, 2, 4, 4)
    assert plan.sliding == (False, False, False, False, True, True)
    assert SharingPlan.parse(str(plan), 6) == plan


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("none", "0_1_2_3_4_5_6_7"),
        ("cla:2", "0_0_2_2_4_4_6_6"),
        ("cla:3", "0_0_0_3_3_3_6_6"),
        ("lasagna-bottom:4", "0_0_2_2_4_4_6_6"),
        ("lasagna-top:4", "0_3_3_3_5_5_7_7"),
        ("pizza-bottom:3", "0_1_2_2_2_2_2_2"),
        ("pizza-top:3", "0_1_7_7_7_7_7_7"),
        ("pizza-middle:3", "0_1_4_4_4_4_4_4"),
        ("sandwich-bottom:3", "0_1_1_1_1_1_1_7"),
        ("sandwich-middle:3", "0_3_3_3_3_3_3_7"),
        ("sandwich-top:3", "0_6_6_6_6_6_6_7"),
        ("yoco", "0_1_2_3_3_3_3_3"),
        ("yoco:128", "0s_1s_2s_3_3_3_3_3"),
        ("echo:6", "0_1_2_3_4_5_5_5"),
        ("lckv:2", "0_6_6_6_6_6_6_7"),
    ],
)
def test_presets_resolve_to_the_study_layouts(preset, expected):
    assert str(SharingPlan.parse(preset, 8)) == expected


def test_study_examples_for_22_layers():
    # research/papers.md section 4, L=22, l=11
    assert str(SharingPlan.parse("pizza-bottom:11", 22)).endswith("_9_10_10_10_10_10_10_10_10_10_10_10_10")
    sandwich_top = SharingPlan.parse("sandwich-top:11", 22)
    assert sandwich_top.kv_sources[5:16] == (16,) * 11 and sandwich_top.kv_sources[16:] == tuple(range(16, 22))
    assert SharingPlan.parse("lckv:10", 22) == SharingPlan.parse("sandwich-top:11", 22).__class__(
        sandwich_top.kv_sources, sandwich_top.sliding, "lckv:10"
    )
    assert str(SharingPlan.parse("sandwich-middle:3", 22)) == "_".join(["0"] + ["10"] * 20 + ["21"])


def test_every_preset_keeps_layer_zero_and_hits_its_reduction():
    for preset in PRESETS:
        arg = {":K": ":2", ":N": ":15", ":B": ":15", "yoco:W": "yoco:64", "lckv:W": "lckv:14"}
        text = preset
        for generic, concrete in arg.items():
            text = text.replace(generic, concrete)
        plan = SharingPlan.parse(text, 30)
        assert plan.kv_sources[0] == 0 and plan.attention_sources[0] == 0
        if preset == "echoatt:K":  # K/V untouched; 14 layers cache V only
            assert len(plan.producers) == 30 and len(plan.attention_consumers) == 14
            continue
        assert len(plan.producers) == (30 if preset == "none" else 15), text
        assert all(plan.kv_sources[j] == j for j in plan.producers)


def test_cyclic_blocks_cover_every_consumer_of_a_higher_layer():
    plan = SharingPlan.parse("sandwich-middle:3", 22)
    assert plan.cyclic_blocks == [(1, 11)]  # layers 1..9 read layer 10; 11..20 read it from below
    assert SharingPlan.parse("cla:2", 8).cyclic_blocks == []
    assert SharingPlan.parse("lasagna-top:4", 8).cyclic_blocks == [(1, 4), (4, 6), (6, 8)]


@pytest.mark.parametrize(
    "text, layers, message",
    [
        ("0_0_2", 4, "has 3 entries but the model has 4 layers"),
        ("0_0_9_9", 4, "layer 2 attends to layer 9, which does not exist"),
        ("0_0_1_1", 4, "layer 2 attends to layer 1, but layer 1 computes no K/V"),
        ("1_1_2_3", 4, "layer 0 must compute its own K/V"),
        ("0_0s_2_2", 4, "differ in sliding-window type"),
        ("0s_2s_2s_3", 4, "sliding windows are supported with lower producers only"),
        ("pizzza-top:3", 8, "unknown plan"),
        ("pizza-sideways:3", 8, "the target must be one of"),
        ("cla", 8, "needs group size K between 1 and 8"),
        ("cla:0", 8, "needs group size K"),
        ("lasagna-top:1", 8, "lasagna-top needs between 2 and 8"),
        ("pizza-top:1", 8, "layer 0 must compute its own K/V"),
        ("0_-1_2", 3, "unknown plan"),
    ],
)
def test_malformed_plans_are_refused_with_one_line(text, layers, message):
    with pytest.raises(EchoError, match=message) as err:
        SharingPlan.parse(text, layers)
    assert "\n" not in str(err.value)


def test_reduction_and_groups():
    plan = SharingPlan.parse("cla:3", 9)
    assert plan.kv_reduction == 3.0
    assert plan.groups() == {0: [0, 1, 2], 3: [3, 4, 5], 6: [6, 7, 8]}
    assert plan.consumers == (1, 2, 4, 5, 7, 8)


def test_config_round_trip():
    plan = SharingPlan.parse("yoco:64", 6)
    config = dict(num_hidden_layers=6, **plan.to_config())
    back = SharingPlan.from_config(config)
    assert back.kv_sources == plan.kv_sources and back.sliding == plan.sliding
    assert back.sliding_window == 64
