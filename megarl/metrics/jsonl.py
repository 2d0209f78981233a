"""`<output_dir>/metrics.jsonl`: every logged step as one JSON object per line.

    {"step": 12, "wall_time": 1718000000.0, "reward/mean": 0.41, "entropy/mean": 0.83, ...}

The file is the run's durable record: `megarl report` and any notebook read it. It is written
append-only and flushed after every line, so a crash loses at most the line being written.
A resumed run opens it with the first step it will log (`start_step`): lines of that step and
later (written after the checkpoint it resumes from) are dropped, so steps never appear twice.
Several lines may share a step (training metrics, then evaluation of the same step); readers
merge them. Non-finite values are written as null (JSON has no NaN) and read back as NaN.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Mapping, Optional

METRICS_FILE = "metrics.jsonl"
RESERVED_KEYS = ("step", "wall_time")


class JsonlMetricsFile:
    """Appends step records to a metrics.jsonl file."""

    def __init__(self, path: str | Path, *, start_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_step = _prepare(self.path, start_step)
        self._file: Optional[IO[str]] = self.path.open("a", encoding="utf-8")

    def write(self, step: int, wall_time: float, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path} is closed")
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"step {step} comes after step {self.last_step} in {self.path}; "
                             "steps must not go back (a resumed run passes start_step)")
        record = {"step": step, "wall_time": round(wall_time, 3)}
        record |= {key: (value if math.isfinite(value) else None)
                   for key, value in metrics.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.last_step = step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _prepare(path: Path, start_step: Optional[int]) -> Optional[int]:
    """Drop a torn last line and, when resuming, every line of `start_step` or later; return
    the last step left in the file."""
    if not path.exists():
        return None
    kept: list[str] = []
    changed = False
    last_step: Optional[int] = None
    with path.open(encoding="utf-8") as f:
        for line in f:
            record = _parse_line(line)
            if record is None or (start_step is not None and record["step"] >= start_step):
                changed = True
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
            last_step = record["step"]
    if changed:
        # Rewrite beside the file and swap, so a crash now leaves either version whole.
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return last_step


def _parse_line(line: str) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of `<run dir>/metrics.jsonl`), one per step in step
    order, lines of the same step merged (later values win); nulls become NaN."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            record = _parse_line(line)
            if record is None:
                continue
            merged = by_step.setdefault(record["step"], {})
            merged.update({k: (math.nan if v is None else v) for k, v in record.items()})
    return [by_step[step] for step in sorted(by_step)]
