import pytest

from echo_mlx.errors import EchoError
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner.schedule import build_stages, first_changed_layer, progressive_plans, stage_at, stage_plan


def plan(text, L=30):
    return SharingPlan.parse(text, L)


def test_progressive_yoco_moves_boundary_and_producer_down_one_layer_per_stage():
    stages = progressive_plans(plan("yoco"))
    assert [p.kv_sources for p in stages] == [plan(f"echo:{b}").kv_sources for b in range(29, 14, -1)]


def test_progressive_cla_converts_pairs_from_the_top_keeping_producers():
    stages = progressive_plans(plan("cla:2"), layers_per_stage=2)
    assert stages[0].kv_sources == tuple(range(29)) + (28,)
    assert stages[-1] == plan("cla:2")
    for earlier, later in zip(stages, stages[1:]):
        # Each stage shares a superset of the previous stage's layers, same producers.
        assert set(earlier.consumers) < set(later.consumers)
        assert all(later.kv_sources[i] == earlier.kv_sources[i] for i in earlier.consumers)


@pytest.mark.parametrize("text", ["pizza-top:10", "sandwich-middle:8", "lasagna-bottom:3", "pizza-bottom:12"])
def test_every_stage_is_a_valid_plan_ending_at_the_target(text):
    target = plan(text)
    stages = progressive_plans(target, stages=5)
    assert stages[-1] == target and 2 <= len(stages) <= 6
    lows = [first_changed_layer(p) for p in stages]
    assert lows == sorted(lows, reverse=True)  # the frozen bottom shrinks stage by stage


def test_stage_plan_keeps_layers_below_the_boundary_unshared():
    p = stage_plan(plan("yoco"), 20)
    assert p.kv_sources[:20] == tuple(range(20)) and set(p.kv_sources[20:]) == {19}


def test_stages_split_iters_and_train_from_the_lowest_changed_layer():
    stages = build_stages(plan("yoco"), 100, schedule="progressive", stages=3)
    assert [s.first_step for s in stages] == [1, 34, 67] and stages[-1].last_step == 100
    assert stages[-1].trainable_from == 14  # the producer 15.. now read, and above
    assert [stage_at(stages, step) for step in (1, 33, 34, 100)] == [0, 0, 1, 2]
    direct = build_stages(plan("cla:2"), 10)
    assert len(direct) == 1 and direct[0].trainable_from == 0
    assert build_stages(plan("yoco"), 10, num_layers=4)[0].trainable_from == 26


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(schedule="bogus"), "--schedule"),
        (dict(schedule="progressive", stages=2, layers_per_stage=2), "not both"),
        (dict(schedule="progressive", stages=0), "--stages"),
        (dict(num_layers=31), "--num-layers"),
    ],
)
def test_bad_schedule_settings_are_one_line_errors(kwargs, words):
    with pytest.raises(EchoError, match=words):
        build_stages(plan("yoco"), 100, **kwargs)


def test_progressive_refuses_what_it_cannot_stage():
    with pytest.raises(EchoError, match="sliding-window"):
        progressive_plans(plan("yoco:64"))
    with pytest.raises(EchoError, match="nothing to adapt"):
        progressive_plans(plan("none"))
    with pytest.raises(EchoError, match="less than the"):
        build_stages(plan("yoco"), 3, schedule="progressive")
