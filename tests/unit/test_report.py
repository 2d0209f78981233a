"""`megarl report` on two recorded runs: every panel is there, holds the runs' data (checked on
the figure's line data and on the pixels of each panel in the PNG), and the HTML page embeds
the same image with a summary table."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest

from megarl.cli import main
from megarl.eval.figures import EMPTY_NOTE, LAW_TITLE, PANELS, build_figure, load_runs, smooth

RUNS = Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "runs"
RUN_DIRS = [RUNS / "grpo", RUNS / "siren"]
RUN_COLORS = {"grpo": (0x1F, 0x77, 0xB4), "siren": (0xFF, 0x7F, 0x0E)}  # matplotlib C0, C1
# Which runs logged something for each panel (the fixtures' contents).
EXPECTED_RUNS = {
    "Reward": {"grpo", "siren"}, "Entropy": {"grpo", "siren"},
    "Nucleus entropy": {"grpo", "siren"},
    "Covariance of log-prob and advantage": {"grpo"},
    "Clip fractions": {"grpo", "siren"}, "AER coefficient alpha": set(),
    "SIREN anchor": {"siren"}, "Response length": {"grpo", "siren"},
    LAW_TITLE: {"grpo", "siren"},
}


@pytest.fixture(scope="module")
def figure():
    runs = load_runs(RUN_DIRS)
    return runs, build_figure(runs)


def panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}


def test_every_panel_is_present_and_empty_ones_say_so(figure):
    _, fig = figure
    axes = panels(fig)
    assert list(axes) == [p.title for p in PANELS] + [LAW_TITLE]
    for title, ax in axes.items():
        notes = [t.get_text() for t in ax.texts]
        if EXPECTED_RUNS[title]:
            assert not notes, title
        else:
            assert len(notes) == 1 and notes[0].startswith(EMPTY_NOTE) and "aer/alpha" in notes[0]
            assert not ax.lines
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["grpo", "siren"]


def test_lines_carry_the_runs_data(figure):
    runs, fig = figure
    axes = panels(fig)
    for title, ax in axes.items():
        if title == LAW_TITLE:
            continue
        drawn = {line.get_label().split(":")[0] for line in ax.lines}
        assert drawn == EXPECTED_RUNS[title], title
    by_name = {run.name: run for run in runs}
    for line in axes["Clip fractions"].lines:
        name, key = line.get_label().split(": ")
        steps, values = by_name[name].series(key)
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == values
    labels = sorted(line.get_label() for line in axes["Clip fractions"].lines)
    assert labels == ["grpo: ppo/clip_frac_high", "grpo: ppo/clip_frac_low",
                      "siren: clip_cov/frac_clipped", "siren: ppo/clip_frac_high"]
    # Several metrics in one panel: styles tell them apart, colours tell runs apart.
    styles = {line.get_label(): line.get_linestyle() for line in axes["Clip fractions"].lines}
    assert styles["grpo: ppo/clip_frac_high"] != styles["grpo: ppo/clip_frac_low"]


def test_law_panel_draws_the_fit(figure):
    runs, fig = figure
    law_ax = panels(fig)[LAW_TITLE]
    grpo_fit = runs[0].law()
    # The grpo fixture was generated from R = -0.3 exp(H) + 0.95 plus small noise.
    assert grpo_fit.a == pytest.approx(0.3, abs=0.02) and grpo_fit.b == pytest.approx(0.95, abs=0.03)
    curve = next(line for line in law_ax.lines if line.get_label().startswith("grpo: a="))
    h, r = curve.get_xdata(), curve.get_ydata()
    assert h[0] == 0.0 and r[0] == pytest.approx(grpo_fit.ceiling)
    assert np.allclose(r, [grpo_fit.predict(x) for x in h])
    assert f"ceiling={grpo_fit.ceiling:.3g}" in curve.get_label()
    assert len(law_ax.collections) == 2  # one scatter of (H, R) points per run


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    target = np.array(rgb) / 255.0
    return int((np.abs(image[..., :3] - target).max(axis=-1) < 0.08).sum())


def test_report_command_writes_png_and_html_with_content(tmp_path, capsys, figure):
    import matplotlib.image

    out = tmp_path / "report"
    assert main(["report", *map(str, RUN_DIRS), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "grpo" in printed and "law ceiling" in printed
    image = matplotlib.image.imread(out / "report.png")
    _, fig = figure
    assert image.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    height = image.shape[0]
    for title, ax in panels(fig).items():
        box = ax.get_window_extent()
        region = image[int(height - box.y1):int(height - box.y0), int(box.x0):int(box.x1)]
        for name, rgb in RUN_COLORS.items():
            count = colour_pixels(region, rgb)
            if name in EXPECTED_RUNS[title]:
                assert count > 40, f"{title}: too few pixels of {name}'s colour ({count})"
            else:
                assert count == 0, f"{title}: {name} drawn where it logged nothing"
        # Empty panels are not blank: their note is drawn in grey.
        dark = (region[..., :3].max(axis=-1) < 0.7).sum()
        assert dark > 50, title

    html = (out / "report.html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(embedded) == (out / "report.png").read_bytes()
    assert html.count("<tr>") == 3  # header + one row per run
    assert "<td>grpo</td>" in html and "<td>siren</td>" in html
    assert "average/maj@4" in html  # the last evaluation average is in the summary


def test_missing_run_and_smoothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        load_runs([tmp_path])
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    runs = load_runs(RUN_DIRS, names=["a", "b"])
    assert [r.name for r in runs] == ["a", "b"]
    # Saving to a PNG buffer works without a display (Agg canvas, no pyplot).
    buffer = io.BytesIO()
    build_figure(runs, smooth_window=3).savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
