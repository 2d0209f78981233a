"""Vocab-parallel autograd ops: log-probs, entropy, nucleus (top-p) entropy (spec section 1).

Logits stay sharded by vocabulary over the tensor-parallel group; only per-token scalars (and,
for the nucleus, a bounded number of candidates per token) cross ranks.
"""

from megarl.ops.token_stats import (
    DEFAULT_CHUNK_SIZE,
    TokenStats,
    default_chunk_size,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
    vocab_parallel_nucleus_entropy,
    vocab_parallel_token_stats,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TokenStats",
    "default_chunk_size",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
    "vocab_parallel_nucleus_entropy",
    "vocab_parallel_token_stats",
]
