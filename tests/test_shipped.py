"""The adapted default model shipped in weights/: intact, loadable, and the one generate runs."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from echo_mlx.analysis.evaluate import mean_nll
from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows
from echo_mlx.errors import EchoError
from echo_mlx.io import shipped
from echo_mlx.models.plans import SharingPlan, plan_id

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_files_match_the_checksums_on_their_card():
    card = shipped.read_card()
    for name, key in ((shipped.ADAPTERS, "adapters"), (shipped.FIT, "fit")):
        assert shipped.sha256(shipped.SHIPPED / name) == card[f"{key}_sha256"]
        assert (shipped.SHIPPED / name).stat().st_size == card[f"{key}_bytes"]
    # small: adapters and the fitted tensors, not base weights
    assert sum(card[f"{k}_bytes"] for k in ("adapters", "fit")) < 48 * 2**20
    assert shipped.render(card) == (shipped.SHIPPED / "README.md").read_text()  # the card people read is the same


def test_the_fitted_tensors_are_the_changed_layers_attention_and_mlp_outputs():
    import mlx.core as mx

    card = shipped.read_card()
    plan = SharingPlan.parse(card["plan"], 30)
    fitted = mx.load(str(shipped.SHIPPED / shipped.FIT))
    layers = {int(k.split(".")[2]) for k in fitted}
    assert layers == set(plan.consumers) | set(plan.attention_consumers)
    assert all(v.dtype == mx.float16 for v in fitted.values())


def test_the_shipped_model_loads_with_its_plan_and_is_close_to_the_original():
    import echo_mlx

    card = shipped.verify()
    model, tokenizer = shipped.load()
    plan = SharingPlan.parse(card["plan"], len(model.layers))
    assert plan_id(model.args) == str(plan) == card["plan_string"]
    assert any("lora" in type(m).__name__.lower() for _, m in model.named_modules())
    # Two held-out windows (the card has the 16-window figures): well below the naive
    # conversion, and near the original as the card says.
    windows = heldout_windows(builtin_tokens(tokenizer), count=2)
    naive, _ = echo_mlx.load("default", plan=card["plan"])
    original, _ = echo_mlx.load("default", plan="none")
    ppl = lambda m: math.exp(mean_nll(m, windows))
    adapted_ppl, naive_ppl, original_ppl = ppl(model), ppl(naive), ppl(original)
    card_ratio = card["results"]["adapted_ppl"] / card["results"]["original_ppl"]
    assert adapted_ppl < 0.75 * naive_ppl, (adapted_ppl, naive_ppl)
    assert adapted_ppl / original_ppl < 1.1 * card_ratio, (adapted_ppl, original_ppl, card_ratio)


@pytest.mark.parametrize("name", [shipped.ADAPTERS, shipped.FIT])
def test_a_changed_shipped_file_is_refused(tmp_path, name):
    copy = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED, copy)
    data = bytearray((copy / name).read_bytes())
    data[-1] ^= 1
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(EchoError, match="does not match the checksum"):
        shipped.load(copy)
    (copy / name).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(EchoError, match="truncated or changed"):
        shipped.verify(copy)


def test_generate_runs_the_shipped_model_by_default():
    run = lambda *a: subprocess.run([sys.executable, "-m", "echo_mlx", "generate", "-p", "hi", "-m", "3", *a],
                                    capture_output=True, text=True, cwd=ROOT)
    card = shipped.read_card()
    default = run()
    assert default.returncode == 0, default.stderr
    L = 30
    producers = len(SharingPlan.parse(card["plan"], L).producers)
    assert f"in {producers} producer caches for {L} layers" in default.stdout
    original = run("--plan", "none")
    assert original.returncode == 0 and f"in {L} producer caches for {L} layers" in original.stdout


def test_ship_validate_refuses_a_run_without_its_base_in_one_line_before_measuring(tmp_path):
    # A run directory holding adapters but no base/ (e.g. a run adapting another run's base, not linked)
    # is refused at once, not after minutes of measuring the original.
    (tmp_path / "adapters").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship.py"), "validate", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path} needs base/")


def test_ship_prepare_refuses_unknown_fit_parts_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship.py"), "prepare", "--plan", "cla:2",
                             "--fit-parts", "keys,wings", "--out", str(tmp_path / "base")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ship.py: error: ") and "wings" in lines[0], result.stderr
    assert not (tmp_path / "base").exists()


def ship_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship", ROOT / "scripts" / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    return ship


def test_the_cards_reproduce_command_asks_for_the_fit_on_the_card():
    # The card's first command line, parsed by ship.py itself, must give the fit options its provenance records
    # (a flag the command leaves out, e.g. the ridge or the shrink, would reproduce another model).
    import shlex

    ship = ship_script()
    card = shipped.read_card()
    words = shlex.split(card["command"].splitlines()[0])
    assert words[:3] == ["python", "scripts/ship.py", "prepare"]
    args = ship.build_parser().parse_args(words[2:])
    options, fit = ship.fit_options(args), card["fit"]
    assert args.plan == card["plan"]
    assert (options.tokens, list(options.parts), options.ridge, options.prior) == (
        fit["tokens"], fit["parts"], fit["ridge"], fit.get("prior", False))


def test_the_cards_adapter_line_names_what_the_shipped_adapters_train():
    from echo_mlx.tuner import adapters

    ship = ship_script()
    config = adapters.read_config(shipped.SHIPPED)  # as ship.py card reads the run's
    assert shipped.read_card()["adapter"] == ship.adapter_description(config, 30)
    # and the description follows mlx-lm's keys when a run restricts them
    config["lora_parameters"]["keys"] = ["self_attn.q_proj", "self_attn.o_proj"]
    assert ship.adapter_description(config, 30).endswith("on layers 2..29 (q_proj, o_proj)")
