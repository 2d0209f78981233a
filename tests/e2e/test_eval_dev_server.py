"""Evaluation end to end against the CPU dev server with a tiny random model.

One dev server serves both paths: `evaluate(client, ...)` with a running rollout client (what
the trainer calls every eval.interval steps) and the `megarl eval` command pointed at it with
--server-url. A random model's answers are mostly garbage, so the checks are on structure and
consistency: every figure must follow from the per-sample verdicts written to samples.jsonl.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.cli import main
from megarl.config import EvalConfig, RolloutConfig
from megarl.eval import evaluate
from megarl.eval.estimators import maj_at_k, pass_at_k
from tests.fixtures.tiny_model import build_tiny_model, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
PROBLEMS = [("What is 2 + 1?", "3"), ("What is 4 + 4?", "8"), ("Name a digit.", "5")]
K = [1, 2, 4]
N = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from megarl.rollout.client import RolloutClient
    from megarl.rollout.servers import RolloutServers

    root = tmp_path_factory.mktemp("eval_e2e")
    model_dir = build_tiny_model(root / "model")
    bench = root / "digits.jsonl"
    bench.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    rollout = RolloutConfig(backend="dev", use_router=False, base_port=0, num_servers=1,
                            health_timeout_s=120, server_args={"num_threads": 1})
    with RolloutServers(rollout, model_path=str(model_dir), log_dir=root / "logs") as servers:
        client = RolloutClient.from_config(rollout, servers.generate_urls)
        try:
            yield {"root": root, "model": model_dir, "bench": bench, "client": client,
                   "url": servers.generate_urls[0]}
        finally:
            client.close()


def check_consistent(result: dict, samples: list[dict]) -> None:
    """Recompute every figure from the recorded verdicts and answer groups."""
    assert len(samples) == len(PROBLEMS)
    for record in samples:
        assert len(record["responses"]) == N and all(isinstance(r, str) for r in record["responses"])
        assert len(record["correct"]) == len(record["clusters"]) == N
    figures = result["benchmarks"]["digits"]
    assert figures["num_problems"] == len(PROBLEMS)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert figures[f"avg@{N}"] == pytest.approx(mean([mean(r["correct"]) for r in samples]))
    for k in K:
        assert figures[f"pass@{k}"] == pytest.approx(
            mean([pass_at_k(N, sum(r["correct"]), k) for r in samples]))
        assert figures[f"maj@{k}"] == pytest.approx(mean([
            maj_at_k(r["clusters"], {c for c, ok in zip(r["clusters"], r["correct"]) if ok}, k)
            for r in samples]))
    assert result["average"][f"avg@{N}"] == figures[f"avg@{N}"]  # one benchmark
    assert figures["response_tokens/mean"] > 0


def test_evaluate_with_the_trainers_running_client(served):
    cfg = EvalConfig(samples_per_problem=N, k=K, max_new_tokens=12, temperature=1.0, top_p=1.0)
    samples: list[dict] = []
    result = evaluate(served["client"], build_tokenizer(), [served["bench"]], cfg,
                      sample_sink=samples.append)
    assert set(result) >= {"n", "k", "sampling", "benchmarks", "average"}
    check_consistent(result, samples)
    # Samples are drawn, not copied: a random model at temperature 1 varies its answers.
    assert len({r for record in samples for r in record["responses"]}) > 1


def test_megarl_eval_against_a_running_server(served, capsys):
    out = served["root"] / "cli_out"
    rc = main(["eval", "--hf-dir", str(served["model"]), "--benchmarks", str(served["bench"]),
               "--server-url", served["url"], "--output-dir", str(out),
               f"eval.samples_per_problem={N}", f"eval.k=[{','.join(map(str, K))}]",
               "eval.max_new_tokens=12", "logging.progress=off"])
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["benchmark", "problems", f"avg@{N}", "pass@1", "pass@2",
                                "pass@4", "maj@1", "maj@2", "maj@4", "tokens"]
    assert [line.split()[0] for line in table[2:4]] == ["digits", "average"]
    result = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    check_consistent(result, samples)
    assert result["model"]["server_urls"] == [served["url"]]
    # The table shows the JSON's figures, in percent.
    row = table[2].split()
    assert row[2] == f"{100 * result['benchmarks']['digits'][f'avg@{N}']:.1f}"


def test_megarl_eval_of_a_megatron_checkpoint_starts_and_stops_its_server(served):
    """The standalone path: convert Megatron -> HF with the tool, start a dev server for the
    converted weights, evaluate, stop the server."""
    root = served["root"]
    megatron_dir = root / "megatron"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"),
                           "--hf-dir", str(served["model"]), "--output-dir", str(megatron_dir),
                           "--progress", "off"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "standalone"
    rc = main(["eval", "--megatron-dir", str(megatron_dir), "--hf-config-dir", str(served["model"]),
               "--benchmarks", str(served["bench"]), "--output-dir", str(out),
               "rollout.backend=dev", "rollout.use_router=false", "rollout.base_port=0",
               "rollout.server_args={num_threads: 1}", "eval.samples_per_problem=2",
               "eval.k=[1,2]", "eval.max_new_tokens=8", "logging.progress=off"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["n"] == 2 and result["benchmarks"]["digits"]["num_problems"] == len(PROBLEMS)
    assert result["model"]["megatron_dir"] == str(megatron_dir)
    # The server served the converted weights, and is gone.
    log = (out / "server_logs" / "server_0.log").read_text()
    served_path, port = re.search(r"serving (\S+) on http://[^:]+:(\d+)", log).groups()
    assert served_path == str(out / "hf") and (out / "hf" / "model.safetensors").is_file()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
