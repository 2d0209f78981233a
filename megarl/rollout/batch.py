"""One step's rollout batch: generate, score, filter (DAPO dynamic sampling), shape.

`collect_rollout_batch(...)` is what the trainer calls each step. It draws
`rollout.prompts_per_step` prompts, samples `rollout.samples_per_prompt` responses for each (a
group), and scores them. With `algorithm.dynamic_sampling`, groups whose task rewards are all
equal (zero variance, so zero GRPO advantage) are dropped and more prompts are drawn, at most
`algorithm.max_sampling_rounds` extra rounds, until the batch holds `prompts_per_step` groups;
each extra round draws the missing number of groups divided by the keep rate seen so far (at
least a quarter), so a hard dataset does not need many rounds. A batch that is still short
after the last round is returned short (`counts["batch_full"] == 0`); the trainer decides.

Over-long responses (cut at max_new_tokens) follow `algorithm.overlong`: none keeps them,
filter leaves them out of the loss (`loss_mask` false), penalty subtracts DAPO's soft length
penalty: 0 up to max_new_tokens - overlong_buffer_tokens, then growing linearly to
overlong_penalty at max_new_tokens. Dynamic sampling looks at task rewards before that penalty.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from .data import Prompt
from .protocol import Response, SamplingParams

_MIN_KEEP_RATE = 0.25


@dataclass
class RolloutBatch:
    """Per-response lists, responses of one group adjacent; group_ids index the groups."""

    prompt_token_ids: list[list[int]] = field(default_factory=list)
    response_token_ids: list[list[int]] = field(default_factory=list)
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    """Task reward plus the over-long penalty: what advantages are computed from."""
    task_rewards: list[float] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    """False for responses left out of the loss (algorithm.overlong=filter)."""
    truncated: list[bool] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    weight_versions: list[Any] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.response_token_ids)

    @property
    def num_groups(self) -> int:
        return len(set(self.group_ids))

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (for recording a batch and replaying it without servers)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RolloutBatch":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"RolloutBatch.from_dict: unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class _Group:
    prompt: Prompt
    responses: list[Response]
    texts: list[str]
    task_rewards: list[float] = field(default_factory=list)


def overlong_penalty(length: int, *, max_new_tokens: int, buffer_tokens: int,
                     penalty: float) -> float:
    """DAPO's soft over-long punishment (<= 0) for a response of `length` tokens."""
    start = max_new_tokens - buffer_tokens
    if length <= start:  # with no buffer nothing is penalised, as in DAPO's formula
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer_tokens)


def collect_rollout_batch(*, client: Any, sampler: Any, scorer: Any, tokenizer: Any,
                          rollout: Any, algorithm: Any) -> RolloutBatch:
    """Generate, score and filter one step's batch (see the module docstring).

    client: `RolloutClient`; sampler: `PromptSampler`; scorer: `RewardComputer`;
    rollout/algorithm: the `RolloutConfig` and `AlgorithmConfig` sections.
    """
    need = rollout.prompts_per_step
    sampling = SamplingParams.from_config(rollout)
    counts: Counter = Counter()
    retries_before = client.stats.num_retries
    kept: list[_Group] = []
    to_draw, extra_rounds = need, 0
    while True:
        groups = _generate(client, sampler.next(to_draw), rollout.samples_per_prompt,
                           sampling, tokenizer)
        _score(groups, scorer, counts)
        counts["num_prompts_drawn"] += len(groups)
        counts["num_rounds"] += 1
        for group in groups:
            if algorithm.dynamic_sampling and len(set(group.task_rewards)) <= 1:
                counts["num_groups_dropped_zero_variance"] += 1
            else:
                kept.append(group)
        if (not algorithm.dynamic_sampling or len(kept) >= need
                or extra_rounds >= algorithm.max_sampling_rounds):
            break
        extra_rounds += 1
        keep_rate = max(len(kept) / counts["num_prompts_drawn"], _MIN_KEEP_RATE)
        to_draw = math.ceil((need - len(kept)) / keep_rate)
    batch = _assemble(kept[:need], rollout, algorithm)
    counts["num_groups"] = batch.num_groups
    counts["batch_full"] = int(batch.num_groups == need)
    counts["num_responses"] = len(batch)
    counts["num_truncated"] = sum(batch.truncated)
    counts["num_client_retries"] = client.stats.num_retries - retries_before
    batch.counts = dict(counts)
    return batch


def _generate(client: Any, prompts: Sequence[Prompt], samples: int, sampling: SamplingParams,
              tokenizer: Any) -> list[_Group]:
    requests = [list(p.token_ids) for p in prompts for _ in range(samples)]
    responses = client.generate_batch(requests, sampling)
    groups = []
    for i, prompt in enumerate(prompts):
        mine = responses[i * samples:(i + 1) * samples]
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in mine]
        groups.append(_Group(prompt, mine, texts))
    return groups


def _score(groups: list[_Group], scorer: Any, counts: Counter) -> None:
    texts = [t for g in groups for t in g.texts]
    answers = [g.prompt.answer for g in groups for _ in g.texts]
    result = scorer.score(texts, answers)
    counts["num_reward_timeouts"] += result.num_timeouts
    counts["num_reward_errors"] += result.num_errors
    offset = 0
    for group in groups:
        group.task_rewards = result.rewards[offset:offset + len(group.texts)]
        offset += len(group.texts)


def _assemble(groups: list[_Group], rollout: Any, algorithm: Any) -> RolloutBatch:
    batch = RolloutBatch()
    for group_id, group in enumerate(groups):
        for response, reward in zip(group.responses, group.task_rewards):
            shaped = reward
            if algorithm.overlong == "penalty":
                shaped += overlong_penalty(
                    len(response.token_ids), max_new_tokens=rollout.max_new_tokens,
                    buffer_tokens=algorithm.overlong_buffer_tokens,
                    penalty=algorithm.overlong_penalty)
            batch.prompt_token_ids.append(list(group.prompt.token_ids))
            batch.response_token_ids.append(list(response.token_ids))
            batch.rollout_logprobs.append(list(response.logprobs))
            batch.rewards.append(shaped)
            batch.task_rewards.append(reward)
            batch.group_ids.append(group_id)
            batch.truncated.append(response.truncated)
            batch.loss_mask.append(not (algorithm.overlong == "filter" and response.truncated))
            batch.finish_reasons.append(response.finish_reason)
            batch.answers.append(group.prompt.answer)
            batch.weight_versions.append(response.weight_version)
    return batch
