"""Layer-wise distillation (echo_mlx.tuner.layerwise) on a tiny random llama."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from echo_mlx.conversion.convert import shared_model
from echo_mlx.errors import EchoError
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan
from echo_mlx.tuner import adapters
from echo_mlx.tuner.finetune import FinetuneArgs, finetune
from echo_mlx.tuner.layerwise import changed_layers, layer_scales, make_layerwise_loss, teacher_states
from echo_mlx.tuner.schedule import build_stages

from fixtures import QUICK



def models(six_layer_source, plan, kv_init="own"):
    src = load_source(six_layer_source)
    teacher, _ = shared_model(src.config, src.weights, SharingPlan.parse("none", 6))
    teacher.freeze()
    student, _ = shared_model(src.config, src.weights, SharingPlan.parse(plan, 6), kv_init=kv_init)
    return teacher, student


def batch(seed=0, T=24):
    mx.random.seed(seed)
    tokens = mx.random.randint(0, 50, (2, T + 1))
    return tokens, mx.array([[0, T], [0, T - 5]])


def test_changed_layers_are_consumers_and_the_producers_they_read():
    assert changed_layers(SharingPlan.parse("echo:4", 6).kv_sources) == [3, 4, 5]
    assert changed_layers(SharingPlan.parse("cla:2", 6).kv_sources) == [0, 1, 2, 3, 4, 5]
    assert changed_layers(SharingPlan.parse("none", 6).kv_sources) == []


def test_teacher_states_end_in_the_teachers_final_hidden_state(six_layer_source):
    teacher, _ = models(six_layer_source, "none")
    tokens, _ = batch()
    states = teacher_states(teacher, tokens)
    assert len(states) == 7
    assert mx.allclose(teacher.model.norm(states[-1]), teacher.model(tokens), atol=1e-5)


def test_loss_is_the_mean_relative_error_of_the_changed_layers(six_layer_source):
    # echo:4 with own K/V: producer 3 keeps its weights and its output, so its term is 0;
    # consumers 4 and 5 get the teacher's h_4/h_5 and the producer's K/V of h_3.
    teacher, student = models(six_layer_source, "echo:4")
    tokens, lengths = batch()
    kv_sources = student.args.kv_sources
    scales = layer_scales(teacher, tokens[:, :-1], changed_layers(kv_sources))
    total, count = make_layerwise_loss(teacher, kv_sources, scales)(student, tokens, lengths)
    assert count.item() == 24 + 19

    h = teacher_states(teacher, tokens[:, :-1])
    kv = {}
    student.layers[3](h[3], "causal", None, kv, 0)
    expected = 0.0
    for i, k in ((4, 1), (5, 2)):
        err = ((student.layers[i](h[i], "causal", None, kv, 0) - h[i + 1]) ** 2).mean(-1) / scales[k]
        expected = expected + err
    mask = mx.arange(1, 25) <= lengths[:, 1:]
    expected = ((expected / 3) * mask).sum()
    assert total.item() > 0 and abs(total.item() - expected.item()) < 1e-4 * expected.item()


def test_gradients_reach_only_the_changed_layers(six_layer_source):
    teacher, student = models(six_layer_source, "echo:4")
    adapters.make_trainable(student, "full", 2, {})  # layer 2 trains but is not in the loss
    tokens, lengths = batch()
    kv_sources = student.args.kv_sources
    loss = make_layerwise_loss(teacher, kv_sources, layer_scales(teacher, tokens[:, :-1], [3, 4, 5]))
    _, grads = nn.value_and_grad(student, loss)(student, tokens, lengths)
    norms = {}
    for name, g in tree_flatten(grads):
        layer = int(name.split(".")[2])
        norms[layer] = norms.get(layer, 0.0) + (g * g).sum().item()
    assert set(norms) == {2, 3, 4, 5}  # frozen layers 0-1: no entries at all
    assert norms[2] == 0.0 and min(norms[3], norms[4], norms[5]) > 0


def test_schedule_opens_with_layerwise_steps_and_refuses_bad_combinations():
    plan = SharingPlan.parse("cla:2", 6)
    stages = build_stages(plan, 10, layerwise_iters=4)
    assert [(s.kind, s.first_step, s.last_step) for s in stages] == [("layerwise", 1, 4), ("kd", 5, 10)]
    with pytest.raises(EchoError, match="--schedule direct"):
        build_stages(plan, 10, schedule="progressive", layerwise_iters=4)
    with pytest.raises(EchoError, match="between 1 and"):
        build_stages(plan, 10, layerwise_iters=10)


# echoatt:2, and EchoAtt whose source (1) is a K/V consumer: it must run before layer 2.
@pytest.mark.parametrize("plan", ["cla:2", "pizza-top:2", "echoatt:2"])
def test_finetune_opens_with_layerwise_steps_then_kd(six_layer_source, tmp_path, plan):
    # pizza-top reads K/V from above: teacher forcing needs no iterative passes.
    run_dir = tmp_path / "run"
    result = finetune(FinetuneArgs(model=six_layer_source, plan=plan, kv_init="mean", fine_tune_type="full", iters=10,
                                   layerwise_iters=6, layerwise_learning_rate=2e-3, adapter_path=str(run_dir), **QUICK))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records if "train_loss" in r] == ["layerwise"] * 6 + ["kd"] * 4
    assert {round(r["learning_rate"], 6) for r in records if r.get("kind") == "layerwise"} == {2e-3}
    assert {round(r["learning_rate"], 6) for r in records if r.get("kind") == "kd"} == {1e-3}
    # Both phases train the target plan: the best validation of either is kept.
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert json.loads((run_dir / "best.json").read_text())["val_loss"] == min(val) == result.best_val_loss
    assert result.best_val_loss is not None and (run_dir / "loss.png").exists()
    assert (run_dir / "adapters.safetensors").exists()


# A random llama's attention maps are near uniform, so echoatt:2 starts almost exact
# (relative error 0.02): Adam's sign-sized first steps overshoot there, plain SGD descends.
@pytest.mark.parametrize("plan, optimizer, ratio", [("cla:2", "Adam", 0.5), ("pizza-top:2", "Adam", 0.5),
                                                     ("0_0_2a1_3_4a3_5", "Adam", 0.5), ("echoatt:2", "SGD", 0.75)])
def test_layerwise_steps_fit_the_teachers_layers(six_layer_source, plan, optimizer, ratio):
    import mlx.optimizers as optim

    teacher, student = models(six_layer_source, plan, kv_init="mean")
    kv_sources, attention_sources = student.args.kv_sources, student.args.attention_sources
    adapters.make_trainable(student, "full", 0, {})
    tokens, lengths = batch()
    scales = layer_scales(teacher, tokens[:, :-1], changed_layers(kv_sources, attention_sources))
    loss = make_layerwise_loss(teacher, kv_sources, scales, attention_sources)
    value_and_grad, optimizer = nn.value_and_grad(student, loss), getattr(optim, optimizer)(learning_rate=1e-3)
    first = None
    for _ in range(15):
        (total, count), grads = value_and_grad(student, tokens, lengths)
        optimizer.update(student, grads)
        first = first if first is not None else total.item()
    assert total.item() < ratio * first


def test_resume_across_the_layerwise_boundary_matches(six_layer_source, tmp_path):
    kw = dict(plan="cla:2", iters=8, layerwise_iters=4, fine_tune_type="full")
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "a"), **QUICK, **kw))
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "b"), **QUICK, **kw), stop_after=3)
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "b"), resume=True, **QUICK, **kw))
    curve = lambda d: [json.loads(l).get("train_loss") for l in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert curve(tmp_path / "a") == curve(tmp_path / "b")


def test_layerwise_needs_a_teacher(six_layer_source, tmp_path):
    with pytest.raises(EchoError, match="needs a teacher"):
        finetune(FinetuneArgs(model=six_layer_source, plan="cla:2", teacher="none", kd_alpha=0.0, iters=4, layerwise_iters=2,
                              adapter_path=str(tmp_path / "run"), **QUICK))
