"""echo-mlx finetune on a tiny random llama (6 layers): the loop's promises."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from echo_mlx.cli import main
from echo_mlx.errors import EchoError
from echo_mlx.io import checkpoint
from echo_mlx.tuner.finetune import FinetuneArgs, finetune

from fixtures import QUICK, SIX, write_hf_dir



def run(six_layer_source, adapter_path, **kw):
    return finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(adapter_path), **dict(QUICK, **kw)))


def losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def cli(*argv):
    """Run the CLI in-process: (exit code, stderr is checked by the caller via capsys)."""
    try:
        main(list(argv))
    except SystemExit as e:
        return e.code
    return 0


def test_adaptation_lowers_the_distillation_loss_and_writes_a_run(six_layer_source, tmp_path):
    # Corpus windows only: batches of one length, so the loss is comparable from step to step
    # (the default data mixes in chat answers and general samples of every length).
    result = run(six_layer_source, tmp_path / "run", plan="cla:2", iters=12, data="corpus")
    curve = losses(tmp_path / "run")
    assert len(curve) == 12 and np.mean(curve[-3:]) < 0.8 * np.mean(curve[:3])
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png", "best.json", "state"):
        assert (tmp_path / "run" / name).exists(), name
    assert result.best_val_loss is not None and result.teacher_val_loss is not None


def test_frozen_layers_get_no_gradient_and_stay_unchanged(six_layer_source, tmp_path):
    from echo_mlx.conversion.convert import shared_model
    from echo_mlx.models.plans import SharingPlan
    from echo_mlx.io.sources import load_source

    # echo:4 changes layers 3 (now read by 4, 5), 4 and 5: layers 0-2 and the embeddings stay frozen.
    run(six_layer_source, tmp_path / "run", plan="echo:4", fine_tune_type="full", iters=4, steps_per_eval=100)
    from echo_mlx.tuner.trainstate import load_state

    # The last step's weights (the best-validation adapters may be the untrained start).
    trained = load_state(tmp_path / "run" / "state").weights
    assert trained and all(int(k.split(".")[2]) >= 3 for k in trained)
    src = load_source(six_layer_source)
    base, _ = shared_model(src.config, src.weights, SharingPlan.parse("echo:4", 6))
    base_weights = dict(tree_flatten(base.parameters()))
    assert any(not mx.array_equal(v, base_weights[k]).item() for k, v in trained.items())

    # The gradient tree itself holds nothing for frozen layers.
    from echo_mlx.tuner import adapters
    from echo_mlx.tuner.finetune import make_loss
    import mlx.nn as nn

    adapters.make_trainable(base, "full", 3, {})
    grads = dict(tree_flatten(nn.value_and_grad(base, make_loss(None, 0.0, 1.0))(
        base, mx.array([[1, 2, 3, 4, 5]]), mx.array([[0, 5]]))[1]))
    assert grads and all(k.startswith("model.layers.") and int(k.split(".")[2]) >= 3 for k in grads)


def test_resume_after_an_interruption_matches_the_uninterrupted_run(six_layer_source, tmp_path):
    kw = dict(plan="yoco", iters=8, lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.1})
    run(six_layer_source, tmp_path / "straight", **kw)
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "stopped"), **dict(QUICK, **kw)), stop_after=5)
    run(six_layer_source, tmp_path / "stopped", **kw, resume=True)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # bit-identical, dropout included


def test_progressive_resume_across_a_stage_boundary(six_layer_source, tmp_path):
    kw = dict(plan="yoco", iters=9, schedule="progressive")  # stages: echo:5, echo:4, yoco
    run(six_layer_source, tmp_path / "straight", **kw)
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["stage"] for r in records if "stage" in r}) == [0, 1, 2]
    finetune(FinetuneArgs(model=six_layer_source, adapter_path=str(tmp_path / "stopped"), **dict(QUICK, **kw)), stop_after=6)
    run(six_layer_source, tmp_path / "stopped", **kw, resume=True)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    config = json.loads((tmp_path / "straight" / "adapter_config.json").read_text())
    assert config["echo"]["plan"] == "0_1_2_2_2_2"  # the adapters are for the target plan


def test_kill_9_mid_run_then_resume_reproduces_the_loss_sequence(six_layer_source, tmp_path):
    args = ["finetune", "--model", six_layer_source, "--plan", "cla:2", "--batch-size", "2", "--max-seq-length", "64",
            "--steps-per-report", "1", "--steps-per-eval", "1000", "--save-every", "3", "--learning-rate", "1e-3"]
    reference = tmp_path / "reference"
    assert cli(*args, "--iters", "9", "--adapter-path", str(reference)) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "echo_mlx", *args, "--iters", "400", "--adapter-path", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "state" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was still running: a real crash
    # --iters may change on resume of a direct run; the rest must not.
    assert cli(*args, "--iters", "9", "--adapter-path", str(killed), "--resume") == 0
    assert losses(killed) == losses(reference)


def test_ctrl_c_saves_a_checkpoint_before_exiting(six_layer_source, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "echo_mlx", "finetune", "--model", six_layer_source, "--plan", "cla:2", "--batch-size", "2",
         "--max-seq-length", "64", "--iters", "100000", "--save-every", "100000", "--steps-per-eval", "100000",
         "--steps-per-report", "1", "--adapter-path", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("still running 60 s after Ctrl-C: " + proc.communicate()[1][-2000:])
    assert proc.returncode == 2 and "interrupted after step" in err and "Traceback" not in err, err
    assert json.loads((out / "state" / "state.json").read_text())["step"] >= 2


def test_nan_loss_stops_with_the_last_checkpoint_intact(six_layer_source, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli("finetune", "--model", six_layer_source, "--plan", "cla:2", "--batch-size", "2", "--max-seq-length", "64",
               "--iters", "6", "--save-every", "1", "--optimizer", "sgd", "--learning-rate", "1e30",
               "--adapter-path", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "loss became" in err and "is intact" in err and len(err.strip().splitlines()) == 1
    step = json.loads((out / "state" / "state.json").read_text())["step"]
    assert f"step {step} in" in err
    from echo_mlx.tuner.trainstate import load_state

    assert all(np.isfinite(np.array(v)).all() for v in load_state(out / "state").weights.values())


def test_resume_refuses_changed_settings_and_corruption(six_layer_source, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["finetune", "--model", six_layer_source, "--plan", "cla:2", "--batch-size", "2", "--max-seq-length", "64",
            "--iters", "2", "--adapter-path", out]
    assert cli(*base) == 0
    capsys.readouterr()
    assert cli(*base) == 2 and "already holds a training run" in capsys.readouterr().err
    assert cli(*base, "--resume", "--learning-rate", "0.5") == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "changed config" in err
    weights = Path(out) / "state" / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert cli(*base, "--resume") == 2 and "corrupt" in capsys.readouterr().err


def test_teacher_with_another_vocabulary_is_refused(six_layer_source, tmp_path):
    other = tmp_path / "other"
    write_hf_dir(other, dtype="float32", config=SIX, tokenizer="spm")
    with pytest.raises(EchoError, match="another vocabulary"):
        run(six_layer_source, tmp_path / "run", plan="cla:2", iters=2, teacher=str(other))


def test_jsonl_data_with_prompt_masking(six_layer_source, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(8)]
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(six_layer_source, tmp_path / "run", plan="cla:2", iters=3, data=str(data), mask_prompt=True)
    assert result.steps == 3 and result.best_val_loss is not None


def test_adapters_refuse_another_plan_and_fuse_into_a_checkpoint(six_layer_source, tmp_path, capsys):
    import mlx_lm

    from echo_mlx.tuner import adapters
    from echo_mlx.api import load

    run(six_layer_source, tmp_path / "run", plan="cla:2", iters=3)
    assert cli("generate", "--model", six_layer_source, "--plan", "cla:3", "--adapter-path", str(tmp_path / "run"),
               "--prompt", "hi", "--max-tokens", "2") == 2
    err = capsys.readouterr().err
    assert "trained for plan" in err and len(err.strip().splitlines()) == 1

    assert cli("fuse", "--model", six_layer_source, "--plan", "cla:2", "--adapter-path", str(tmp_path / "run"),
               "--out", str(tmp_path / "fused")) == 0
    with_adapters, _ = load(six_layer_source, plan="cla:2")
    adapters.apply(with_adapters, tmp_path / "run")
    fused, _ = load(str(tmp_path / "fused"))
    stock, _ = mlx_lm.load(str(tmp_path / "fused"), trust_remote_code=True)
    x = mx.array([[3, 5, 7, 11, 13]])
    expected = with_adapters(x)
    assert mx.allclose(fused(x), expected, atol=1e-4).item()
    assert mx.allclose(stock(x), expected, atol=1e-4).item()
    assert checkpoint.load_config(tmp_path / "fused")["echo"]["adapters"].endswith("run")


def test_plot_command_redraws_the_curve(six_layer_source, tmp_path):
    run(six_layer_source, tmp_path / "run", plan="cla:2", iters=2)
    (tmp_path / "run" / "loss.png").unlink()
    assert cli("plot", str(tmp_path / "run")) == 0
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_yaml_config_sets_mlx_lm_style_keys(six_layer_source, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"model: {six_layer_source}\nplan: cla:2\nfine_tune_type: dora\niters: 2\nbatch_size: 2\nmax_seq_length: 64\n"
        "lora_parameters: {rank: 2, scale: 4.0, dropout: 0.0}\n"
    )
    assert cli("finetune", "-c", str(config), "--adapter-path", str(tmp_path / "run")) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "dora" and saved["lora_parameters"]["rank"] == 2
    config.write_text("bogus_key: 1\n")
    assert cli("finetune", "-c", str(config)) == 2


@pytest.mark.skipif(sys.platform != "linux" and sys.platform != "darwin", reason="ring backend over TCP")
# dylora: every distributed rank draws the same ranks per step; with rank_draw "example",
# each takes its own examples' ranks of the global batch's draw.
@pytest.mark.parametrize("fine_tune_type, draw", [("lora", None), ("dylora", "step"), ("dylora", "example")])
def test_two_ring_ranks_equal_one_process(six_layer_source, tmp_path, fine_tune_type, draw):
    script = tmp_path / "job.py"
    lora = {"rank": 8, "dropout": 0.0, "scale": 20.0, **({"rank_draw": draw} if draw else {})}
    script.write_text(
        "import sys\nimport echo_mlx\nfrom echo_mlx.tuner.finetune import FinetuneArgs, finetune\n"
        # corpus windows only: equal-length rows, so both runs sum the same terms in the same order
        f"finetune(FinetuneArgs(model={six_layer_source!r}, plan='cla:2', fine_tune_type={fine_tune_type!r}, lora_parameters={lora!r}, data='corpus', iters=3, batch_size=4, max_seq_length=64, "
        "steps_per_report=1, steps_per_eval=3, learning_rate=1e-3, adapter_path=sys.argv[1]))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    launch = Path(sys.executable).with_name("mlx.launch")
    command = [str(launch)] if launch.exists() else [sys.executable, "-m", "mlx.distributed_run"]
    subprocess.run([*command, "--backend", "ring", "-n", "2", "--", sys.executable, str(script), str(tmp_path / "two")],
                   check=True, env=env, timeout=300, capture_output=True)
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert one.keys() == two.keys()
    # Adam's normalised steps magnify summation-order rounding where a gradient is near zero
    # (dylora's components that the early, small ranks left untrained).
    atol = 1e-5 if fine_tune_type == "lora" else 1e-4
    for k in one:
        np.testing.assert_allclose(np.array(two[k]), np.array(one[k]), atol=atol)


def test_lora_keys_choose_the_projections_trained_and_a_misspelt_key_is_refused(six_layer_source):
    from echo_mlx.conversion.convert import shared_model
    from echo_mlx.io.sources import load_source
    from echo_mlx.models.plans import SharingPlan
    from echo_mlx.tuner import adapters

    src = load_source(six_layer_source)
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0}

    def trained_modules(keys):
        model, _ = shared_model(src.config, src.weights, SharingPlan.parse("cla:2", 6))
        adapters.make_trainable(model, "lora", 2, dict(lora, keys=keys))
        return {k.split(".", 3)[3].rsplit(".", 1)[0] for k in adapters.trainable_weights(model)}

    # consumers of cla:2 have no k/v projections: the key still counts where producers have one
    assert trained_modules(["self_attn.q_proj", "self_attn.k_proj"]) == {"self_attn.q_proj", "self_attn.k_proj"}
    with pytest.raises(EchoError, match=r"keys q_proj name no linear layer .*self_attn\.") as e:
        trained_modules(["q_proj", "self_attn.o_proj"])  # mlx-lm would silently skip q_proj
    assert "\n" not in str(e.value)
