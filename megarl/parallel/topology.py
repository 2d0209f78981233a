"""Checks of a parallel layout against the world size and the model, made before any process
group or model exists, and the vocabulary padding that tensor parallelism needs."""

from __future__ import annotations

from megarl.config import ConfigError, ParallelConfig
from megarl.models.shape import ModelShape


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up so that every tensor-parallel rank holds an equal shard whose
    size is a multiple of `divisible_by`."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_topology(
    parallel: ParallelConfig, world_size: int, shape: ModelShape | None = None,
    divisible_by: int = 128,
) -> int:
    """Raise a ConfigError naming the offending setting; return the data-parallel size."""
    mp = parallel.tp * parallel.pp * parallel.cp
    if world_size % mp:
        raise ConfigError(
            "parallel",
            f"world size {world_size} is not divisible by tp x pp x cp = {parallel.tp} x "
            f"{parallel.pp} x {parallel.cp} = {mp}",
        )
    dp = world_size // mp
    if parallel.ep > 1 and (dp * parallel.cp) % parallel.ep:
        raise ConfigError("parallel.ep", f"{parallel.ep} does not divide dp x cp = {dp * parallel.cp}")
    if shape is None:
        return dp
    if shape.num_attention_heads % parallel.tp:
        raise ConfigError(
            "parallel.tp", f"{parallel.tp} does not divide the {shape.num_attention_heads} "
            "attention heads of the model",
        )
    if shape.num_query_groups % parallel.tp:
        raise ConfigError(
            "parallel.tp", f"{parallel.tp} does not divide the {shape.num_query_groups} "
            "key/value heads (query groups) of the model",
        )
    if shape.ffn_hidden_size % parallel.tp:
        raise ConfigError(
            "parallel.tp", f"{parallel.tp} does not divide the MLP width {shape.ffn_hidden_size}"
        )
    stages = parallel.pp * (parallel.vpp or 1)
    if shape.num_layers % stages:
        what = "pp" if parallel.vpp is None else f"pp x vpp = {parallel.pp} x {parallel.vpp}"
        raise ConfigError(
            "parallel.pp" if parallel.vpp is None else "parallel.vpp",
            f"the model's {shape.num_layers} layers cannot be split evenly over {what} = {stages} "
            "pipeline stages",
        )
    if parallel.vpp is not None and shape.num_layers // stages < 1:
        raise ConfigError("parallel.vpp", "leaves a virtual stage without layers")
    padded = padded_vocab_size(shape.vocab_size, parallel.tp, divisible_by)
    assert padded % parallel.tp == 0 and padded >= shape.vocab_size
    return dp
