"""Prompt datasets: reading, checking, rendering and an exactly resumable sampling cursor.

`PromptDataset` reads `.jsonl` (one JSON object per line), `.json` (the same, or one JSON array
of objects; rows are then numbered instead of lines) and `.parquet` files, takes
the prompt from `data.prompt_key` (a string, or a list of {"role", "content"} messages) and the
reference answer from `data.answer_key` (a string or a number), applies `data.prompt_template`
and `data.system_prompt`, renders the tokenizer's chat template (with the generation prompt),
tokenizes, and skips prompts longer than `data.max_prompt_tokens`. Malformed rows (undecodable
lines, missing keys, wrong types) are skipped and counted, and the first
`data.max_reported_bad_rows` are reported with their file and line.

`PromptSampler` hands out prompts in an order shuffled per epoch from (seed, epoch), so its
state is just the cursor (epoch, position), which checkpoints save with `state_dict()` and
restore exactly with `load_state_dict()`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset cannot be used at all (no file, no usable row)."""


@dataclass(frozen=True)
class Prompt:
    """One usable prompt."""

    token_ids: tuple[int, ...]
    answer: str
    text: str
    """The rendered prompt (after template and chat template)."""
    source: str
    """file:line of the row it came from."""


@dataclass
class DatasetStats:
    num_rows: int = 0
    num_malformed: int = 0
    num_too_long: int = 0
    reported: list[str] = field(default_factory=list)


def _read_rows(path: Path) -> Iterator[tuple[int, Any, Optional[str]]]:
    """(line number, row, error) for every row; error is set for undecodable lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row, None
        return
    if path.suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(f"{path}: not a valid JSON array ({exc})") from None
        for i, row in enumerate(rows, start=1):  # "line" is the row number here
            yield i, row, None
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield i, json.loads(raw.decode("utf-8")), None
            except (UnicodeDecodeError, ValueError) as exc:
                yield i, None, f"not valid JSON ({exc})"


def _check_row(row: Any, prompt_key: str, answer_key: str) -> Optional[str]:
    """Why `row` is unusable, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in (prompt_key, answer_key):
        if key not in row or row[key] is None:
            return f"missing key {key!r} (keys: {', '.join(sorted(map(str, row)))})"
    prompt, answer = row[prompt_key], row[answer_key]
    if isinstance(prompt, list):
        for j, msg in enumerate(prompt):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                return (f"{prompt_key}[{j}]: expected {{'role': str, 'content': str}}, "
                        f"got {msg!r:.60}")
    elif not isinstance(prompt, str):
        return f"{prompt_key}: expected a string or a list of messages, got {type(prompt).__name__}"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"{answer_key}: expected a string or a number, got {type(answer).__name__}"
    return None


class PromptDataset:
    """Every usable prompt of `data.train_files`, rendered and tokenized (see module doc)."""

    def __init__(self, files: Sequence[str | Path], tokenizer: Any, *, prompt_key: str = "prompt",
                 answer_key: str = "answer", prompt_template: Optional[str] = None,
                 system_prompt: Optional[str] = None, apply_chat_template: bool = True,
                 max_prompt_tokens: int = 1024, max_reported_bad_rows: int = 5) -> None:
        if not files:
            raise DatasetError("data.train_files is empty")
        self.tokenizer = tokenizer
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = apply_chat_template and has_template
        self.max_prompt_tokens = max_prompt_tokens
        self.max_reported = max_reported_bad_rows
        self.stats = DatasetStats()
        self.prompts: list[Prompt] = []
        for path in map(Path, files):
            if not path.is_file():
                raise DatasetError(f"data.train_files: {path} does not exist")
            self._load(path)
        logger.info("prompts: %d usable of %d rows (%d malformed, %d longer than %d tokens)",
                    len(self.prompts), self.stats.num_rows, self.stats.num_malformed,
                    self.stats.num_too_long, max_prompt_tokens)
        if not self.prompts:
            raise DatasetError(f"no usable prompt in {', '.join(map(str, files))}: "
                               f"{self.stats.num_malformed} malformed, "
                               f"{self.stats.num_too_long} too long; first problems: "
                               + "; ".join(self.stats.reported))

    @classmethod
    def from_config(cls, data: Any, tokenizer: Any) -> "PromptDataset":
        return cls(data.train_files, tokenizer, prompt_key=data.prompt_key,
                   answer_key=data.answer_key, prompt_template=data.prompt_template,
                   system_prompt=data.system_prompt, apply_chat_template=data.apply_chat_template,
                   max_prompt_tokens=data.max_prompt_tokens,
                   max_reported_bad_rows=data.max_reported_bad_rows)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def _load(self, path: Path) -> None:
        for line, row, error in _read_rows(path):
            self.stats.num_rows += 1
            where = f"{path}:{line}"
            error = error or _check_row(row, self.prompt_key, self.answer_key)
            if error is not None:
                self.stats.num_malformed += 1
                self._report(f"{where}: {error}")
                continue
            text = self.render(row[self.prompt_key])
            ids = self.tokenize(text)
            if len(ids) > self.max_prompt_tokens:
                self.stats.num_too_long += 1
                continue
            self.prompts.append(Prompt(tuple(ids), str(row[self.answer_key]), text, where))

    def _report(self, message: str) -> None:
        if len(self.stats.reported) < self.max_reported:
            self.stats.reported.append(message)
            logger.warning("skipping malformed row %s", message)

    def render(self, prompt: str | list[dict]) -> str:
        """The prompt text the model sees: template, system prompt, chat template."""
        if isinstance(prompt, str):
            if self.prompt_template is not None:
                prompt = self.prompt_template.format(prompt=prompt)
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = list(prompt)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def tokenize(self, text: str) -> list[int]:
        # a chat template already holds its special tokens; plain text gets the tokenizer's own
        encoded = self.tokenizer(text, add_special_tokens=not self.use_chat_template)
        return list(encoded["input_ids"])


class PromptSampler:
    """An endless stream of prompts, reshuffled each epoch; resumable from (epoch, position)."""

    def __init__(self, dataset: PromptDataset, *, seed: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next(self, count: int) -> list[Prompt]:
        """The next `count` prompts, continuing into the next epoch when this one ends."""
        out = []
        while len(out) < count:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._order_of(self.epoch)
            take = min(count - len(out), len(self._order) - self.position)
            out += [self.dataset[int(i)] for i in self._order[self.position:self.position + take]]
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_prompts", len(self.dataset)) != len(self.dataset):
            raise DatasetError(f"the checkpoint's cursor is for {state['num_prompts']} prompts but "
                               f"the dataset now has {len(self.dataset)}: the data changed")
        if state.get("seed", self.seed) != self.seed:
            raise DatasetError(f"the checkpoint's cursor was shuffled with seed {state['seed']}, "
                               f"this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
