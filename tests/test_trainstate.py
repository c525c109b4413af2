"""Training checkpoints: exact resume, atomic writes, corruption detected."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from echo_mlx.errors import EchoError
from echo_mlx.tuner.trainstate import TrainState, check_same_config, load_state, save_state


def make():
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, optim.AdamW(learning_rate=1e-2)


def step(model, optimizer, key):
    key, sub = mx.random.split(key)
    x = mx.random.normal((5, 8), key=sub)  # random data: resume must restore the key
    loss_and_grad = nn.value_and_grad(model, lambda m: (m(x) ** 2).mean())
    loss, grads = loss_and_grad(model)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    return loss.item(), key


def snapshot(model, optimizer, n, key):
    return TrainState(dict(tree_flatten(model.trainable_parameters())), optimizer.state, n, key,
                      {"batch": n}, {"lr": 1e-2})


def run(model, optimizer, key, n):
    losses = []
    for _ in range(n):
        loss, key = step(model, optimizer, key)
        losses.append(loss)
    return losses, key


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    model, optimizer = make()
    straight, _ = run(model, optimizer, mx.random.key(7), 6)

    model, optimizer = make()
    first, key = run(model, optimizer, mx.random.key(7), 3)
    save_state(tmp_path / "ckpt", snapshot(model, optimizer, 3, key))

    model, optimizer = make()  # a fresh process would start here
    state = load_state(tmp_path / "ckpt")
    model.load_weights(list(state.weights.items()))
    optimizer.state = state.optimizer
    assert state.step == 3 and state.data_position == {"batch": 3}
    rest, _ = run(model, optimizer, state.rng_key, 3)
    assert first + rest == straight


def test_corrupted_checkpoint_is_refused(tmp_path):
    model, optimizer = make()
    _, key = step(model, optimizer, mx.random.key(0))
    path = save_state(tmp_path / "ckpt", snapshot(model, optimizer, 1, key))
    data = bytearray((path / "state.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(EchoError, match="fails its checksum") as err:
        load_state(path)
    assert "\n" not in str(err.value)
    (path / "state.json").write_text("{not json")
    with pytest.raises(EchoError, match="not valid JSON"):
        load_state(path)
    with pytest.raises(EchoError, match="run without --resume"):
        load_state(tmp_path / "missing")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = make()
    _, key = step(model, optimizer, mx.random.key(0))
    path = save_state(tmp_path / "ckpt", snapshot(model, optimizer, 1, key))
    _, key = step(model, optimizer, key)

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(OSError):
        save_state(path, snapshot(model, optimizer, 2, key))
    assert load_state(path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left


def test_changed_config_is_named_on_resume():
    check_same_config({"lr": 1e-5, "iters": 10}, {"lr": 1e-5, "iters": 20})  # more iterations is fine
    with pytest.raises(EchoError, match=r"lr: 1e-05 -> 0.0001, rank: 8 -> 16"):
        check_same_config({"lr": 1e-5, "rank": 8}, {"lr": 1e-4, "rank": 16})
