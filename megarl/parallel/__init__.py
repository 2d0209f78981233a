"""Process groups and topology of the trainer (wraps Megatron's parallel_state)."""

from .groups import LaunchEnv, ParallelContext, init_distributed, launch_env, teardown
from .topology import check_topology, padded_vocab_size

__all__ = [
    "LaunchEnv", "ParallelContext", "check_topology", "init_distributed", "launch_env",
    "padded_vocab_size", "teardown",
]
