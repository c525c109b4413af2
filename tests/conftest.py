import echo_mlx  # noqa: F401  first: loads OpenBLAS before anything imports mlx

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

TINY = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=6,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=97,
)


def tiny_llama_weights(seed=0, **overrides):
    """Random weights of an unshared tiny llama, with mlx-lm names."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**dict(TINY, **overrides)))
    return dict(tree_flatten(model.parameters()))


@pytest.fixture(scope="session")
def smollm2():
    """The real default model as a SourceModel (float32)."""
    from echo_mlx.io.sources import load_source

    return load_source("default")


@pytest.fixture(scope="session")
def six_layer_source(tmp_path_factory):
    """A float32 HF directory of a random 6-layer llama (the finetune tests' model)."""
    from fixtures import SIX, write_hf_dir

    path = tmp_path_factory.mktemp("src") / "llama"
    write_hf_dir(path, dtype="float32", config=SIX)
    return str(path)
