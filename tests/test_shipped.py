"""The adapted default model shipped in weights/: intact, loadable, and the one generate runs."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from echo_mlx import shipped
from echo_mlx.corpus import builtin_tokens, heldout_windows
from echo_mlx.errors import EchoError
from echo_mlx.evaluate import mean_nll
from echo_mlx.plans import SharingPlan, plan_id

ROOT = Path(__file__).resolve().parents[1]


def test_the_adapters_match_the_checksum_on_their_card():
    card = shipped.read_card()
    assert shipped.sha256(shipped.SHIPPED / shipped.ADAPTERS) == card["adapters_sha256"]
    assert (shipped.SHIPPED / shipped.ADAPTERS).stat().st_size == card["adapters_bytes"]
    assert (shipped.SHIPPED / shipped.ADAPTERS).stat().st_size < 16 * 2**20  # small: adapters, not base weights
    assert shipped.render(card) == (shipped.SHIPPED / "README.md").read_text()  # the card people read is the same


def test_the_shipped_model_loads_with_its_plan_and_beats_the_naive_conversion():
    import echo_mlx

    card = shipped.verify()
    model, tokenizer = shipped.load()
    plan = SharingPlan.parse(card["plan"], len(model.layers))
    assert plan_id(model.args) == str(plan) == card["plan_string"]
    assert any("lora" in type(m).__name__.lower() for _, m in model.named_modules())
    # Two held-out windows: far from the naive conversion (the card has the 16-window figures).
    windows = heldout_windows(builtin_tokens(tokenizer), count=2)
    naive, _ = echo_mlx.load("default", plan=card["plan"], kv_init=card["kv_init"])
    adapted_ppl, naive_ppl = math.exp(mean_nll(model, windows)), math.exp(mean_nll(naive, windows))
    assert adapted_ppl < naive_ppl / 10, (adapted_ppl, naive_ppl)


def test_a_changed_adapter_file_is_refused(tmp_path):
    copy = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED, copy)
    data = bytearray((copy / shipped.ADAPTERS).read_bytes())
    data[-1] ^= 1
    (copy / shipped.ADAPTERS).write_bytes(bytes(data))
    with pytest.raises(EchoError, match="does not match the checksum"):
        shipped.load(copy)
    (copy / shipped.ADAPTERS).write_bytes(bytes(data[: len(data) // 2]))
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
