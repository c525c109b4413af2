"""echo-mlx: LLaMA on MLX with key/value caches shared across layers.

    import echo_mlx
    model, tokenizer = echo_mlx.load("smol-cla2")          # an echo checkpoint
    model, tokenizer = echo_mlx.load("default", plan="cla:2")  # convert in memory

Import echo_mlx before mlx: on Linux it first loads OpenBLAS (see echo_mlx.blas).
"""

from . import blas

blas.preload()  # must run before mlx.core is imported anywhere

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import echo_mlx` stays cheap and cannot import mlx too early.
    if name == "load":
        from .api import load

        return load
    if name == "convert":
        from .conversion.convert import convert

        return convert
    if name == "SharingPlan":
        from .models.plans import SharingPlan

        return SharingPlan
    raise AttributeError(f"module 'echo_mlx' has no attribute {name!r}")
