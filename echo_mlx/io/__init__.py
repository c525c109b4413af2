"""Loading and writing: source models (GGUF, Hugging Face and mlx-lm directories,
hub ids), their tokenizers, echo checkpoints, and the shipped default model."""
