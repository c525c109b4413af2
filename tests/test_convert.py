"""`echo-mlx convert` end to end: checkpoints stock mlx-lm loads, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import write_hf_dir

import echo_mlx
from echo_mlx import cli
from echo_mlx.errors import EchoError
from echo_mlx.io import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    """In-process CLI call: (exit code, stdout, stderr) via capsys-free capture."""
    return subprocess.run(
        [sys.executable, "-m", "echo_mlx", *args], capture_output=True, text=True, cwd=ROOT
    )


def cli_error(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    write_hf_dir(path, dtype="float32")
    return path


def greedy(model, tokenizer, prompt, n=8):
    from mlx_lm.generate import generate_step

    ids = mx.array(tokenizer.encode(prompt))
    return [t for t, _ in zip((int(t) for t, _ in generate_step(ids, model, max_tokens=n)), range(n))]


def test_default_model_cla2_loads_in_stock_mlx_lm_with_the_same_tokens(tmp_path):
    import mlx_lm

    out = tmp_path / "smol-cla2"
    result = run_cli("convert", "--plan", "cla:2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "layers without k/v projections (15/30)" in result.stdout
    assert "KV cache per token: 46,080 -> 23,040 bytes" in result.stdout
    assert "parameters: 134,515,008 -> 131,197,248" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == checkpoint.MODEL_FILE and (out / checkpoint.MODEL_FILE).is_file()
    assert config["echo"]["plan"] == "cla:2" and config["kv_sources"][:4] == [0, 0, 2, 2]

    stock_model, stock_tok = mlx_lm.load(str(out), trust_remote_code=True)
    ours, our_tok = echo_mlx.load(str(out))
    assert type(stock_model).__module__ == "custom_model"  # mlx-lm ran the copied model file
    assert len(stock_model.make_cache()) == 15
    prompt = "The capital of France is"
    assert stock_tok.encode(prompt) == our_tok.encode(prompt)
    assert greedy(stock_model, stock_tok, prompt) == greedy(ours, our_tok, prompt)


def test_convert_tiny_hf_dir_with_mean_init_and_quantization(tmp_path, hf_dir):
    import mlx_lm

    out = tmp_path / "q"
    code = cli.main(["convert", "--model", str(hf_dir), "--plan", "cla:2", "--kv-init", "mean",
                     "-q", "--q-bits", "4", "--q-group-size", "32", "--out", str(out)])
    assert code in (None, 0)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["echo"]["kv_init"] == "mean"
    model, tok = mlx_lm.load(str(out), trust_remote_code=True)
    assert hasattr(model.layers[0].self_attn.q_proj, "scales")
    assert not hasattr(model.layers[1].self_attn, "k_proj")
    ours, _ = echo_mlx.load(str(out))
    x = mx.array([tok.encode("Hello world")])
    assert mx.array_equal(model(x), ours(x))


def test_echo_mlx_never_runs_the_model_file_in_a_checkpoint(tmp_path, hf_dir):
    out = tmp_path / "ckpt"
    cli.main(["convert", "--model", str(hf_dir), "--out", str(out)])
    marker = tmp_path / "pwned"
    (out / checkpoint.MODEL_FILE).write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(1)\n")
    model, _ = echo_mlx.load(str(out))
    assert len(model.layers) == 2 and not marker.exists()


def test_out_that_exists_is_refused_unless_forced(tmp_path, hf_dir, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(capsys, "convert", "--model", str(hf_dir), "--out", str(out))
    assert "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    cli.main(["convert", "--model", str(hf_dir), "--out", str(out), "--force"])
    assert checkpoint.is_echo_checkpoint(out) and not (out / "keep.txt").exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, hf_dir, monkeypatch):
    from echo_mlx.conversion.convert import convert

    model, tokenizer, config, _ = convert(str(hf_dir), "cla:2")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "out", model, config, tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "plan, message",
    [
        ("0_0_1", "has 3 entries but the model has 2 layers"),
        ("0_5", "layer 1 attends to layer 5, which does not exist"),
        ("pizzza-top:3", "unknown plan"),
        ("1_1", "layer 0 must compute its own K/V"),
    ],
)
def test_malformed_plans_fail_with_one_line(tmp_path, hf_dir, capsys, plan, message):
    err = cli_error(capsys, "convert", "--model", str(hf_dir), "--plan", plan, "--out", str(tmp_path / "x"))
    assert message in err
    assert not (tmp_path / "x").exists()


def test_bad_sources_and_options_fail_with_one_line(tmp_path, hf_dir, capsys):
    truncated = tmp_path / "cut.gguf"
    from echo_mlx.io.sources import default_model_path

    truncated.write_bytes(default_model_path().read_bytes()[:100_000])
    assert "truncated or corrupt" in cli_error(capsys, "convert", "--model", str(truncated), "--out", str(tmp_path / "a"))
    no_tok = tmp_path / "no-tokenizer"
    write_hf_dir(no_tok, tokenizer=None)
    assert "tokenizer" in cli_error(capsys, "convert", "--model", str(no_tok), "--out", str(tmp_path / "b"))
    assert "--kv-init" in cli_error(capsys, "convert", "--model", str(hf_dir), "--kv-init", "median", "--out", str(tmp_path / "c"))
    assert "--q-bits" in cli_error(capsys, "convert", "--model", str(hf_dir), "-q", "--q-bits", "7", "--out", str(tmp_path / "d"))
    assert "no such file" in cli_error(capsys, "convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))


def test_corrupt_checkpoint_weights_are_reported(tmp_path, hf_dir):
    out = tmp_path / "ckpt"
    cli.main(["convert", "--model", str(hf_dir), "--out", str(out)])
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EchoError, match="re-run `echo-mlx convert`"):
        echo_mlx.load(str(out))


def test_cli_errors_print_no_traceback(tmp_path):
    result = run_cli("convert", "--plan", "cla:0", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "echo-mlx: error: preset 'cla:0' needs group size K between 1 and 30 for a 30-layer model, e.g. cla:2"
    ]


def test_info_reports_the_blas_in_use():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("BLAS:"))
    if sys.platform.startswith("linux") and os.environ.get("ECHO_MLX_OPENBLAS") != "0":
        from echo_mlx.blas import find_openblas

        assert ("OpenBLAS" in line) == (find_openblas() is not None)
