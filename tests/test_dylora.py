"""Dynamic-rank adapters (echo_mlx.tuner.dylora): one run, any rank 1..R at deploy time."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from echo_mlx.api import load
from echo_mlx.errors import EchoError
from echo_mlx.tuner import adapters
from echo_mlx.tuner.dylora import DyLoRALinear, RankRange, dynamic_layers, scale_updates, set_rank
from echo_mlx.tuner.finetune import FinetuneArgs, finetune

from fixtures import QUICK
from test_finetune import cli

DYLORA = dict(fine_tune_type="dylora", lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0})


def layer(max_rank=6, dtype=mx.float64, seed=0, rank_scaling="constant"):
    mx.random.seed(seed)
    with mx.stream(mx.cpu):
        lora = LoRALinear.from_base(nn.Linear(8, 5), r=max_rank, scale=3.0)
        lora.lora_b = mx.random.normal(lora.lora_b.shape)  # trained-looking: B is zero at initialisation
        lora.set_dtype(dtype)
    return DyLoRALinear.from_lora(lora, rank_scaling)


def run(source, path, **kw):
    return finetune(FinetuneArgs(model=source, adapter_path=str(path), **dict(QUICK, **dict(DYLORA, **kw))))


@pytest.mark.parametrize("rank_scaling", ["inverse", "constant"])
def test_a_rank_b_forward_is_the_first_b_components_of_the_full_adapter(rank_scaling):
    dy = layer(rank_scaling=rank_scaling)
    x = mx.random.normal((3, 8)).astype(mx.float64)
    with mx.stream(mx.cpu):  # float64 runs on the CPU
        base = np.array(dy.linear(x))
        a, b, xs = np.array(dy.lora_a), np.array(dy.lora_b), np.array(x)
        for rank in range(1, dy.max_rank + 1):
            dy.active_rank = rank
            components = sum(np.outer(xs @ a[:, i], b[i]).reshape(3, 5) for i in range(rank))
            scale = 3.0 * (6 / rank if rank_scaling == "inverse" else 1)  # DyLoRA's alpha / b, or one scale
            assert np.allclose(np.array(dy(x)), base + scale * components, rtol=0, atol=1e-12)
            # ... and exactly what mlx-lm's LoRA of rank b computes with the truncated arrays.
            plain = LoRALinear.from_base(dy.linear, r=rank, scale=scale)
            plain.lora_a, plain.lora_b = dy.lora_a[:, :rank], dy.lora_b[:rank]
            assert mx.array_equal(plain(x), dy(x)).item()


def test_gradients_reach_only_the_sampled_components():
    dy = layer(dtype=mx.float32)
    dy.freeze(keys=["linear"])
    x = mx.random.normal((4, 8))
    for rank in (1, 3, 6):
        dy.active_rank = rank
        grads = dict(tree_flatten(nn.value_and_grad(dy, lambda m, x: (m(x) ** 2).sum())(dy, x)[1]))
        assert set(grads) == {"lora_a", "lora_b"}
        assert mx.all(grads["lora_a"][:, rank:] == 0).item() and mx.all(grads["lora_b"][rank:] == 0).item()
        assert mx.all(mx.any(grads["lora_a"][:, :rank] != 0, axis=0)).item()
        assert mx.all(mx.any(grads["lora_b"][:rank] != 0, axis=1)).item()


@pytest.mark.parametrize("rank_scaling", ["inverse", "constant"])
def test_per_example_ranks_give_each_example_its_own_rank_adapter_and_gradients(rank_scaling):
    dy = layer(rank_scaling=rank_scaling)
    x = mx.random.normal((4, 3, 8), key=mx.random.key(1)).astype(mx.float64)
    ranks = (2, 6, 1, 4)
    with mx.stream(mx.cpu):
        set_rank(dy, ranks)
        together = dy(x)
        for i, rank in enumerate(ranks):
            set_rank(dy, rank)
            assert np.allclose(np.array(together[i]), np.array(dy(x[i : i + 1])[0]), rtol=0, atol=1e-12)
    assert "active_rank" not in dict(tree_flatten(dy.parameters()))  # the ranks are not a parameter
    dy = layer(dtype=mx.float32)
    dy.freeze(keys=["linear"])
    x = mx.random.normal((2, 5, 8), key=mx.random.key(2))
    gradient = lambda x: dict(tree_flatten(nn.value_and_grad(dy, lambda m, x: (m(x) ** 2).sum())(dy, x)[1]))
    set_rank(dy, (1, 3))  # components past the batch's largest rank take no gradient
    grads = gradient(x)
    assert mx.all(grads["lora_a"][:, 3:] == 0).item() and mx.all(grads["lora_b"][3:] == 0).item()
    assert mx.all(mx.any(grads["lora_b"][:3] != 0, axis=1)).item()
    # ... and components 1 and 2 learn from the rank-3 example alone.
    set_rank(dy, (3,))
    alone = gradient(x[1:])
    assert np.allclose(np.array(grads["lora_b"][1:3]), np.array(alone["lora_b"][1:3]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.array(grads["lora_b"][0]), np.array(alone["lora_b"][0]), rtol=1e-3)


def test_per_example_draws_cover_the_range_and_are_reproducible():
    ranks = RankRange.from_parameters({"rank": 16, "rank_sampling": "powers", "rank_draw": "example"})
    draws = [ranks.sample_examples(0, step, 0, 4) for step in range(1, 50)]
    assert all(len(set(d)) == 4 and set(d) <= {1, 2, 4, 8, 16} for d in draws)  # no rank twice in a batch of 4
    assert draws == [ranks.sample_examples(0, step, 0, 4) for step in range(1, 50)]
    assert draws != [ranks.sample_examples(0, step, 1, 4) for step in range(1, 50)]  # micro-batches differ
    assert sorted(ranks.sample_examples(3, 1, 0, 10)) == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]
    log = RankRange.from_parameters({"rank": 16, "rank_sampling": "log"})
    assert log.buckets() == [[1], [2, 3], [4, 5, 6, 7], list(range(8, 16)), [16]] and log.choices() == list(range(1, 17))
    octave = lambda r: min(r.bit_length() - 1, 4)  # 1 -> 0, 2..3 -> 1, ..., 16 -> 4
    batches = [log.sample_examples(0, step, 0, 5) for step in range(1, 60)]
    assert all(sorted(map(octave, b)) == [0, 1, 2, 3, 4] for b in batches)  # every octave in each batch of 5
    assert set().union(*batches) == set(range(1, 17))  # ... and every rank drawn
    assert set(log.sample(0, step) for step in range(1, 400)) == set(range(1, 17))
    with pytest.raises(EchoError, match="unknown rank_draw"):
        RankRange.from_parameters({"rank": 4, "rank_draw": "batch"})


def test_min_rank_weight_draws_the_lowest_bucket_that_many_times_as_often():
    heavy = RankRange.from_parameters({"rank": 16, "min_rank_weight": 2, "rank_draw": "example"})
    assert heavy.buckets() == [[1], [1], [2, 3], [4, 5, 6, 7], list(range(8, 16)), [16]]
    draws = [r for step in range(1, 2001) for r in heavy.sample_examples(0, step, 0, 6)]
    assert draws.count(1) == 2 * 2000 and draws.count(16) == 2000  # a batch of 6 takes each bucket once
    assert heavy.component_shares()[1] == pytest.approx(4 / 6)  # rank 1 drawn 2 times in 6: component 2 trained 4 in 6


def test_rank_ranges_their_draws_and_bad_ranges():
    assert RankRange.from_parameters({"rank": 16}).choices() == list(range(1, 17))
    powers = RankRange.from_parameters({"rank": 12, "min_rank": 2, "rank_sampling": "powers"})
    assert powers.choices() == [2, 4, 8, 12]
    draws = [powers.sample(0, step) for step in range(1, 200)]
    assert set(draws) == {2, 4, 8, 12} and draws == [powers.sample(0, step) for step in range(1, 200)]
    assert draws != [powers.sample(1, step) for step in range(1, 200)]
    for parameters, words in (({"rank": 4, "min_rank": 5}, "is empty"), ({"rank": 0}, "rank must be"),
                              ({"rank": 4, "min_rank": 1.5}, "min_rank must be"),
                              ({"rank": 4, "rank_sampling": "normal"}, "unknown rank_sampling"),
                              ({"rank": 4, "rank_scaling": "sqrt"}, "unknown rank_scaling"),
                              ({"rank": 4, "rank_lr": "inverse"}, "unknown rank_lr"),
                              ({"rank": 4, "min_rank_weight": 0}, "min_rank_weight must be")):
        with pytest.raises(EchoError, match=words):
            RankRange.from_parameters(parameters)


def test_component_shares_are_the_draws_frequencies_and_set_the_learning_rates():
    for parameters in ({"rank": 16}, {"rank": 12, "min_rank": 2, "rank_sampling": "powers"}, {"rank": 5, "rank_sampling": "uniform"},
                       {"rank": 16, "min_rank_weight": 3}):
        ranks = RankRange.from_parameters(parameters)
        draws = np.array([ranks.sample(7, step) for step in range(1, 20001)])
        seen = [(draws >= j).mean() for j in range(1, ranks.max_rank + 1)]
        np.testing.assert_allclose(ranks.component_shares(), seen, atol=0.015)
        assert ranks.component_shares()[: ranks.min_rank] == pytest.approx([1.0] * ranks.min_rank)
    log = RankRange.from_parameters({"rank": 16, "rank_lr": "sqrt"})
    np.testing.assert_allclose(log.lr_multipliers(), np.sqrt(log.component_shares()))
    assert log.lr_multipliers()[-1] == pytest.approx(0.2**0.5)  # rank 16: one draw in five
    assert RankRange.from_parameters({"rank": 16, "rank_lr": "linear"}).lr_multipliers()[-1] == pytest.approx(0.2)
    assert RankRange.from_parameters({"rank": 16, "rank_lr": "constant"}).lr_multipliers() == [1.0] * 16
    assert RankRange.from_parameters({"rank": 16}).lr == "sqrt"  # the default


def test_scale_updates_gives_each_component_its_own_learning_rate():
    import mlx.optimizers as optim

    x = mx.random.normal((3, 8), key=mx.random.key(1)).astype(mx.float64)
    steps = {}
    for multipliers in (None, [1.0, 0.5, 0.25, 0.0, 2.0, 1.0]):
        dy, opt = layer(), optim.Adam(learning_rate=0.1)
        dy.freeze(keys=["linear"])
        start = (dy.lora_a, dy.lora_b)
        with mx.stream(mx.cpu):
            grads = nn.value_and_grad(dy, lambda m, x: (m(x) ** 2).sum())(dy, x)[1]
            opt.update(dy, grads)
            if multipliers:
                scale_updates([dy], [start], multipliers)
            steps[multipliers is None] = (np.array(dy.lora_a - start[0]), np.array(dy.lora_b - start[1]))
    m = np.array([1.0, 0.5, 0.25, 0.0, 2.0, 1.0])
    assert np.abs(steps[True][0]).min() > 0  # every component moved in the plain step
    np.testing.assert_allclose(steps[False][0], steps[True][0] * m[None], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(steps[False][1], steps[True][1] * m[:, None], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("draw,rank_lr", [("step", "constant"), ("example", "constant"), ("example", "sqrt")])
def test_resume_redraws_the_sampled_ranks_and_reproduces_the_losses(six_layer_source, tmp_path, draw, rank_lr):
    kw = dict(plan="yoco", iters=8, lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.1, "rank_draw": draw,
                                                     "rank_lr": rank_lr})
    run(six_layer_source, tmp_path / "straight", **kw)
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "stopped"), **dict(QUICK, **dict(DYLORA, **kw))),
             stop_after=5)
    run(six_layer_source, tmp_path / "stopped", **kw, resume=True)
    records = lambda run: [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]
    straight, resumed = records("straight"), records("stopped")
    assert [r["ranks"] for r in resumed] == [r["ranks"] for r in straight]
    assert len({str(r["ranks"][0]) for r in straight}) > 1  # the rank does change from step to step
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]  # bit-identical
    config = json.loads((tmp_path / "straight" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dylora"
    recorded = {k: config["lora_parameters"][k] for k in ("rank", "min_rank", "rank_sampling", "rank_scaling", "rank_draw", "rank_lr")}
    assert recorded == {"rank": 4, "min_rank": 1, "rank_sampling": "log", "rank_scaling": "constant", "rank_draw": draw,
                        "rank_lr": rank_lr}


@pytest.mark.parametrize("schedule", [dict(schedule="progressive", iters=6), dict(layerwise_iters=3, iters=6)])
def test_the_progressive_schedule_and_the_layer_wise_phase_train_sampled_ranks(six_layer_source, tmp_path, schedule):
    run(six_layer_source, tmp_path / "run", plan="yoco", **schedule)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]
    # One micro-batch per step, a rank per example (the default draw) of QUICK's batches of 2.
    assert len(records) == 6 and all(len(r["ranks"]) == 1 and len(r["ranks"][0]) == 2 and set(r["ranks"][0]) <= {1, 2, 3, 4}
                                     for r in records)
    model, _ = load(six_layer_source, plan="yoco", adapter_path=str(tmp_path / "run"), lora_rank=1)
    assert dynamic_layers(model) and {m.active_rank for m in dynamic_layers(model)} == {1}


@pytest.fixture(scope="module")
def trained(six_layer_source, tmp_path_factory):
    path = tmp_path_factory.mktemp("dylora") / "run"
    run(six_layer_source, path, plan="cla:2", iters=6, learning_rate=3e-3)
    return path


def test_fuse_at_a_rank_equals_the_unfused_adapters_at_that_rank(six_layer_source, trained, tmp_path):
    import mlx_lm

    x = mx.array([[3, 5, 7, 11, 13, 17]])
    at = {}
    for rank in (1, 2, 4):
        model, _ = load(six_layer_source, plan="cla:2", adapter_path=str(trained), lora_rank=rank)
        assert {m.active_rank for m in dynamic_layers(model)} == {rank}
        at[rank] = model(x)
        assert cli("fuse", "--model", six_layer_source, "--plan", "cla:2", "--adapter-path", str(trained),
                   "--lora-rank", str(rank), "--out", str(tmp_path / f"r{rank}")) == 0
        fused, _ = load(str(tmp_path / f"r{rank}"))
        assert mx.allclose(fused(x), at[rank], atol=1e-4).item()
    assert not mx.allclose(at[1], at[4], atol=1e-3).item()  # the rank matters
    # Stock mlx-lm reads the adapters as ordinary LoRA: the full rank.
    base = tmp_path / "base"
    assert cli("convert", "--model", six_layer_source, "--plan", "cla:2", "--out", str(base)) == 0
    stock, _ = mlx_lm.load(str(base), adapter_path=str(trained), trust_remote_code=True)
    assert mx.allclose(stock(x), at[4], atol=1e-4).item()


def test_generate_runs_a_chosen_rank_and_refuses_ranks_out_of_range(six_layer_source, trained, capsys):
    common = ("generate", "--model", six_layer_source, "--plan", "cla:2", "--adapter-path", str(trained),
              "--prompt", "hi", "--max-tokens", "2", "--verbose", "False")
    assert cli(*common, "--lora-rank", "2") == 0
    capsys.readouterr()
    for rank in ("5", "0"):
        assert cli(*common, "--lora-rank", rank) == 2
        err = capsys.readouterr().err.strip()
        assert "outside the ranks" in err and "1..4" in err and len(err.splitlines()) == 1


def test_a_fixed_rank_adapter_refuses_another_rank(six_layer_source, tmp_path, capsys):
    path = tmp_path / "lora"
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(path), plan="cla:2", iters=2,
                          lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0}, **QUICK))
    model, _ = load(six_layer_source, plan="cla:2", adapter_path=str(path), lora_rank=4)  # its own rank is fine
    with pytest.raises(EchoError, match="fixed rank 4"):
        load(six_layer_source, plan="cla:2", adapter_path=str(path), lora_rank=2)
    with pytest.raises(EchoError, match="pass --adapter-path"):
        load(six_layer_source, plan="cla:2", lora_rank=2)


def test_finetune_flags_set_the_rank_range_and_an_empty_range_is_one_line(six_layer_source, tmp_path, capsys):
    base = ("finetune", "--model", six_layer_source, "--plan", "cla:2", "--fine-tune-type", "dylora", "--iters", "2",
            "--batch-size", "2", "--max-seq-length", "64")
    assert cli(*base, "--lora-rank", "6", "--min-rank", "2", "--rank-sampling", "powers", "--rank-scaling", "inverse",
               "--rank-draw", "example", "--rank-lr", "linear", "--min-rank-weight", "2",
               "--adapter-path", str(tmp_path / "run")) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["lora_parameters"]
    assert (saved["rank"], saved["min_rank"], saved["rank_sampling"], saved["rank_scaling"], saved["rank_draw"],
            saved["rank_lr"], saved["min_rank_weight"]) == (6, 2, "powers", "inverse", "example", "linear", 2)
    model, _ = load(six_layer_source, plan="cla:2", adapter_path=str(tmp_path / "run"), lora_rank=2)
    assert {(m.active_rank, m.rank_scaling) for m in dynamic_layers(model)} == {(2, "inverse")}
    capsys.readouterr()
    assert cli(*base, "--lora-rank", "4", "--min-rank", "8", "--adapter-path", str(tmp_path / "empty")) == 2
    err = capsys.readouterr().err.strip()
    assert "rank range 8..4 is empty" in err and len(err.splitlines()) == 1


def test_a_quantized_base_stays_quantized_and_its_loss_tracks_the_float_base(six_layer_source, tmp_path):
    curves = {}
    for name, flags in (("float", ()), ("q4", ("-q", "--q-group-size", "32"))):
        assert cli("convert", "--model", six_layer_source, "--plan", "cla:2", *flags, "--out", str(tmp_path / name)) == 0
        # The draw pinned (this test is about the base, not the draw): every rank in 1..4, a rank per example.
        run(str(tmp_path / name), tmp_path / f"run-{name}", iters=12, data="corpus", lora_parameters={
            "rank": 4, "scale": 10.0, "dropout": 0.0, "rank_sampling": "uniform", "rank_draw": "example"})
        curves[name] = np.array([json.loads(l)["train_loss"] for l in (tmp_path / f"run-{name}" / "metrics.jsonl").read_text().splitlines()
                                 if "train_loss" in l])
    for curve in curves.values():
        assert len(curve) == 12 and curve[-4:].mean() < 0.8 * curve[:4].mean()
    gap = np.abs(curves["q4"] / curves["float"] - 1)  # the same ranks and batches: close step by step
    assert gap.mean() < 0.1 and gap.max() < 0.25
    model, _ = load(str(tmp_path / "q4"), adapter_path=str(tmp_path / "run-q4"), lora_rank=2)
    wrapped = dynamic_layers(model)
    assert wrapped and all(isinstance(m.linear, nn.QuantizedLinear) for m in wrapped)
