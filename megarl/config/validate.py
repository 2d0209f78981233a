"""Rules that span sections, and the check of plugin paths. Section-local rules live in each
section's `validate()`."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError
from .root import SECTIONS, MegarlConfig

GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo")


def load_dotted(path: str, key: str) -> Any:
    """Import `package.module:attribute`; a ConfigError naming `key` if that fails."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(key, f"{path!r} is not a dotted path 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import module {module_name!r} of {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def validate(config: MegarlConfig) -> MegarlConfig:
    """Check every section, then the rules between sections. Returns the config."""
    for name in SECTIONS:
        getattr(config, name).validate()

    rollout, algo = config.rollout, config.algorithm
    if algo.advantage in GROUP_ADVANTAGES and rollout.samples_per_prompt < 2:
        raise ConfigError(
            "rollout.samples_per_prompt",
            f"{rollout.samples_per_prompt} is too small for algorithm.advantage={algo.advantage}, "
            "which compares each response with the other responses to its prompt: use >= 2",
        )
    if algo.dynamic_sampling and rollout.samples_per_prompt < 2:
        raise ConfigError("algorithm.dynamic_sampling",
                          "needs rollout.samples_per_prompt >= 2 to measure reward variance")
    if algo.prompts_per_mini_batch is not None and rollout.prompts_per_step % algo.prompts_per_mini_batch:
        raise ConfigError(
            "algorithm.prompts_per_mini_batch",
            f"{algo.prompts_per_mini_batch} does not divide rollout.prompts_per_step "
            f"({rollout.prompts_per_step})",
        )
    if config.sync.transport == "colocated" and rollout.mode != "colocated":
        raise ConfigError("sync.transport", "colocated needs rollout.mode=colocated")
    if rollout.mode == "colocated" and rollout.backend != "sglang":
        raise ConfigError("rollout.mode",
                          "colocated needs rollout.backend=sglang (the CPU dev server cannot share GPUs)")
    if rollout.mode == "colocated" and config.sync.transport != "colocated":
        raise ConfigError("sync.transport",
                          "rollout.mode=colocated needs sync.transport=colocated (the servers "
                          "release their memory while the actor trains)")
    if rollout.mode == "colocated" and rollout.server_urls:
        raise ConfigError("rollout.server_urls",
                          "must be empty with rollout.mode=colocated (megarl starts colocated servers)")
    if config.trainer.replay_dir is not None and config.trainer.record_rollouts:
        raise ConfigError("trainer.record_rollouts",
                          "cannot record while replaying from trainer.replay_dir")

    if config.reward.function != "math":
        if not callable(load_dotted(config.reward.function, "reward.function")):
            raise ConfigError("reward.function", f"{config.reward.function!r} is not callable")
    return config
