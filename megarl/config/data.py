"""`data`: the prompt dataset and how prompts are rendered into tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError, check_non_negative, check_positive


@dataclass(kw_only=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Prompt datasets, .jsonl or .parquet, read in order and shuffled together."""

    prompt_key: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages."""

    answer_key: str = "answer"
    """Column holding the reference answer the reward is computed against."""

    prompt_template: Optional[str] = None
    """Format string applied to a string prompt before the chat template, with `{prompt}`, e.g.
    "{prompt} Let's think step by step and output the final answer within \\boxed{{}}."."""

    system_prompt: Optional[str] = None
    """System message put before the prompt when the chat template is applied."""

    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (plain text when false or absent)."""

    max_prompt_tokens: int = 1024
    """Prompts longer than this are skipped (and counted)."""

    shuffle: bool = True
    """Shuffle prompts each epoch, seeded by trainer.seed and the epoch number."""

    max_reported_bad_rows: int = 5
    """Malformed rows are skipped and counted; this many are reported with file and line."""

    def validate(self) -> None:
        for i, path in enumerate(self.train_files):
            if not str(path).endswith((".jsonl", ".json", ".parquet")):
                raise ConfigError(f"data.train_files[{i}]",
                                  f"{path!r} is not a .jsonl, .json or .parquet file")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ConfigError("data.prompt_template", "must contain the placeholder {prompt}")
        check_positive("data", "max_prompt_tokens", self.max_prompt_tokens)
        check_non_negative("data", "max_reported_bad_rows", self.max_reported_bad_rows)
