"""Hugging Face <-> Megatron checkpoints: per-family adapters, TP/PP layout, distributed save/load."""
