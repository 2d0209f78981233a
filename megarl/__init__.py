"""megarl: a Megatron-core reinforcement-learning backend for LLMs with vocab-parallel entropy control."""

__version__ = "0.1.0"
