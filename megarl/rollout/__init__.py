"""Rollout: generation servers (SGLang or the CPU dev server) behind sglang-router, the async
client that talks to them, prompt data, rewards, and the per-step rollout batch.

What the trainer (global rank 0) calls, in order:

    servers = RolloutServers(cfg.rollout, model_path=hf_dir, log_dir=out).start()
    client = RolloutClient.from_config(cfg.rollout, servers.generate_urls)
    sampler = PromptSampler(PromptDataset.from_config(cfg.data, tokenizer), seed=cfg.trainer.seed,
                            shuffle=cfg.data.shuffle)
    scorer = RewardComputer.from_config(cfg.reward)
    ... each step: batch = collect_rollout_batch(client=client, sampler=sampler, scorer=scorer,
                                                 tokenizer=tokenizer, rollout=cfg.rollout,
                                                 algorithm=cfg.algorithm)
                   servers.check()     # failed servers leave the rotation (restarted if ours)
                   before a sync: the servers in servers.ready_to_return() are added to the
                   weight update (megarl/sync/__init__.py), then servers.return_to_rotation(...)
    ... checkpoints save sampler.state_dict() and restore it with sampler.load_state_dict()
    scorer.close(); client.close(); servers.stop()

Names are imported lazily, so `import megarl.rollout` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SGLANG_VERSION": "protocol", "SamplingParams": "protocol", "Response": "protocol",
    "ServerReplyError": "protocol",
    "RolloutServers": "servers", "ServerStartupError": "servers",
    "AsyncRolloutClient": "client", "RolloutClient": "client", "GenerationError": "client",
    "PromptDataset": "data", "PromptSampler": "data", "Prompt": "data", "DatasetError": "data",
    "RewardComputer": "reward", "RewardResult": "reward",
    "collect_rollout_batch": "batch", "RolloutBatch": "batch",
    "ServerAdmin": "admin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megarl.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
