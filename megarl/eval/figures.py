"""The report figure: training curves of one or more runs overlaid, one panel per quantity, and
the entropy-performance law fitted to each run.

Each run has one colour in every panel (the figure legend names it); inside a panel that shows
several metrics (e.g. both PPO clip fractions) each metric has its own line style. A panel whose
metrics no run logged stays in the grid with a note saying so, so a missing curve is visible
as missing rather than silently absent. The figure is built with matplotlib's object API on an
Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megarl.metrics.entropy_law import ENTROPY_KEY, REWARD_KEY, EntropyLawFit, fit_entropy_law
from megarl.metrics.jsonl import METRICS_FILE, read_metrics

LINE_STYLES = ("-", "--", ":", "-.")
EMPTY_NOTE = "no run logged"


@dataclass(frozen=True)
class Panel:
    """One subplot: the metrics it draws, given as names or glob patterns."""

    title: str
    patterns: tuple[str, ...]

    def keys(self, available: set[str]) -> list[str]:
        """The metric names of `available` this panel draws, patterns in order."""
        found: list[str] = []
        for pattern in self.patterns:
            found += sorted(k for k in available if fnmatch.fnmatchcase(k, pattern)
                            and k not in found)
        return found


PANELS = (
    Panel("Reward", (REWARD_KEY,)),
    Panel("Entropy", (ENTROPY_KEY,)),
    Panel("Nucleus entropy", ("entropy/nucleus_mean",)),
    Panel("Covariance of log-prob and advantage", ("cov/*",)),
    Panel("Clip fractions", ("ppo/clip_frac*", "ppo/dual_clip_frac", "clip_cov/*frac*",
                             "kl_cov/*frac*")),
    Panel("AER coefficient alpha", ("aer/alpha",)),
    Panel("SIREN anchor", ("siren/anchor", "siren/selected_entropy")),
    Panel("Response length", ("response_length/mean",)),
)
"""The curve panels, in reading order; the entropy-law panel comes last."""

LAW_TITLE = "Entropy-performance law R = -a exp(H) + b"


@dataclass(frozen=True)
class Run:
    """One run's metrics.jsonl, read."""

    name: str
    path: str
    records: tuple[dict[str, Any], ...]

    def keys(self) -> set[str]:
        return {key for record in self.records for key in record}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric over the steps that logged a finite value of it."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if _finite(value):
                steps.append(record["step"])
                values.append(float(value))
        return steps, values

    def law_points(self) -> tuple[list[float], list[float]]:
        """(entropies, rewards) of the steps that logged both."""
        pairs = [(r[ENTROPY_KEY], r[REWARD_KEY]) for r in self.records
                 if _finite(r.get(ENTROPY_KEY)) and _finite(r.get(REWARD_KEY))]
        return [h for h, _ in pairs], [r for _, r in pairs]

    def law(self) -> Optional[EntropyLawFit]:
        """The law fitted to the steps that logged both entropy and reward (3 at least)."""
        entropies, rewards = self.law_points()
        return fit_entropy_law(entropies, rewards) if len(entropies) >= 3 else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_runs(run_dirs: Sequence[str | Path], names: Optional[Sequence[str]] = None) -> list[Run]:
    """Read each directory's metrics.jsonl; runs are named by their directory (its parent too
    where two directories share a name) unless `names` are given."""
    paths = [Path(d) for d in run_dirs]
    for path in paths:
        if not (path / METRICS_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {METRICS_FILE} (is it a run's output_dir?)")
    if names is None:
        names = [p.resolve().name for p in paths]
        if len(set(names)) < len(names):
            names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    return [Run(name=n, path=str(p), records=tuple(read_metrics(p))) for n, p in zip(names, paths)]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what exists)."""
    if window <= 1:
        return list(values)
    # Summing each window afresh (not a running sum) keeps values exact where they are equal.
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window)
            for i in range(len(values))]


def build_figure(runs: Sequence[Run], *, smooth_window: int = 1) -> Any:
    """The report figure (a matplotlib Figure on an Agg canvas): the curve panels of `PANELS`
    and the entropy-law panel, in a grid of three columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_panels = len(PANELS) + 1
    cols = 3
    rows = math.ceil(num_panels / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, PANELS):
        _draw_panel(ax, panel, runs, colors, smooth_window)
    _draw_law(axes[len(PANELS)], runs, colors)
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    handles = [legend_line(run.name, color=c) for run, c in zip(runs, colors)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def _draw_panel(ax: Any, panel: Panel, runs: Sequence[Run], colors: Sequence[str],
                window: int) -> None:
    ax.set_title(panel.title, fontsize=10)
    keys = panel.keys(set().union(*(run.keys() for run in runs)) if runs else set())
    drawn = 0
    for run, color in zip(runs, colors):
        for i, key in enumerate(keys):
            steps, values = run.series(key)
            if not steps:
                continue
            ax.plot(steps, smooth(values, window), color=color,
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)], linewidth=1.4,
                    label=f"{run.name}: {key}")
            drawn += 1
    if not drawn:
        _empty(ax, ", ".join(panel.patterns))
        return
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        # Colours name runs in the figure legend; here only the styles need a key.
        styles = [legend_line(key, style=LINE_STYLES[i % len(LINE_STYLES)])
                  for i, key in enumerate(keys)]
        ax.legend(handles=styles, fontsize=7, loc="best")


def legend_line(label: str, *, color: str = "0.35", style: str = "-") -> Any:
    """A legend entry without data (a run's colour, or a metric's line style in grey)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=style, linewidth=1.4, label=label)


def _draw_law(ax: Any, runs: Sequence[Run], colors: Sequence[str]) -> None:
    ax.set_title(LAW_TITLE, fontsize=10)
    fitted = 0
    for run, color in zip(runs, colors):
        law = run.law()
        if law is None:
            continue
        entropies, rewards = run.law_points()
        ax.scatter(entropies, rewards, s=10, color=color, alpha=0.6)
        top = max(entropies)
        grid = [top * i / 100 for i in range(101)]
        ax.plot(grid, [law.predict(h) for h in grid], color=color, linewidth=1.4,
                label=f"{run.name}: a={law.a:.3g} b={law.b:.3g} ceiling={law.ceiling:.3g}")
        ax.plot([0.0], [law.ceiling], marker="*", markersize=10, color=color)
        fitted += 1
    if not fitted:
        _empty(ax, f"{ENTROPY_KEY} and {REWARD_KEY} (3+ steps)")
        return
    ax.set_xlabel("entropy H", fontsize=8)
    ax.set_ylabel("reward R", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{EMPTY_NOTE}\n{what}", ha="center", va="center", fontsize=9,
            color="0.4", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
