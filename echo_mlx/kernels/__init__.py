"""Custom Metal kernels for echo-mlx.

Each kernel module keeps its MSL source as Python constants and exposes
`build(factory=mx.fast.metal_kernel)`. On Linux the tests pass
`mslsim.metal_kernel` (the repo's dev-only simulator) instead, which runs the
same source on the CPU.

  decode_attention            GQA decode attention over a float K/V cache
  quantized_decode_attention  the same over mlx-lm's affine-quantized K/V
  dispatch                    which one the model's attention runs, or ops
"""
