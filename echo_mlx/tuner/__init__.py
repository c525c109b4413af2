"""Training (``echo-mlx finetune``): the loop, distillation, the layer-wise phase,
schedules, data, resumable training state, adapters, fuse and loss plots."""
