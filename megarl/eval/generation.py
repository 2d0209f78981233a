"""The one thing evaluation needs from a model: n sampled responses per prompt.

Evaluation talks to generation through the small `Generator` protocol, so the same code runs
against the rollout client of a training run (SGLang or the CPU dev server behind it, wrapped
by `ClientGenerator`), against a client of servers started by `megarl eval`, against recorded
responses (`RecordedGenerator`), and against a deterministic fake in tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from megarl.config.eval import EvalConfig


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How evaluation samples; built from the `eval` config section."""

    num_samples: int
    """Responses per prompt."""

    temperature: float
    top_p: float
    max_new_tokens: int

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> "SamplingParams":
        return cls(num_samples=cfg.samples_per_problem, temperature=cfg.temperature,
                   top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)


@runtime_checkable
class Generator(Protocol):
    """Samples responses; `sample(prompts, params)[i]` holds `params.num_samples` response
    texts for `prompts[i]`, in the order they were drawn."""

    def sample(self, prompts: Sequence[str], params: SamplingParams) -> list[list[str]]:
        ...


def render_prompt(problem: str, tokenizer: Optional[Any], cfg: EvalConfig) -> str:
    """The text sent to the model: the template filled with the problem, then the chat template
    (with the optional system message) when asked for and the tokenizer has one."""
    user = cfg.prompt_template.format(prompt=problem)
    if not cfg.apply_chat_template or getattr(tokenizer, "chat_template", None) is None:
        if cfg.system_prompt:
            return f"{cfg.system_prompt}\n\n{user}"
        return user
    messages = [{"role": "user", "content": user}]
    if cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_tokens(texts: Sequence[str], tokenizer: Optional[Any]) -> Optional[list[int]]:
    """Token counts of responses, or None without a tokenizer."""
    if tokenizer is None:
        return None
    return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def check_responses(prompts: Sequence[str], responses: Any, num_samples: int) -> list[list[str]]:
    """The generator's answer, checked: one list of `num_samples` strings per prompt."""
    if not isinstance(responses, list) or len(responses) != len(prompts):
        raise RuntimeError(f"generator returned {type(responses).__name__} of length "
                           f"{len(responses) if hasattr(responses, '__len__') else '?'} for "
                           f"{len(prompts)} prompts")
    for i, group in enumerate(responses):
        if len(group) != num_samples or not all(isinstance(r, str) for r in group):
            raise RuntimeError(f"generator returned {len(group)} responses (or non-strings) for "
                               f"prompt {i}, expected {num_samples} strings")
    return responses


class RecordedGenerator:
    """Replays responses recorded earlier (the samples.jsonl `megarl eval` writes: one JSON
    object per problem with `problem` and `responses`), so a finished evaluation can be
    re-scored with other k values or a newer verifier without any model. Prompts are matched
    by rendering each recorded problem the way `evaluate` does."""

    def __init__(self, path: str, tokenizer: Optional[Any], cfg: EvalConfig) -> None:
        self._by_prompt: dict[str, list[str]] = {}
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if "problem" not in record or "responses" not in record:
                    raise ValueError(f"{path}:{number}: a recorded sample needs 'problem' and "
                                     "'responses'")
                prompt = render_prompt(record["problem"], tokenizer, cfg)
                self._by_prompt[prompt] = [str(r) for r in record["responses"]]
        self.path = path

    def sample(self, prompts: Sequence[str], params: SamplingParams) -> list[list[str]]:
        out = []
        for prompt in prompts:
            if prompt not in self._by_prompt:
                raise KeyError(f"{self.path} has no recorded responses for prompt {prompt!r:.120}")
            recorded = self._by_prompt[prompt]
            if len(recorded) < params.num_samples:
                raise ValueError(f"{self.path} holds {len(recorded)} responses for prompt "
                                 f"{prompt!r:.80}, fewer than eval.samples_per_problem = "
                                 f"{params.num_samples}")
            out.append(recorded[:params.num_samples])
        return out


class ClientGenerator:
    """A `Generator` over megarl.rollout's `RolloutClient` (anything with its
    `generate_batch(prompts_token_ids, sampling) -> responses`): each prompt is tokenized once
    and sent `num_samples` times, all in one batch so the client keeps its servers busy."""

    def __init__(self, client: Any, tokenizer: Any, cfg: EvalConfig) -> None:
        if tokenizer is None:
            raise ValueError("sampling from servers needs the model's tokenizer (token ids in, "
                             "token ids out)")
        self.client = client
        self.tokenizer = tokenizer
        # A chat template writes its own special tokens; a plain prompt needs the tokenizer's.
        self._add_special = not (cfg.apply_chat_template
                                 and getattr(tokenizer, "chat_template", None) is not None)

    def sample(self, prompts: Sequence[str], params: SamplingParams) -> list[list[str]]:
        from megarl.rollout.protocol import SamplingParams as RequestSampling

        sampling = RequestSampling(temperature=params.temperature, top_p=params.top_p,
                                   max_new_tokens=params.max_new_tokens)
        n = params.num_samples
        ids = [self.tokenizer.encode(p, add_special_tokens=self._add_special) for p in prompts]
        responses = self.client.generate_batch([i for i in ids for _ in range(n)], sampling)
        texts = [self.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in responses]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def as_generator(source: Any, tokenizer: Optional[Any], cfg: EvalConfig) -> Generator:
    """`source` itself when it is a `Generator`, or a rollout client wrapped in one."""
    if isinstance(source, Generator):
        return source
    if hasattr(source, "generate_batch"):
        return ClientGenerator(source, tokenizer, cfg)
    raise TypeError(f"{type(source).__name__} is neither an eval Generator (sample(prompts, "
                    "params)) nor a rollout client (generate_batch(token_ids, sampling))")
