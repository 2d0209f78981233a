"""`megarl report RUN_DIR [RUN_DIR ...]`: compare training runs side by side.

Reads each run's `metrics.jsonl` and writes into `--output-dir`:
- `report.png`: reward, entropy, nucleus entropy, covariance statistics, clip fractions, AER
  alpha, SIREN anchor and response length over steps, all runs overlaid (one colour per run),
  plus the entropy-performance law R = -a exp(H) + b fitted to each run;
- `report.html`: one self-contained page (the image embedded) with a summary table per run:
  reward and entropy at the first and last step, the law's a, b, predicted ceiling and R^2, and
  the last logged evaluation averages.

    megarl report runs/grpo runs/clip_cov runs/siren --smooth 5 -o reports/entropy
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .figures import ENTROPY_KEY, REWARD_KEY, Run, build_figure, load_runs
from .table import html_table, text_table

EVAL_AVERAGE_PREFIX = "eval/average/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run output directories (each with a metrics.jsonl)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("report"),
                        help="where report.png and report.html go (default: ./report)")
    parser.add_argument("--names", nargs="+", default=None,
                        help="legend names of the runs, in order (default: directory names)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving-average window over steps for the curves (default: 1, none)")
    parser.add_argument("--title", default="megarl training report", help="page title")


def run(args: argparse.Namespace) -> int:
    if args.smooth < 1:
        raise SystemExit(f"--smooth must be >= 1, got {args.smooth}")
    runs = load_runs(args.run_dirs, args.names)
    paths = write_report(runs, args.output_dir, smooth_window=args.smooth, title=args.title)
    header, rows = summary(runs)
    print(text_table(header, rows))
    for path in paths:
        print(f"wrote {path}")
    return 0


def write_report(runs: Sequence[Run], output_dir: Path, *, smooth_window: int = 1,
                 title: str = "megarl training report") -> list[Path]:
    """Write report.png and report.html; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fig = build_figure(runs, smooth_window=smooth_window)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png = buffer.getvalue()
    png_path = output_dir / "report.png"
    png_path.write_bytes(png)
    html_path = output_dir / "report.html"
    html_path.write_text(render_html(runs, png, title), encoding="utf-8")
    return [png_path, html_path]


def summary(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per run."""
    eval_keys = sorted({k for run in runs for k in run.keys() if k.startswith(EVAL_AVERAGE_PREFIX)})
    header = ["run", "steps", "reward first", "reward last", "reward max", "entropy first",
              "entropy last", "law a", "law b", "law ceiling", "law R^2"]
    header += [k.removeprefix("eval/") for k in eval_keys]
    rows = []
    for run in runs:
        _, rewards = run.series(REWARD_KEY)
        _, entropies = run.series(ENTROPY_KEY)
        law = run.law()
        cells = [run.name, str(run.records[-1]["step"]) if run.records else "0",
                 _first(rewards), _last(rewards), _fmt(max(rewards) if rewards else None),
                 _first(entropies), _last(entropies)]
        cells += ([_fmt(law.a), _fmt(law.b), _fmt(law.ceiling), _fmt(law.r2)] if law
                  else ["-"] * 4)
        cells += [_last(run.series(key)[1]) for key in eval_keys]
        rows.append(cells)
    return header, rows


def render_html(runs: Sequence[Run], png: bytes, title: str) -> str:
    """A page that needs no other file: the PNG is inlined as base64."""
    header, rows = summary(runs)
    image = base64.b64encode(png).decode("ascii")
    sources = "".join(f"<li>{html.escape(run.name)}: <code>{html.escape(run.path)}</code> "
                      f"({len(run.records)} steps)</li>" for run in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
{html_table(header, rows)}
<p>Entropy-performance law R = -a exp(H) + b fitted to (entropy/mean, reward/mean) of every
step; the ceiling b - a is the reward it predicts at zero entropy.</p>
<h2>Curves</h2>
<img alt="training curves" src="data:image/png;base64,{image}">
<h2>Runs</h2><ul>{sources}</ul>
</body></html>
"""


def _fmt(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}"


def _first(values: list[Any]) -> str:
    return _fmt(values[0] if values else None)


def _last(values: list[Any]) -> str:
    return _fmt(values[-1] if values else None)
