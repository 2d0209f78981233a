"""The root configuration: one section per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from .algorithm import AlgorithmConfig
from .checkpoint import CheckpointConfig
from .data import DataConfig
from .entropy import EntropyConfig
from .eval import EvalConfig
from .logging import LoggingConfig
from .model import ModelConfig
from .optimizer import OptimizerConfig
from .parallel import ParallelConfig
from .reward import RewardConfig
from .rollout import RolloutConfig
from .sync import SyncConfig
from .trainer import TrainerConfig


@dataclass(kw_only=True)
class MegarlConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The checkpoint and how the Megatron model is built."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor, pipeline, context, expert and data parallelism of the trainer."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam, learning-rate schedule, gradient clipping."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation servers and sampling."""

    sync: SyncConfig = field(default_factory=SyncConfig)
    """Weight updates from the trainer to the servers."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """Scoring of responses."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages, policy loss, batch sizes."""

    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    """The entropy intervention."""

    data: DataConfig = field(default_factory=DataConfig)
    """The prompt dataset."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs, metrics and progress."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmark evaluation."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run length, seed, bad-step handling."""


SECTIONS = tuple(MegarlConfig.__dataclass_fields__)
