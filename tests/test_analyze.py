"""`echo-mlx analyze`: layer similarity, the suggested plan, and the CLI end to end."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest

from echo_mlx import cli
from echo_mlx.analysis import analyze
from echo_mlx.errors import EchoError
from echo_mlx.models.plans import SharingPlan
from test_convert import cli_error


@pytest.fixture(scope="module")
def tiny(six_layer_source):
    """The unshared 6-layer random llama (4 query heads, 2 kv heads) and its tokenizer."""
    from echo_mlx.api import load

    return load(six_layer_source, plan="none")


def windows(n=2, length=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 300, (n, length)).tolist()


def similarity_from(k, v=None, attention=None):
    k = np.asarray(k, dtype=float)
    return analyze.Similarity(k, k if v is None else np.asarray(v, float), k if attention is None else attention)


# ---- capture ---------------------------------------------------------------------
def test_captured_kv_attention_and_hidden_state_equal_the_models_own_forward(tiny):
    model, _ = tiny
    tokens = mx.array(windows(2, 16))
    c = analyze.capture(model, tokens)
    assert len(c.keys) == len(c.values) == len(c.probs) == 6 and len(c.hidden) == 7
    for i, layer in enumerate(model.model.layers):
        kv = {}
        out = layer.self_attn(layer.input_layernorm(c.hidden[i]), "causal", None, kv, 0)
        keys, values, _ = kv[i]  # what the model's attention computed and would cache
        assert mx.allclose(c.keys[i], keys, atol=1e-5), i
        assert mx.allclose(c.values[i], values, atol=1e-5), i
        # The probabilities reproduce the attention output (GQA: query head h reads kv head h // 2).
        attn = layer.self_attn
        by_head = mx.repeat(c.values[i], attn.n_heads // attn.n_kv_heads, axis=1)
        mixed = (c.probs[i] @ by_head).transpose(0, 2, 1, 3).reshape(*tokens.shape, -1)
        assert mx.allclose(attn.o_proj(mixed), out, atol=1e-5), i
        assert mx.allclose(c.probs[i].sum(-1), mx.array(1.0), atol=1e-5)
        assert mx.all(mx.triu(c.probs[i], k=1) == 0)
    assert mx.allclose(model.model.norm(c.hidden[-1]), model.model(tokens), atol=1e-5)


def test_capture_refuses_a_shared_model(six_layer_source):
    from echo_mlx.api import load

    model, _ = load(six_layer_source, plan="cla:2")
    with pytest.raises(EchoError, match="unshared"):
        analyze.capture(model, mx.array(windows(1, 8)))


# ---- similarity ---------------------------------------------------------------------
def test_similarity_is_one_on_the_diagonal_symmetric_and_bounded(tiny):
    model, _ = tiny
    sim = analyze.similarity(model, windows())
    for name in analyze.MATRICES:
        m = getattr(sim, name)
        assert m.shape == (6, 6)
        assert np.allclose(np.diag(m), 1.0, atol=1e-5), name
        assert np.allclose(m, m.T, atol=1e-6), name
        assert (m >= -1).all() and (m <= 1).all(), name
    for m in (sim.k, sim.v):  # random layers are not alike (their attention is: near uniform)
        assert (np.abs(m[~np.eye(6, dtype=bool)]) < 0.9).all()
    assert (sim.attention >= 0).all()  # probabilities are non-negative


def test_a_layer_that_repeats_the_one_below_is_found_and_suggested(six_layer_source):
    """Layer 2 adds nothing to the residual stream and layer 3 has its weights,
    so layer 3's K, V and attention equal layer 2's: similarity 1, and the one
    consumer a 6/5x plan allows reads layer 2."""
    from echo_mlx.api import load

    model, _ = load(six_layer_source, plan="none")
    two, three = model.model.layers[2], model.model.layers[3]
    two.self_attn.o_proj.weight = mx.zeros_like(two.self_attn.o_proj.weight)
    two.mlp.down_proj.weight = mx.zeros_like(two.mlp.down_proj.weight)
    three.input_layernorm.weight = two.input_layernorm.weight
    for proj in ("q_proj", "k_proj", "v_proj"):
        setattr(three.self_attn, proj, getattr(two.self_attn, proj))
    sim = analyze.similarity(model, windows())
    for name in analyze.MATRICES:
        assert getattr(sim, name)[3, 2] == pytest.approx(1.0, abs=1e-5), name
    assert str(analyze.suggest_plan(sim, 6 / 5).plan) == "0_1_2_2_4_5"


def test_calibration_windows_spread_over_the_text_and_refuse_short_text():
    tokens = list(range(1000))
    got = analyze.calibration_windows(tokens, 100, 4)
    assert [w[0] for w in got] == [0, 300, 600, 900] and all(len(w) == 100 for w in got)
    with pytest.raises(EchoError, match="100 tokens, fewer than one window of 256.*smaller --window"):
        analyze.calibration_windows(tokens[:100], 256, 8)


# ---- the suggested plan -----------------------------------------------------------------
def test_the_dp_finds_a_planted_block_structure():
    # Layers {1, 2, 3}, {4, 5} and {6, 7} are alike; everything else is not.
    blocks = [[0], [1, 2, 3], [4, 5], [6, 7]]
    s = np.full((8, 8), 0.1)
    for block in blocks:
        for i, j in itertools.product(block, block):
            s[i, j] = 0.9
    got = analyze.suggest_plan(similarity_from(s), 2.0)
    assert str(got.plan) == "0_1_1_1_4_4_6_6"
    assert got.score == pytest.approx(0.9)
    # Scored by K only, a different K matrix decides.
    k = np.eye(8) + 0.1
    k[2:, 1] = k[1, 2:] = 0.95  # everything reads layer 1 well
    got = analyze.suggest_plan(similarity_from(k, v=s), 4.0, by="k")
    assert got.plan.kv_sources[:2] == (0, 1) and got.name == "suggested (K only)"


def contiguous_plans(L, n):
    """Every plan with layer 0 alone and layers 1..L-1 in n-1 contiguous bottom-read groups."""
    for cuts in itertools.combinations(range(2, L), n - 2):
        starts = [1, *cuts, L]
        yield [0] + [a for a, b in zip(starts, starts[1:]) for _ in range(b - a)]


def test_the_dp_beats_or_equals_every_contiguous_partition():
    rng = np.random.default_rng(0)
    for L in (2, 3, 5, 8):
        a = rng.uniform(-1, 1, (L, L))
        sim = similarity_from((a + a.T) / 2, v=rng.uniform(-1, 1, (L, L)))
        for n in range(2, L + 1):
            got = analyze.suggest_plan(sim, L / n)
            scores = [analyze.plan_score(sim, SharingPlan.parse("_".join(map(str, p)), L)) for p in contiguous_plans(L, n)]
            assert len(got.plan.producers) == n
            assert got.score >= max(scores) - 1e-12, (L, n)


@pytest.mark.parametrize("L", [1, 2, 3, 6, 7, 30])
def test_suggested_plans_are_valid_meet_the_reduction_and_never_read_layer_0(L):
    rng = np.random.default_rng(L)
    sim = similarity_from(rng.uniform(0, 1, (L, L)))
    for R in (1, 1.5, 2, 2.5, 3, 30 / 7, max(1, L / 2)):
        if L > 1 and R > L / 2 or L == 1 and R > 1:
            with pytest.raises(EchoError, match="impossible"):
                analyze.suggest_plan(sim, R)
            continue
        plan = analyze.suggest_plan(sim, R).plan
        assert SharingPlan.parse(str(plan), L) == plan
        assert plan.kv_reduction >= R - 1e-9 and len(plan.producers) == int(L / R + 1e-9)
        assert plan.kv_sources.count(0) == 1
        assert all(j <= i for i, j in enumerate(plan.kv_sources))  # bottom producers: no iterated prefill
        assert list(plan.kv_sources) == sorted(plan.kv_sources)  # contiguous groups


def test_impossible_reductions_name_the_limit():
    sim = similarity_from(np.eye(30))
    with pytest.raises(EchoError, match=r"16 is impossible for a 30-layer model.*at most 15.0x: use a value <= 15"):
        analyze.suggest_plan(sim, 16)
    with pytest.raises(EchoError, match="below 1"):
        analyze.suggest_plan(sim, 0.5)


def test_candidates_are_unique_same_size_and_ranked_by_score():
    rng = np.random.default_rng(1)
    sim = similarity_from(rng.uniform(0, 1, (6, 6)), v=rng.uniform(0, 1, (6, 6)))
    found = analyze.candidates(sim, 2.0)
    assert len({c.plan.kv_sources for c in found}) == len(found) >= 3
    assert all(len(c.plan.producers) == 3 for c in found)
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    names = " = ".join(c.name for c in found)
    for preset in ("lasagna-bottom:3", "pizza-bottom:3", "sandwich-bottom:3", "yoco", "cla:2", "suggested (K+V)", "suggested (K only)", "suggested (V only)"):
        assert preset in names


# ---- the command ---------------------------------------------------------------------------
def test_analyze_evaluate_2_writes_heatmaps_and_a_ranked_report(six_layer_source, tmp_path, capsys):
    out = tmp_path / "report"
    cli.main(["analyze", "--model", six_layer_source, "--out", str(out), "--window", "64", "--num-windows", "3",
              "--evaluate", "2", "--eval-windows", "2", "--eval-length", "64"])
    printed = capsys.readouterr().out
    for name in ("similarity_k.png", "similarity_v.png", "similarity_attention.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    plan = report["suggestion"]["plan"]
    assert f"echo-mlx convert --model {six_layer_source} --plan {plan}" in printed
    assert report["layers"] == 6 and report["window"] == 64 and report["num_windows"] == 3
    assert np.allclose(np.diag(report["similarity"]["attention"]), 1.0, atol=1e-5)
    ranking = report["evaluation"]["ranking"]
    assert len(ranking) == 2
    assert ranking[0]["perplexity"] <= ranking[1]["perplexity"]
    assert plan == ranking[0]["plan"]  # measured perplexity, not the similarity score, picks the suggestion
    assert all(r["kv_reduction"] == 2.0 for r in ranking)
    assert report["evaluation"]["baseline_perplexity"] > 1
    for r in ranking:
        assert f"{r['perplexity']:.2f}" in printed and r["plan"] in printed


def test_analyze_refuses_impossible_reductions_and_short_calibration(six_layer_source, tmp_path, capsys):
    err = cli_error(capsys, "analyze", "--model", six_layer_source, "--target-reduction", "0.5")
    assert "--target-reduction 0.5 is below 1" in err
    err = cli_error(capsys, "analyze", "--model", six_layer_source, "--target-reduction", "4")
    assert "impossible for a 6-layer model" in err and "use a value <= 3" in err
    short = tmp_path / "short.txt"
    short.write_text("Hello world, a short text.")
    err = cli_error(capsys, "analyze", "--model", six_layer_source, "--calibration", str(short), "--out", str(tmp_path / "a"))
    assert "fewer than one window of 256" in err and "--calibration" in err and "--window" in err
    err = cli_error(capsys, "analyze", "--model", six_layer_source, "--calibration", str(tmp_path / "missing.txt"))
    assert "does not exist" in err
    assert not (tmp_path / "a").exists()
