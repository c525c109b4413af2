"""Scale calibration (echo_mlx.tuner.rank_scales): per rank, a factor on the LoRA scale chosen on validation text."""

import json
import math

import mlx.core as mx
import pytest

from echo_mlx.api import load
from echo_mlx.errors import EchoError
from echo_mlx.tuner import adapters, rank_scales
from echo_mlx.tuner.data import builtin_examples
from echo_mlx.tuner.finetune import FinetuneArgs, evaluate, finetune, make_loss

from fixtures import QUICK
from test_finetune import cli


@pytest.mark.parametrize("best, found", [(2.25, 2.25), (1 / 1.5, 1 / 1.5), (1.0, 1.0), (100.0, 1.5**4)])
def test_the_walk_moves_by_steps_of_1_5_either_way_while_the_score_falls(best, found):
    visited = []
    loss = lambda f: (math.log(f) - math.log(best)) ** 2

    def score(f):
        visited.append(f)
        return loss(f)

    f, s = rank_scales.best_factor(score)
    assert f == pytest.approx(found) and s == min(map(loss, visited))
    assert len(visited) <= 1 + 2 + rank_scales.MAX_MOVES  # a few evaluations, not a grid


def test_a_rank_takes_the_factor_of_the_nearest_calibrated_rank_below():
    config = {"lora_parameters": {"rank_scales": {"1": 2.0, "4": 1.5, "16": 1.0}}}
    assert [rank_scales.factor(config, r) for r in (1, 3, 4, 8, 15, 16)] == [2.0, 2.0, 1.5, 1.5, 1.5, 1.0]
    assert rank_scales.factor({"lora_parameters": {}}, 3) == 1.0
    assert rank_scales.calibrated_ranks({"fine_tune_type": "dylora", "lora_parameters": {"rank": 6, "min_rank": 1}}) == [1, 2, 4, 6]
    assert rank_scales.calibrated_ranks({"fine_tune_type": "lora", "lora_parameters": {"rank": 8}}) == [8]


@pytest.mark.parametrize("fine_tune_type", ["dylora", "lora"])
def test_calibrated_factors_are_what_loading_at_each_rank_uses_and_they_lower_validation_loss(
        six_layer_source, tmp_path, fine_tune_type):
    import mlx_lm

    path = tmp_path / "run"
    finetune(FinetuneArgs(model=six_layer_source, plan="cla:2", adapter_path=str(path), iters=4, calibrate_scale=True,
                          fine_tune_type=fine_tune_type, lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0},
                          **QUICK))
    config = adapters.read_config(path)
    parameters = config["lora_parameters"]
    ranks = [1, 2, 4] if fine_tune_type == "dylora" else [4]
    assert sorted(map(int, parameters["rank_scales"])) == ranks and parameters["rank_scales"]["4"] == 1.0
    assert parameters["trained_scale"] == 10.0

    loss, settings = make_loss(None, 0.0, 1.0), FinetuneArgs(**QUICK)
    for rank in ranks:
        model, tokenizer = load(six_layer_source, plan="cla:2", adapter_path=str(path), lora_rank=rank)
        _, valid = builtin_examples(tokenizer, 64, "builtin")
        scale = parameters["scale"] * rank_scales.factor(config, rank)
        layers = rank_scales.lora_layers(model)
        assert layers and [layer.scale for layer in layers] == pytest.approx([scale] * len(layers))
        calibrated = evaluate(model, loss, valid, settings, 0, 1)
        rank_scales.set_scale(model, 10.0)
        assert calibrated <= evaluate(model, loss, valid, settings, 0, 1) + 1e-6

    # Stock mlx-lm reads only lora_parameters.scale: the calibrated scale of the largest rank, as echo-mlx runs it.
    base = tmp_path / "base"
    assert cli("convert", "--model", six_layer_source, "--plan", "cla:2", "--out", str(base)) == 0
    x = mx.array([[3, 5, 7, 11, 13, 17]])
    stock, _ = mlx_lm.load(str(base), adapter_path=str(path), trust_remote_code=True)
    ours, _ = load(six_layer_source, plan="cla:2", adapter_path=str(path))
    assert mx.allclose(stock(x), ours(x), atol=1e-4).item()


def test_calibrating_full_layers_is_one_line(six_layer_source, tmp_path):
    with pytest.raises(EchoError, match="calibrate-scale calibrates a LoRA scale"):
        finetune(FinetuneArgs(model=six_layer_source, plan="cla:2", adapter_path=str(tmp_path / "run"), iters=2,
                              fine_tune_type="full", calibrate_scale=True, **QUICK))


def test_the_config_records_the_calibration_and_a_second_one_starts_from_the_trained_scale(six_layer_source, tmp_path):
    path = tmp_path / "run"
    finetune(FinetuneArgs(model=six_layer_source, plan="cla:2", adapter_path=str(path), iters=2, calibrate_scale=True,
                          lora_parameters={"rank": 2, "scale": 10.0, "dropout": 0.0}, **QUICK))
    first = json.loads((path / adapters.CONFIG).read_text())["lora_parameters"]
    model, tokenizer = load(six_layer_source, plan="cla:2", adapter_path=str(path))
    _, valid = builtin_examples(tokenizer, 64, "builtin")
    score = lambda m: evaluate(m, make_loss(None, 0.0, 1.0), valid, FinetuneArgs(**QUICK), 0, 1)
    rank_scales.calibrate(path, model, score, progress=lambda line: None)
    again = json.loads((path / adapters.CONFIG).read_text())["lora_parameters"]
    assert again["trained_scale"] == 10.0 and again["scale"] == pytest.approx(first["scale"])
