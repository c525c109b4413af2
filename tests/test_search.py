"""Plan search by measured damage (echo_mlx.analysis.search, `echo-mlx analyze --search`) on a tiny llama."""

import itertools
import json

import numpy as np
import pytest

from echo_mlx.analysis.search import best_plan, search
from echo_mlx.conversion.convert import unshared_model
from echo_mlx.conversion.fit import FitOptions
from echo_mlx.errors import EchoError
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan

from test_convert import cli_error


def random_windows(count, length=40, seed=0):
    return np.random.default_rng(seed).integers(0, 300, (count, length)).tolist()


def brute_force(damage, L, kv_layers, reach):
    best, best_cost = None, float("inf")
    for consumers in itertools.combinations(range(1, L), L - kv_layers):
        keep = [i for i in range(L) if i not in consumers]
        choices = [[p for p in keep if i - reach <= p < i and (i, p) in damage] for i in consumers]
        for producers in itertools.product(*choices):
            cost = sum(damage[(i, p)] for i, p in zip(consumers, producers))
            if cost < best_cost:
                best_cost = cost
                best = list(range(L))
                for i, p in zip(consumers, producers):
                    best[i] = p
    return best, best_cost


@pytest.mark.parametrize("seed", range(4))
def test_the_dynamic_programme_finds_the_least_damaging_plan(seed):
    L, reach = 8, 3
    rng = np.random.default_rng(seed)
    damage = {(i, p): float(rng.random()) for i in range(1, L) for p in range(max(0, i - reach), i)}
    for kv_layers in (4, 5, 6):
        got = best_plan(damage, L, kv_layers, reach)
        want, cost = brute_force(damage, L, kv_layers, reach)
        assert sum(damage[(i, p)] for i, p in enumerate(got) if p != i) == pytest.approx(cost)
        plan = SharingPlan.parse("_".join(map(str, got)), L)  # valid: producers keep their own K/V
        assert len(plan.producers) == kv_layers and plan.kv_sources[0] == 0


def test_an_unreachable_reduction_is_none():
    damage = {(i, i - 1): 1.0 for i in range(1, 6)}  # reach 1: at most every other layer shares
    assert best_plan(damage, 6, 3, 1) is not None
    assert best_plan(damage, 6, 2, 1) is None


@pytest.fixture(scope="module")
def searched(six_layer_source):
    src = load_source(six_layer_source)
    options = FitOptions(tokens=4 * 40, window=40, batch=4)
    result = search(src, unshared_model(src), random_windows(4), random_windows(2, seed=1), [1.5, 2.0, 3.0],
                    options=options, reach=2, validation=random_windows(2, length=41, seed=2))
    return src, result


def test_search_measures_every_pair_within_reach(searched):
    _, result = searched
    assert sorted(result.damage) == [(i, p) for i in range(1, 6) for p in range(max(0, i - 2), i)]
    assert all(d > 0 for d in result.damage.values())


def test_search_returns_valid_plans_meeting_each_reduction(searched):
    _, result = searched
    assert [row["target_reduction"] for row in result.plans] == [1.5, 2.0, 3.0]
    for row in result.plans:
        plan = SharingPlan.parse(row["plan"], 6)
        assert plan.kv_reduction >= row["target_reduction"] - 1e-9
        assert len(plan.producers) == int(6 / row["target_reduction"])
        assert plan.kv_sources[0] == 0 and not plan.cyclic_blocks
        # the plan's summed single-pair damage is what the search predicted
        assert row["predicted_kl"] == pytest.approx(sum(searched[1].damage[(i, p)] for i, p in enumerate(plan.kv_sources) if p != i))
        assert row["kl"] > 0 and np.isfinite(row["fitted_ppl"]) and np.isfinite(row["naive_ppl"])


def test_analyze_search_cli_prints_plans_and_writes_the_frontier(six_layer_source, tmp_path, capsys):
    from echo_mlx.cli import main

    cal = tmp_path / "cal.txt"
    from fixtures import CORPUS

    cal.write_text("\n".join(CORPUS * 4))
    main(["analyze", "--model", six_layer_source, "--search", "--calibration", str(cal), "--out", str(tmp_path / "a"),
          "--target-reduction", "1.5", "--target-reduction", "2", "--reach", "2", "--calibration-tokens", "256",
          "--score-tokens", "128", "--window", "64"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "search.json").read_text())
    assert [row["target_reduction"] for row in report["plans"]] == [1.5, 2.0]
    for row in report["plans"]:
        assert row["plan"] in out
    assert "minutes" in out and (tmp_path / "a" / "frontier.png").stat().st_size > 1000


def test_analyze_search_refuses_an_unreachable_reduction(six_layer_source, tmp_path, capsys):
    err = cli_error(capsys, "analyze", "--model", six_layer_source, "--search", "--target-reduction", "4",
                    "--out", str(tmp_path / "a"))
    assert "--target-reduction 4" in err


def test_an_unreachable_reduction_is_refused_before_anything_is_measured(six_layer_source):
    # No teacher and no windows: measuring anything would fail with another error.
    with pytest.raises(EchoError, match="--target-reduction 3 needs 4 consumers"):
        search(load_source(six_layer_source), None, [], [], [3.0], options=FitOptions(tokens=40, window=40), reach=1)
