"""Calibrated conversion (echo_mlx.conversion.fit, `convert --kv-init fit`) on a tiny random llama."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from echo_mlx.conversion.convert import shared_model, unshared_model
from echo_mlx.conversion.fit import (Calibration, FitOptions, assign_heads, fit_layer, fit_model, fold_complex_scale,
                          fold_value_maps, key_scales, producer_query_rows, rope_pairs, value_maps)
from echo_mlx.errors import EchoError
from echo_mlx.io import checkpoint
from echo_mlx.io.sources import load_source
from echo_mlx.models.plans import SharingPlan

from test_convert import cli_error


def models(source, plan, dtype=mx.float32):
    src = load_source(source)
    teacher = unshared_model(src)
    student, _ = shared_model(src.config, src.weights, SharingPlan.parse(plan, 6))
    teacher.set_dtype(dtype)
    student.set_dtype(dtype)
    return teacher, student


def windows(count=4, length=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 300, (count, length)).tolist()


def kl(teacher, student, wins) -> float:
    tokens = mx.array(wins)
    logp = teacher(tokens)
    logq = student(tokens)
    logp, logq = (a - mx.logsumexp(a, axis=-1, keepdims=True) for a in (logp, logq))
    return (mx.exp(logp) * (logp - logq)).sum(-1).mean().item()


def rope(x, traditional, offset):
    return mx.fast.rope(x, x.shape[-1], traditional=traditional, base=10000.0, scale=1.0, offset=offset)


@pytest.mark.parametrize("traditional", [False, True])
def test_a_folded_complex_scale_scores_like_the_scaled_keys_at_every_distance(traditional):
    # q' = fold(W_q, c) x against k equals q = W_q x against c * k, after RoPE at any positions.
    rng = np.random.default_rng(1)
    D, d_in, T = 16, 24, 12
    pairs = rope_pairs(D, traditional)
    w_q, x = rng.normal(size=(D, d_in)), rng.normal(size=(T, d_in))
    c = rng.normal(size=D // 2) + 1j * rng.normal(size=D // 2)
    k = rng.normal(size=(T, D))
    ck = np.empty_like(k)
    ck_complex = c * (k[:, pairs[0]] + 1j * k[:, pairs[1]])
    ck[:, pairs[0]], ck[:, pairs[1]] = ck_complex.real, ck_complex.imag
    as_rope = lambda a, offset: rope(mx.array(a, dtype=mx.float64)[None, None], traditional, offset)[0, 0]
    q_folded = as_rope(x @ fold_complex_scale(w_q, c, pairs).T, 0)
    q_plain = as_rope(x @ w_q.T, 0)
    for offset in (0, 5, 37):  # keys at other absolute positions: any query-key distance
        folded = q_folded @ as_rope(k, offset).T
        mapped = q_plain @ as_rope(ck, offset).T
        assert folded.dtype == mx.float64
        assert np.abs(np.array(folded - mapped)).max() < 1e-10 * np.abs(np.array(mapped)).max()


def test_the_fitted_queries_equal_the_original_queries_against_mapped_producer_keys(six_layer_source):
    # Model level, float64: after the key fit, layer 4's queries against producer 3's keys equal
    # the teacher's queries (head order[j] in slot j) against c * keys, within 1e-5.
    teacher, student = models(six_layer_source, "echo:4", mx.float64)
    cal = Calibration(teacher, windows(), batch=2)
    scale = key_scales(student, cal, 4)
    info = fit_layer(student, cal, 4, FitOptions(parts=("keys", "heads")))
    order = info["head_order"]
    attn, t_attn = student.layers[4].self_attn, teacher.layers[4].self_attn
    rows = cal.chunks()[0]
    x = cal.x(student, 4, rows)
    B, T, _ = x.shape
    heads = lambda a, n: a.reshape(B, T, n, -1).transpose(0, 2, 1, 3)
    keys = heads(student.layers[3].self_attn.k_proj(cal.x(student, 3, rows)), 2)  # pre-RoPE
    pairs = rope_pairs(16, attn.rope.traditional)
    q_new = attn.rope(heads(attn.q_proj(x), 4), offset=0)
    q_old = t_attn.rope(heads(t_attn.q_proj(x), 4), offset=0)
    G = 2
    for j, h in enumerate(order):
        b = j // G  # slot j reads producer kv head j // G
        kp = np.array(keys[:, b])
        mapped = scale[h // G, b] * (kp[..., pairs[0]] + 1j * kp[..., pairs[1]])
        ck = np.empty_like(kp)
        ck[..., pairs[0]], ck[..., pairs[1]] = mapped.real, mapped.imag
        got = q_new[:, j] @ attn.rope(keys[:, b], offset=0).swapaxes(-1, -2)
        want = q_old[:, h] @ attn.rope(mx.array(ck, dtype=mx.float64), offset=0).swapaxes(-1, -2)
        assert got.dtype == mx.float64
        assert np.abs(np.array(got - want)).max() < 1e-5


def test_a_folded_value_map_equals_applying_it_to_the_producers_values(six_layer_source):
    # parts keys + heads + values: o_proj'(P V_p) == o_proj(P (V_p B) per head), in float64.
    teacher, student = models(six_layer_source, "echo:4", mx.float64)
    cal = Calibration(teacher, windows(), batch=2)
    info = fit_layer(student, cal, 4, FitOptions(parts=("keys", "heads", "values")))
    order = info["head_order"]
    attn = student.layers[4].self_attn
    # The maps the fit folded in, recomputed with the o_proj it started from (maps read head outputs only).
    maps = value_maps(student, cal, 4, order, FitOptions().ridge)
    rows = cal.chunks()[0]
    x = cal.x(student, 4, rows)
    kv = cal.kv_for(student, 4, rows)
    got = attn(x, cal.mask(student, 4), None, dict(kv), 0)
    from echo_mlx.conversion.fit import _head_outputs

    outs = _head_outputs(attn, x, cal.mask(student, 4), dict(kv)).reshape(*x.shape[:2], 4, 16)
    w_o = np.array(teacher.layers[4].self_attn.o_proj.weight)
    want = sum(np.array(outs[:, :, j]) @ maps[j] @ w_o.reshape(64, 4, 16)[:, h].T for j, h in enumerate(order))
    assert np.abs(np.array(got) - want).max() < 1e-5
    # and the fold itself, on any matrices
    rng = np.random.default_rng(0)
    w, m = rng.normal(size=(8, 3 * 4)), [rng.normal(size=(4, 4)) for _ in range(3)]
    out = rng.normal(size=(5, 3, 4))
    folded = out.reshape(5, -1) @ fold_value_maps(w, [2, 0, 1], m).T
    direct = sum(out[:, j] @ m[j] @ w.reshape(8, 3, 4)[:, h].T for j, h in enumerate([2, 0, 1]))
    assert np.abs(folded - direct).max() < 1e-10


@pytest.mark.parametrize("plan", ["cla:2", "echo:4", "pizza-top:3", "0_1_2a1_3a1_4_5"])
def test_fitting_lowers_the_calibration_kl_against_the_naive_conversion(six_layer_source, plan):
    teacher, naive = models(six_layer_source, plan)
    _, student = models(six_layer_source, plan)
    cal_windows = windows(count=8)
    report = fit_model(student, teacher, cal_windows, FitOptions(tokens=8 * 48, window=48, batch=4), "random tokens")
    assert sorted(report.layers) == [i for i in range(6) if student.args.kv_sources[i] != i
                                     or student.args.attention_sources[i] != i]
    assert kl(teacher, student, cal_windows) < 0.7 * kl(teacher, naive, cal_windows)


def test_fitting_an_unshared_model_changes_nothing(six_layer_source):
    teacher, student = models(six_layer_source, "none")
    before = dict(tree_flatten(student.parameters()))
    report = fit_model(student, teacher, windows(), FitOptions(tokens=4 * 48, window=48), "random tokens")
    after = dict(tree_flatten(student.parameters()))
    assert report.layers == {}
    assert all(mx.array_equal(before[k], after[k]) for k in before)


def test_a_strong_ridge_keeps_the_original_weights_with_prior_and_shrinks_them_to_zero_without(six_layer_source):
    # prior (convert --shrink-to-original): argmin |XW - Y|^2 + lam |W - W_original|^2; at a huge ridge the
    # re-solved o_proj and down_proj stay the original's, where the plain ridge takes them to 0.
    for prior in (True, False):
        teacher, student = models(six_layer_source, "cla:2")
        options = FitOptions(tokens=4 * 48, window=48, ridge=1e6, parts=("o_proj", "mlp"), prior=prior)
        fit_model(student, teacher, windows(), options, "random tokens")
        for i in (1, 3, 5):
            for fitted, original in ((student.layers[i].self_attn.o_proj.weight, teacher.layers[i].self_attn.o_proj.weight),
                                     (student.layers[i].mlp.down_proj.weight, teacher.layers[i].mlp.down_proj.weight)):
                scale = mx.linalg.norm(original).item()
                if prior:
                    assert mx.linalg.norm(fitted - original).item() < 1e-3 * scale
                else:
                    assert mx.linalg.norm(fitted).item() < 1e-3 * scale


def test_the_fit_is_deterministic(six_layer_source):
    fitted = []
    for _ in range(2):
        teacher, student = models(six_layer_source, "cla:2")
        fit_model(student, teacher, windows(), FitOptions(tokens=4 * 48, window=48), "random tokens")
        fitted.append(dict(tree_flatten(student.parameters())))
    assert all(mx.array_equal(fitted[0][k], fitted[1][k]) for k in fitted[0])


def test_producer_query_rows_reproduce_the_producers_queries_from_the_consumers_input(six_layer_source):
    # The producer's q_proj re-expressed for layer 4's input norm: on one residual state h,
    # q_p(norm_p(h)) == rows @ norm_4(h), within 1e-5 in float64 (the gains differ per layer).
    teacher, student = models(six_layer_source, "echo:4", mx.float64)
    layers = student.layers
    layers[3].input_layernorm.weight = layers[3].input_layernorm.weight * mx.linspace(0.5, 2.0, 64, dtype=mx.float64)
    h = mx.array(np.random.default_rng(2).normal(size=(2, 7, 64)), dtype=mx.float64)
    want = layers[3].self_attn.q_proj(layers[3].input_layernorm(h))
    rows = producer_query_rows(student, 4)
    got = layers[4].input_layernorm(h) @ mx.array(rows.reshape(-1, 64)).T
    assert np.abs(np.array(got - want)).max() < 1e-5


def test_producer_queries_never_cost_more_than_the_fitted_ones(six_layer_source):
    # Every (teacher head, kv head) candidate is the cheaper of the two, so the assignment's cost can only fall.
    costs = {}
    for parts in (("keys", "heads"), ("keys", "heads", "producer_queries")):
        teacher, student = models(six_layer_source, "echo:4")
        cal = Calibration(teacher, windows(), batch=2)
        info = fit_layer(student, cal, 4, FitOptions(parts=parts))
        costs[parts] = info["head_cost"]
    assert costs[("keys", "heads", "producer_queries")] <= costs[("keys", "heads")] + 1e-9
    assert 0 <= info["producer_query_heads"] <= 4


def test_refine_lowers_its_loss_deterministically_and_keeps_the_dtype(six_layer_source):
    fitted = []
    for _ in range(2):
        teacher, student = models(six_layer_source, "echo:4", mx.bfloat16)
        cal = Calibration(teacher, windows(), batch=2)
        info = fit_layer(student, cal, 4, FitOptions(parts=("keys", "heads", "refine", "o_proj"), refine_epochs=3,
                                                     refine_lr=1e-5))
        before, after = info["refine_loss"]
        assert after < before
        assert student.layers[4].self_attn.q_proj.weight.dtype == mx.bfloat16
        fitted.append(dict(tree_flatten(student.parameters())))
    assert all(mx.array_equal(fitted[0][k], fitted[1][k]) for k in fitted[0])
    with pytest.raises(EchoError, match="--refine-epochs 0 must be"):
        FitOptions(parts=("refine",), refine_epochs=0).checked()


def test_refine_keeps_its_start_when_every_epoch_overshoots(six_layer_source):
    # A learning rate far too large: no epoch beats the start, so the layer is exactly the unrefined fit.
    layers = []
    for parts in (("keys", "heads"), ("keys", "heads", "refine")):
        teacher, student = models(six_layer_source, "echo:4")
        cal = Calibration(teacher, windows(), batch=2)
        info = fit_layer(student, cal, 4, FitOptions(parts=parts, refine_lr=10.0, refine_epochs=2))
        layers.append(dict(tree_flatten(student.layers[4].parameters())))
    assert info["refine_loss"][0] == info["refine_loss"][1]
    assert all(mx.array_equal(layers[0][k], layers[1][k]) for k in layers[0])


def stream_error(teacher, student, wins) -> float:
    """Squared distance of the student's last hidden state from the teacher's, relative to its energy."""
    tokens = mx.array(wins)
    t, s = teacher.model(tokens), student.model(tokens)
    return (((s - t) ** 2).sum() / (t * t).sum()).item()


@pytest.mark.parametrize("plan", ["cla:2", "0_1_2a1_3a1_4_4"])
def test_correct_brings_the_models_own_stream_closer_to_the_original(six_layer_source, plan):
    # K/V sharing, and EchoAtt (whose probabilities the pass keeps only until their last reader).
    errors, layers = {}, {}
    for parts in (("keys", "heads", "o_proj", "mlp"), ("keys", "heads", "o_proj", "mlp", "correct")):
        teacher, student = models(six_layer_source, plan)
        report = fit_model(student, teacher, windows(), FitOptions(tokens=4 * 48, window=48, parts=parts), "test")
        errors[parts] = stream_error(teacher, student, windows())
        layers[parts] = report.layers
    corrected = {j for j, info in layers[parts].items() if "corrected_down_proj_residual" in info}
    first = min(layers[("keys", "heads", "o_proj", "mlp")])
    assert corrected == set(range(first, 6))
    assert errors[parts] < errors[("keys", "heads", "o_proj", "mlp")]


def test_correct_leaves_an_unshared_model_and_the_layers_below_the_first_change_alone(six_layer_source):
    teacher, student = models(six_layer_source, "none")
    before = dict(tree_flatten(student.parameters()))
    fit_model(student, teacher, windows(), FitOptions(tokens=4 * 48, window=48, parts=("correct",)), "test")
    after = dict(tree_flatten(student.parameters()))
    assert all(mx.array_equal(v, after[k]) for k, v in before.items())
    teacher, student = models(six_layer_source, "0_1_2_3_3_5")
    below = dict(tree_flatten(student.layers[2].parameters()))
    fit_model(student, teacher, windows(), FitOptions(tokens=4 * 48, window=48, parts=("keys", "mlp", "correct")), "test")
    after = dict(tree_flatten(student.layers[2].parameters()))
    assert all(mx.array_equal(v, after[k]) for k, v in below.items())


def test_correct_refuses_a_plan_whose_consumers_read_layers_above(six_layer_source):
    teacher, student = models(six_layer_source, "pizza-top:3")
    with pytest.raises(EchoError, match="fit part correct .* drop correct"):
        fit_model(student, teacher, windows(), FitOptions(tokens=4 * 48, window=48, parts=("keys", "correct")), "test")


def test_heads_are_assigned_at_least_cost_with_equal_groups():
    rng = np.random.default_rng(3)
    cost = rng.random((6, 3))
    got = assign_heads(cost, 2)
    assert sorted(got) == [0, 0, 1, 1, 2, 2]
    import itertools

    best = min(set(itertools.permutations([0, 0, 1, 1, 2, 2])), key=lambda p: cost[range(6), p].sum())
    assert cost[range(6), got].sum() == pytest.approx(cost[range(6), best].sum())


# ---- convert --kv-init fit ------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    from fixtures import CORPUS

    path = tmp_path_factory.mktemp("cal") / "notes.txt"
    path.write_text("\n".join(CORPUS * 3))
    return path


def test_convert_kv_init_fit_writes_an_ordinary_checkpoint_with_its_provenance(six_layer_source, calibration_file, tmp_path):
    from echo_mlx.cli import main

    out = tmp_path / "fitted"
    main(["convert", "--model", six_layer_source, "--plan", "cla:2", "--kv-init", "fit", "--calibration",
          str(calibration_file), "--calibration-tokens", "1024", "--ridge", "0.01", "--no-shrink-to-original", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    fit = config["echo"]["fit"]
    assert config["echo"]["kv_init"] == "fit"
    assert fit["ridge"] == 0.01 and fit["tokens"] == 1024 and str(calibration_file) in fit["calibration"]
    assert fit["prior"] is False
    assert sorted(map(int, fit["layers"])) == [1, 3, 5]
    model, _, _ = checkpoint.load(out)
    import mlx_lm

    stock, _ = mlx_lm.load(str(out), trust_remote_code=True)
    tokens = mx.array([windows(count=1)[0]])
    assert mx.allclose(model(tokens), stock(tokens), atol=1e-5)
    naive, _ = models(six_layer_source, "cla:2")[1], None
    teacher = models(six_layer_source, "none")[0]
    text = [w for w in windows(count=4, seed=9)]
    assert kl(teacher, model, text) < kl(teacher, naive, text)


def test_fit_errors_are_one_line(capsys, six_layer_source, calibration_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    base = ["convert", "--model", six_layer_source, "--plan", "cla:2", "--out", str(tmp_path / "x")]
    err = cli_error(capsys, *base + ["--kv-init", "fit", "--calibration", str(short)])
    assert "tokens; the fit needs" in err and "--calibration" in err
    for ridge in ("0", "-1", "nan"):
        err = cli_error(capsys, *base + ["--kv-init", "fit", "--calibration", str(calibration_file), "--ridge", ridge])
        assert "--ridge" in err and "positive number" in err
    err = cli_error(capsys, *base + ["--calibration", str(calibration_file)])
    assert "--kv-init fit" in err
    err = cli_error(capsys, *base + ["--fit-parts", "keys,heads"])
    assert "--fit-parts is for --kv-init fit" in err
    err = cli_error(capsys, *base + ["--shrink-to-original"])
    assert "--shrink-to-original is for --kv-init fit" in err
    err = cli_error(capsys, *base + ["--no-shrink-to-original"])
    assert "--no-shrink-to-original is for --kv-init fit" in err
    err = cli_error(capsys, *base + ["--kv-init", "fit", "--calibration", str(calibration_file), "--fit-parts", "keys,bogus"])
    assert "unknown fit part(s) bogus" in err and "refine" in err
    err = cli_error(capsys, *base + ["--kv-init", "fit", "--calibration", str(calibration_file), "--fit-parts",
                                     "keys,heads,refine,o_proj", "--refine-epochs", "0"])
    assert "--refine-epochs 0 must be" in err


def test_kv_init_fit_refuses_a_source_without_a_runnable_teacher(capsys, six_layer_source, tmp_path):
    from echo_mlx.cli import main

    shared = tmp_path / "shared"
    main(["convert", "--model", six_layer_source, "--plan", "cla:2", "--out", str(shared)])
    capsys.readouterr()
    err = cli_error(capsys, *["convert", "--model", str(shared), "--plan", "cla:2", "--kv-init", "fit", "--out", str(tmp_path / "y")])
    assert "echo checkpoint" in err and "teacher" in err and six_layer_source in err


def test_finetune_can_start_from_a_fitted_conversion(six_layer_source, tmp_path):
    import echo_mlx
    from echo_mlx.tuner import adapters
    from echo_mlx.tuner.finetune import FinetuneArgs, finetune

    from fixtures import QUICK

    finetune(FinetuneArgs(model=six_layer_source, plan="cla:2", kv_init="fit", iters=2, adapter_path=str(tmp_path / "run"),
                          **QUICK))
    model, _ = echo_mlx.load(six_layer_source, plan="cla:2", kv_init="fit")  # the same fit again: deterministic
    adapters.apply(model, tmp_path / "run", six_layer_source)  # refused if the base differed
    naive, _ = echo_mlx.load(six_layer_source, plan="cla:2")
    with pytest.raises(EchoError, match="different base weights"):
        adapters.apply(naive, tmp_path / "run", six_layer_source)


def test_convert_cli_fit_defaults_are_fit_options_defaults():
    """The CLI keeps its defaults as literals (it imports no mlx before a command runs): they must
    stay FitOptions' own, so `echo-mlx convert --kv-init fit` fits as echo_mlx.convert(...) does."""
    import inspect

    from cli.convert import convert as convert_command

    defaults = {name: p.default.default for name, p in inspect.signature(convert_command).parameters.items()}
    options = FitOptions()
    assert defaults["calibration_tokens"] == options.tokens
    assert defaults["ridge"] == options.ridge
    assert defaults["refine_epochs"] == options.refine_epochs
    from cli.analyze import analyze as analyze_command

    assert inspect.signature(analyze_command).parameters["ridge"].default.default == options.ridge
    assert defaults["shrink_to_original"] is None  # neither flag: FitOptions().prior (a flag without --kv-init fit is refused)
