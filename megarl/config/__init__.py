"""One root configuration (omegaconf structured dataclasses), loaded from YAML plus overrides."""

from .algorithm import AlgorithmConfig
from .checkpoint import CheckpointConfig
from .data import DataConfig
from .entropy import EntropyConfig
from .errors import ConfigError
from .eval import EvalConfig
from .loader import from_dict, load_config, to_yaml
from .logging import LoggingConfig
from .model import ModelConfig
from .optimizer import OptimizerConfig
from .parallel import ParallelConfig
from .reward import RewardConfig
from .rollout import RolloutConfig
from .root import SECTIONS, MegarlConfig
from .sync import SyncConfig
from .trainer import TrainerConfig
from .validate import load_dotted, validate

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "ConfigError", "DataConfig", "EntropyConfig",
    "EvalConfig", "LoggingConfig", "MegarlConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RewardConfig", "RolloutConfig", "SECTIONS", "SyncConfig",
    "TrainerConfig", "from_dict", "load_config", "load_dotted", "to_yaml", "validate",
]
