"""collect_rollout_batch: groups, DAPO dynamic sampling and its round limit, over-long shaping.

A scripted client answers each prompt the way its name says: "easy" prompts are always solved,
"hard" never, "mixed" every other sample, so which groups have reward variance is known."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from megarl.config import AlgorithmConfig, RolloutConfig
from megarl.rollout.batch import RolloutBatch, collect_rollout_batch, overlong_penalty
from megarl.rollout.client import ClientStats
from megarl.rollout.data import Prompt
from megarl.rollout.protocol import Response
from megarl.rollout.reward import RewardResult


class Text:
    """Tokens are characters."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class ScriptedClient:
    def __init__(self, long_every: int = 0) -> None:
        self.stats = ClientStats()
        self.long_every = long_every
        self.requests = 0

    def generate_batch(self, prompts, sampling):
        out, seen = [], Counter()
        for ids in prompts:
            name = Text.decode(ids)
            j = seen[name]
            seen[name] += 1
            kind, answer = name.split(":")
            right = kind == "easy" or (kind == "mixed" and j % 2 == 0)
            text = answer if right else "wrong"
            self.requests += 1
            long = self.long_every and self.requests % self.long_every == 0
            if long:
                text = text + "." * (sampling.max_new_tokens - len(text))
            out.append(Response(token_ids=Text.encode(text), logprobs=[-1.0] * len(text),
                                finish_reason="length" if long else "stop", weight_version="3"))
        return out


class ExactScorer:
    def score(self, responses, answers) -> RewardResult:
        return RewardResult(rewards=[float(r.rstrip(".") == a) for r, a in zip(responses, answers)],
                            num_timeouts=1)


class ListSampler:
    def __init__(self, names) -> None:
        self.stream = itertools.cycle(names)
        self.drawn = 0

    def next(self, count):
        self.drawn += count
        return [Prompt(token_ids=tuple(Text.encode(n)), answer=n.split(":")[1], text=n, source="t")
                for n in itertools.islice(self.stream, count)]


def collect(names, *, rollout=None, algorithm=None, client=None):
    rollout = rollout or RolloutConfig(prompts_per_step=4, samples_per_prompt=4, max_new_tokens=16)
    algorithm = algorithm or AlgorithmConfig()
    sampler = ListSampler(names)
    batch = collect_rollout_batch(client=client or ScriptedClient(), sampler=sampler,
                                  scorer=ExactScorer(), tokenizer=Text(), rollout=rollout,
                                  algorithm=algorithm)
    return batch, sampler


def test_plain_batch_layout():
    batch, sampler = collect(["easy:1", "hard:2", "mixed:3", "mixed:4"])
    assert len(batch) == 16 and batch.num_groups == 4 and sampler.drawn == 4
    assert batch.group_ids == [g for g in range(4) for _ in range(4)]
    assert batch.task_rewards[:4] == [1.0] * 4 and batch.task_rewards[4:8] == [0.0] * 4
    assert batch.task_rewards[8:12] == [1.0, 0.0, 1.0, 0.0]
    assert batch.rewards == batch.task_rewards and all(batch.loss_mask)
    assert batch.prompt_token_ids[0] == Text.encode("easy:1")
    assert batch.rollout_logprobs[0] == [-1.0] and batch.weight_versions[0] == "3"
    assert batch.counts["batch_full"] == 1 and batch.counts["num_rounds"] == 1
    assert batch.counts["num_reward_timeouts"] == 1
    assert RolloutBatch.from_dict(batch.as_dict()) == batch


def test_dynamic_sampling_drops_zero_variance_groups_and_draws_more():
    algorithm = AlgorithmConfig(dynamic_sampling=True, max_sampling_rounds=5)
    # one in four prompts has variance: the keep rate drives how many are drawn next
    batch, sampler = collect(["easy:1", "hard:2", "mixed:3", "easy:4"], algorithm=algorithm)
    assert batch.num_groups == 4 and batch.counts["batch_full"] == 1
    assert all(Text.decode(p).startswith("mixed") for p in batch.prompt_token_ids)
    # round 1: 4 drawn, 1 kept (rate 1/4): round 2 draws 3 / 0.25 = 12, then the batch is full
    assert sampler.drawn == batch.counts["num_prompts_drawn"] == 16
    assert batch.counts["num_rounds"] == 2
    assert batch.counts["num_groups_dropped_zero_variance"] == 12


def test_the_round_limit_returns_a_short_batch():
    algorithm = AlgorithmConfig(dynamic_sampling=True, max_sampling_rounds=2)
    batch, sampler = collect(["easy:1", "hard:2"], algorithm=algorithm)
    assert len(batch) == 0 and batch.counts["batch_full"] == 0
    assert batch.counts["num_rounds"] == 3  # the first round plus two extra
    assert batch.counts["num_groups_dropped_zero_variance"] == sampler.drawn


def test_overlong_filter_and_penalty():
    rollout = RolloutConfig(prompts_per_step=2, samples_per_prompt=4, max_new_tokens=16)
    filtered, _ = collect(["mixed:ab", "mixed:cd"], rollout=rollout, client=ScriptedClient(3),
                          algorithm=AlgorithmConfig(overlong="filter"))
    assert filtered.truncated == [i % 3 == 2 for i in range(8)]
    assert filtered.loss_mask == [not t for t in filtered.truncated]
    assert filtered.rewards == filtered.task_rewards
    penalised, _ = collect(["mixed:ab", "mixed:cd"], rollout=rollout, client=ScriptedClient(3),
                           algorithm=AlgorithmConfig(overlong="penalty", overlong_buffer_tokens=4,
                                                     overlong_penalty=0.5))
    assert all(penalised.loss_mask)
    for reward, task, truncated in zip(penalised.rewards, penalised.task_rewards,
                                       penalised.truncated):
        assert reward == pytest.approx(task - (0.5 if truncated else 0.0))


@pytest.mark.parametrize("length,expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5),
                                             (16, -1.0), (20, -1.0)])
def test_overlong_penalty_ramp(length, expected):
    assert overlong_penalty(length, max_new_tokens=16, buffer_tokens=4, penalty=1.0) == expected
    assert overlong_penalty(16, max_new_tokens=16, buffer_tokens=0, penalty=2.0) == 0.0
