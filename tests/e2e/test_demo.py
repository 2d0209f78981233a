"""`megarl demo --quick`: the README's main job, shortened, runs end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

from megarl.metrics import read_metrics


def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "megarl.cli", "demo", "--quick", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for step in range(1, 6):
        assert f"[demo {step}/5]" in proc.stdout
    assert (out / "megatron" / "megarl_checkpoint.json").is_file()   # converted by the tool
    run = out / "run"
    records = [r for r in read_metrics(run) if "reward/mean" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("siren/anchor" in r and "entropy/nucleus_mean" in r for r in records)
    summary = json.loads((run / "demo_summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= summary["reward_last"] <= 1.0
    assert (run / "report.png").stat().st_size > 20_000
    assert "reward/mean" in proc.stdout   # the summary table
    assert (run / "checkpoints" / "latest").is_file()
