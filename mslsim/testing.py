"""Helpers for tests that run kernels under mslsim."""

import os

from .build import INSTALL_HINT, clang_available


def require_clang():
    """Skip the calling test when clang is missing, except on CI (CI set), where it fails."""
    import pytest

    if clang_available():
        return
    message = f"clang >= 17 not found; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Metal kernel tests: {message} (scripts/setup.sh does)")
    pytest.skip(message)


def mutated(factory, old: str, new: str):
    """A kernel factory that plants a bug: replaces `old` by `new` in every
    kernel's source and header; `make.hits` lists the kernels it changed."""
    hits = []

    def make(**kwargs):
        for part in ("source", "header"):
            text = kwargs.get(part, "")
            if old in text:
                hits.append(kwargs["name"])
                kwargs = dict(kwargs, **{part: text.replace(old, new)})
        return factory(**kwargs)

    make.hits = hits
    return make


def verbose_factory(factory):
    """A kernel factory whose kernels always print their generated source."""

    def make(**kwargs):
        kernel = factory(**kwargs)
        return lambda **call: kernel(**call, verbose=True)

    return make


def mlx_outputs(factory):
    """A kernel factory whose kernels return mx arrays of the requested dtypes,
    as mx.fast.metal_kernel's do (mslsim's return numpy): for running code
    written for MLX kernels, such as the model's attention, under mslsim."""
    import mlx.core as mx

    def make(**kwargs):
        kernel = factory(**kwargs)

        def call(**call):
            outputs = kernel(**call)
            return [mx.array(out).astype(dtype) for out, dtype in zip(outputs, call["output_dtypes"])]

        return call

    return make
