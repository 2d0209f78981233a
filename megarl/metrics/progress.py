"""Progress of long loops (training steps, checkpoint conversion, evaluation).

On a terminal it is a live tqdm bar with the latest status (reward, entropy, phase times);
when output goes to a file or a pipe (Slurm logs, CI) a bar would fill the log with carriage
returns, so it prints a plain line every `print_every` units instead:

    train: step 12/100 (12%) | reward 0.412 | entropy 0.831 | rollout 12.3s | 1m02s, eta 7m35s

`logging.progress`: auto (live only on a terminal), on (always live), off (plain lines).

    with Progress.from_config(cfg.logging, total=cfg.trainer.num_steps, desc="train",
                              initial=start_step) as progress:
        for step in ...:
            progress.advance(1, step_status(metrics))
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Mapping, Optional

from megarl.config.logging import LoggingConfig

STATUS_KEYS = (("reward/mean", "reward"), ("entropy/mean", "entropy"),
               ("entropy/nucleus_mean", "nucleus entropy"))
"""Step metrics shown in the status, with their short labels; `time/*` phases follow."""


def step_status(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a training step's metrics worth a glance: reward, entropies, phase times."""
    status: dict[str, Any] = {label: float(metrics[key]) for key, label in STATUS_KEYS
                              if key in metrics}
    for key, value in metrics.items():
        if key.startswith("time/"):
            status[key.removeprefix("time/")] = _Seconds(float(value))
    return status


class _Seconds(float):
    """A duration, shown with its unit."""

    def __str__(self) -> str:
        return f"{float(self):.1f}s"


def live_enabled(mode: str, stream: IO[str]) -> bool:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"progress mode {mode!r} is not one of 'auto', 'on', 'off'")
    if mode == "auto":
        return bool(getattr(stream, "isatty", lambda: False)())
    return mode == "on"


class Progress:
    """Counts units of work towards `total` (None: unknown) and shows them (module docstring).

    `enabled=False` (e.g. every rank but the logging one) turns it into a no-op.
    """

    def __init__(
        self, total: Optional[int], *, desc: str, unit: str = "step", mode: str = "auto",
        initial: int = 0, print_every: int = 1, enabled: bool = True,
        stream: Optional[IO[str]] = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count = initial
        self.print_every = max(1, print_every)
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._initial = initial
        self._start = time.monotonic()
        self._bar = None
        if enabled and live_enabled(mode, self._stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             file=self._stream, dynamic_ncols=True)

    @classmethod
    def from_config(cls, cfg: LoggingConfig, total: Optional[int], *, desc: str,
                    **kwargs: Any) -> "Progress":
        """Mode from `logging.progress`; plain lines every `logging.log_interval` units."""
        kwargs.setdefault("print_every", cfg.log_interval)
        return cls(total, desc=desc, mode=cfg.progress, **kwargs)

    @property
    def live(self) -> bool:
        return self._bar is not None

    def advance(self, n: int = 1, status: Optional[Mapping[str, Any]] = None) -> None:
        """Count `n` more units done and show `status` (label -> value)."""
        if not self.enabled:
            return
        before = self.count
        self.count += n
        text = format_status(status or {})
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(n)
            return
        finished = self.total is not None and self.count >= self.total
        if finished or self.count // self.print_every > before // self.print_every:
            self._stream.write(self.line(text) + "\n")
            self._stream.flush()

    def line(self, status_text: str = "") -> str:
        """The plain progress line for the current count."""
        elapsed = time.monotonic() - self._start
        done = self.count - self._initial
        parts = [f"{self.desc}: {self.unit} {self.count}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.count / self.total:.0f}%)"
        if status_text:
            parts.append(status_text)
        timing = format_duration(elapsed)
        if self.total and done > 0 and self.count < self.total:
            timing += f", eta {format_duration(elapsed / done * (self.total - self.count))}"
        parts.append(timing)
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def format_status(status: Mapping[str, Any]) -> str:
    return " | ".join(f"{label} {_format_value(value)}" for label, value in status.items())


def _format_value(value: Any) -> str:
    if isinstance(value, _Seconds) or not isinstance(value, float):
        return str(value)
    return f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """1h02m, 7m35s or 12s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
