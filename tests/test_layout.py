"""The project's layout: the command line in cli/ installed as echo_mlx.cli, folders that
show the pipeline, checkpoints from before the move, and model.py importable on its own."""

import importlib.util
import json
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PRE_LAYOUT = ROOT / "tests" / "data" / "checkpoint-0.1.0-pre-layout"  # written by echo-mlx before the move
VERBS = ["convert", "plans", "info", "generate", "cache-prompt", "finetune", "fuse", "plot", "analyze"]


def test_every_verb_is_a_module_of_cli():
    from echo_mlx.cli import app

    modules = {c.name: c.callback.__module__ for c in app.registered_commands}
    assert sorted(modules) == sorted(VERBS)
    for verb, module in modules.items():
        assert module == "echo_mlx.cli." + verb.replace("-", "_")
        assert (ROOT / "cli" / (verb.replace("-", "_") + ".py")).is_file()


def test_the_installed_distribution_has_no_top_level_cli():
    dist = distribution("echo-mlx")
    assert dist.read_text("top_level.txt").split() == ["echo_mlx"]
    # An editable install maps top-level names in its finder: only echo_mlx and its sub-packages.
    finders = [f for f in dist.files if f.name.startswith("__editable__") and f.suffix == ".py"]
    for finder in finders:
        text = Path(dist.locate_file(finder)).read_text()
        mapping = eval(text.split("MAPPING: dict[str, str] = ", 1)[1].splitlines()[0])  # a dict literal
        assert mapping and all(name == "echo_mlx" or name.startswith("echo_mlx.") for name in mapping)
        assert Path(mapping["echo_mlx.cli"]) == ROOT / "cli"
    # Outside the repository (no checkout on sys.path), `cli` is not importable and echo_mlx.cli is.
    probe = ("import importlib.util as u, echo_mlx.cli; "
             "print(u.find_spec('cli') is None, echo_mlx.cli.__name__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.split() == ["True", "echo_mlx.cli"]


@pytest.mark.slow
def test_the_wheel_holds_echo_mlx_only(tmp_path):
    """What `pip install .` puts in site-packages: echo_mlx (with cli/ as echo_mlx/cli) and its data."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if name.startswith(("echo_mlx/", "cli/")) or name in ("pyproject.toml", "README.md"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"echo_mlx", "echo_mlx-0.1.0.dist-info"}
    for verb in VERBS:
        assert f"echo_mlx/cli/{verb.replace('-', '_')}.py" in names
    for group in ["models", "kernels", "io", "conversion", "tuner", "analysis", "datasets"]:
        assert f"echo_mlx/{group}/__init__.py" in names
    assert "echo_mlx/datasets/chatdata/chat.jsonl" in names
    assert "echo_mlx/datasets/evaldata/licenses.txt" in names
    assert "echo_mlx/datasets/evaldata/licenses-validation.txt" in names


def test_model_py_imports_on_its_own(tmp_path):
    """A checkpoint's copy of model.py runs with mlx and mlx_lm alone (echo_mlx blocked)."""
    copy = tmp_path / "echo_llama.py"
    copy.write_text((ROOT / "echo_mlx" / "models" / "model.py").read_text())
    probe = (
        "import sys, importlib.util as u; sys.modules['echo_mlx'] = None\n"
        f"spec = u.spec_from_file_location('echo_llama', {str(copy)!r}); m = u.module_from_spec(spec)\n"
        "spec.loader.exec_module(m); print(m.Model.__name__, m.decode_attention)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Model", "None"]


def _logits(model, ids):
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def test_a_checkpoint_converted_before_the_move_still_loads(six_layer_source):
    """The committed checkpoint (echo-mlx 0.1.0 before the move, float16) loads in echo_mlx and in stock
    mlx-lm, and equals converting the same source with the same plan today."""
    import mlx_lm

    import echo_mlx

    config = json.loads((PRE_LAYOUT / "config.json").read_text())
    old, tokenizer = echo_mlx.load(str(PRE_LAYOUT))
    stock, _ = mlx_lm.load(str(PRE_LAYOUT), trust_remote_code=True)
    # The committed checkpoint came from this very fixture (tests/fixtures.py, seed 0).
    new, _, _, _ = echo_mlx.convert(six_layer_source, config["echo"]["plan"], dtype="float16")
    ids = tokenizer.encode("hello world, a test of the old checkpoint")
    reference = _logits(new, ids)
    assert np.abs(_logits(old, ids) - reference).max() == 0
    assert np.abs(_logits(stock, ids) - reference).max() == 0


def test_a_checkpoint_converted_after_the_move_loads_in_stock_mlx_lm(six_layer_source, tmp_path):
    import mlx_lm

    import echo_mlx

    out = tmp_path / "ckpt"
    model, tokenizer, _, _ = echo_mlx.convert(six_layer_source, "0_0_2_3a2_4a2_5", out=str(out))
    assert (out / "echo_llama.py").read_text() == (ROOT / "echo_mlx" / "models" / "model.py").read_text()
    stock, _ = mlx_lm.load(str(out), trust_remote_code=True)
    ids = tokenizer.encode("hello world")
    assert np.abs(_logits(stock, ids) - _logits(model, ids)).max() == 0


def test_loading_a_checkpoint_prints_no_transformers_warning(six_layer_source, tmp_path):
    """Ours and stock mlx-lm: transformers knows the echo_llama model type (model.py registers it)."""
    import echo_mlx

    out = tmp_path / "ckpt"
    echo_mlx.convert(six_layer_source, "cla:2", out=str(out))
    for code in (f"import echo_mlx; echo_mlx.load({str(out)!r})",
                 f"import mlx_lm; mlx_lm.load({str(out)!r}, trust_remote_code=True)",
                 f"import echo_mlx; echo_mlx.load({str(PRE_LAYOUT)!r})"):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert "You are using a model of type" not in run.stderr, code
        assert "transformers" not in run.stderr, (code, run.stderr)
    generate = subprocess.run([sys.executable, "-m", "echo_mlx", "generate", "--model", str(out), "-p", "hi", "-m", "2"],
                              capture_output=True, text=True, cwd=tmp_path)
    assert generate.returncode == 0, generate.stderr
    assert "transformers" not in generate.stderr


def test_every_echo_mlx_name_the_readme_gives_exists():
    """The README names modules and functions (echo_mlx.datasets.chat.answer_scores, ...): each must resolve."""
    import importlib
    import re

    missing = []
    for name in sorted(set(re.findall(r"echo_mlx(?:\.\w+)+", (ROOT / "README.md").read_text()))):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute, None)
        if obj is None:
            missing.append(name)
    assert not missing, f"the README names what does not exist: {missing}"
