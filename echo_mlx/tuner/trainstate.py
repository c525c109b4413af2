"""Training checkpoints that survive crashes.

A checkpoint is a directory with ``state.safetensors`` (trainable weights,
optimizer state, PRNG key) and ``state.json`` (step, data position, the run's
config, and the SHA-256 of the safetensors file). It is written into a
temporary sibling and renamed over the old one, so a crash mid-write leaves
the previous checkpoint intact; the checksum is verified on load, so a
truncated or altered file is refused instead of silently resuming from it.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import EchoError

WEIGHTS, META = "state.safetensors", "state.json"


@dataclass
class TrainState:
    weights: Dict[str, mx.array]  # trainable parameters, flattened names
    optimizer: Any  # the optimizer's state tree
    step: int
    # The training loop threads an explicit PRNG key (mx.random.split each
    # step) instead of MLX's global generator, whose state cannot be restored.
    rng_key: mx.array
    data_position: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state(path, state: TrainState) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        arrays = {f"weights.{k}": v for k, v in state.weights.items()}
        # Scalars in the optimizer state (step, learning rate) are arrays too.
        arrays.update({f"optimizer.{k}": mx.array(v) for k, v in tree_flatten(state.optimizer)})
        arrays["rng_key"] = state.rng_key
        mx.save_safetensors(str(tmp / WEIGHTS), arrays)
        meta = {
            "step": state.step,
            "data_position": state.data_position,
            "config": state.config,
            "sha256": _sha256(tmp / WEIGHTS),
        }
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_state(path) -> TrainState:
    path = Path(path)
    fix = "delete it to start over, or resume from another checkpoint"
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise EchoError(f"no training checkpoint in {path}: run without --resume to start a new run")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EchoError(f"training checkpoint {path} is corrupt ({META} is not valid JSON): {fix}")
    weights_file = path / WEIGHTS
    if not weights_file.is_file() or _sha256(weights_file) != meta.get("sha256"):
        raise EchoError(f"training checkpoint {path} is corrupt ({WEIGHTS} fails its checksum): {fix}")
    arrays = mx.load(str(weights_file))
    part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return TrainState(
        weights=part("weights."),
        optimizer=tree_unflatten(list(part("optimizer.").items())),
        step=meta["step"],
        rng_key=arrays["rng_key"],
        data_position=meta["data_position"],
        config=meta["config"],
    )


def check_same_config(saved: dict, current: dict, ignore=("iters", "resume")) -> None:
    """Refuse to resume a run whose settings changed (other than the ignored ones)."""
    keys = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if keys:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)
        raise EchoError(f"--resume with a changed config ({changes}): use the original settings or start a new run")
