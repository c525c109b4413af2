"""Echo checkpoints: an mlx-lm model directory plus the model file.

Layout (what ``mlx_lm.load(path, trust_remote_code=True)`` expects):
``config.json`` (llama keys + the sharing plan + ``model_file``),
``model.safetensors``, tokenizer files, and ``echo_llama.py`` — a copy of
``echo_mlx/models/model.py``. ``echo_mlx`` itself never imports that copy: it builds
the model from its own installed ``echo_mlx.models.model``.

Checkpoints are written into a temporary sibling directory and renamed into
place, so an interrupted write never leaves a half-written checkpoint.
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import EchoError
from ..models import model as model_module

MODEL_FILE = "echo_llama.py"
MODEL_TYPE = "echo_llama"


def is_echo_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except json.JSONDecodeError:
        return False


def save(out, model: nn.Module, config: dict, tokenizer, *, force: bool = False) -> Path:
    """Write a checkpoint to ``out`` atomically (temp dir + rename)."""
    out = Path(out)
    if out.exists() and not force:
        raise EchoError(f"{out} already exists: choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        config = dict(config, model_type=MODEL_TYPE, model_file=MODEL_FILE)
        if "quantization" in config:
            config["quantization_config"] = config["quantization"]
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        shutil.copyfile(model_module.__file__, tmp / MODEL_FILE)
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_config(path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise EchoError(f"{path} has no config.json: pass an echo checkpoint made by `echo-mlx convert`")
    except json.JSONDecodeError as e:
        raise EchoError(f"{path / 'config.json'} is not valid JSON ({e}): re-run `echo-mlx convert`")


def load(path, *, lazy: bool = False) -> Tuple[nn.Module, object, dict]:
    """Load an echo checkpoint with echo_mlx's own model code: (model, tokenizer, config)."""
    from mlx_lm.utils import load_model, load_tokenizer

    path = Path(path)
    config = load_config(path)
    if config.get("model_type") != MODEL_TYPE:
        raise EchoError(
            f"{path} is not an echo checkpoint (model_type {config.get('model_type')!r}): "
            f"convert it first with `echo-mlx convert --model {path}`"
        )
    classes = lambda config: (model_module.Model, model_module.ModelArgs)
    try:
        # model_file=None: build from our installed code, never run the copy in the checkpoint.
        model, config = load_model(
            path, lazy=lazy, model_config={"model_file": None}, get_model_classes=classes
        )
    except FileNotFoundError as e:
        raise EchoError(f"{path}: {e}: the checkpoint is incomplete, re-run `echo-mlx convert`")
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EchoError(
            f"{path}: weights do not load ({first}): the checkpoint is corrupt or does not "
            f"match its config.json, re-run `echo-mlx convert`"
        )
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # tokenizer libraries raise many types
        raise EchoError(f"{path}: tokenizer does not load ({type(e).__name__}: {e}): re-run `echo-mlx convert`")
    return model, tokenizer, config


def kv_cache_bytes(cache) -> int:
    """Resident bytes of a prompt cache: every array its entries hold."""
    return sum(
        a.nbytes for entry in cache for _, a in tree_flatten(entry.state) if isinstance(a, mx.array)
    )
