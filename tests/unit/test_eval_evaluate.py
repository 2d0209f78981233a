"""`evaluate` and `megarl eval` on a tiny benchmark with deterministic responses.

The responses (tests/fixtures/eval/tiny_responses.jsonl) are chosen so that each figure tests
something: `2.0` must verify as 2, `0.5`, `\\frac{1}{2}` and `1/2` must be one answer for the
vote (else the wrong `7`, first in order, wins), a response without a boxed answer must not vote.
Expected figures, n = 4, k = 1, 2, 4 (worked by hand from the subsets):
  1+1:  correct T F T -   avg .5   pass@2 5/6  maj@2 4/6  maj@4 1
  half: correct F T T T   avg .75  pass@2 1    maj@2 3/6  maj@4 1
  3*4:  all wrong          0 everywhere
  2+2:  all correct        1 everywhere
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from megarl.cli import main
from megarl.config import EvalConfig
from megarl.eval import evaluate, flat_metrics, format_table, load_benchmark
from megarl.eval.generation import RecordedGenerator, SamplingParams, render_prompt

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
TINY = FIXTURES / "tiny_math.jsonl"
EASY = FIXTURES / "tiny_easy.jsonl"
RESPONSES = FIXTURES / "tiny_responses.jsonl"

EXPECTED_TINY = {
    "avg@4": (0.5 + 0.75 + 0) / 3,
    "pass@1": (0.5 + 0.75 + 0) / 3,
    "pass@2": (5 / 6 + 1 + 0) / 3,
    "pass@4": (1 + 1 + 0) / 3,
    "maj@1": (0.5 + 0.75 + 0) / 3,
    "maj@2": (4 / 6 + 3 / 6 + 0) / 3,
    "maj@4": (1 + 1 + 0) / 3,
}


def config(**overrides) -> EvalConfig:
    fields = dict(samples_per_problem=4, k=[1, 2, 4], apply_chat_template=False,
                  problems_per_request_batch=2) | overrides
    cfg = EvalConfig(**fields)
    cfg.validate()
    return cfg


class CountingGenerator(RecordedGenerator):
    """The recorded responses, remembering what was asked."""

    def __init__(self, cfg: EvalConfig) -> None:
        super().__init__(str(RESPONSES), None, cfg)
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def sample(self, prompts, params):
        self.calls.append((list(prompts), params))
        return super().sample(prompts, params)


class WordTokenizer:
    """Counts whitespace-separated words as tokens; no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_figures_match_the_worked_example():
    cfg = config()
    generator = CountingGenerator(cfg)
    records = []
    result = evaluate(generator, WordTokenizer(), [TINY, EASY], cfg, sample_sink=records.append)
    tiny = result["benchmarks"]["tiny_math"]
    for key, value in EXPECTED_TINY.items():
        assert tiny[key] == pytest.approx(value), key
    assert tiny["num_problems"] == 3
    easy = result["benchmarks"]["tiny_easy"]
    assert all(easy[key] == 1.0 for key in EXPECTED_TINY)
    for key, value in EXPECTED_TINY.items():
        assert result["average"][key] == pytest.approx((value + 1.0) / 2), key
    assert result["average"]["num_problems"] == 4
    # Token counts: words of the responses, e.g. "So it is \boxed{2.0}" has 4.
    assert tiny["response_tokens/mean"] == pytest.approx((1 + 1 + 4 + 4 + 4 + 3) / 12)
    # Batches of 2 problems; prompts rendered with the template; sampling from the config.
    assert [len(prompts) for prompts, _ in generator.calls] == [2, 1, 1]
    first_prompt = generator.calls[0][0][0]
    assert first_prompt.startswith("What is 1 + 1?\n") and "\\boxed{}" in first_prompt
    assert generator.calls[0][1] == SamplingParams(num_samples=4, temperature=0.6, top_p=0.95,
                                                   max_new_tokens=3072)
    half = next(r for r in records if r["problem"] == "What is half of one?")
    assert half["correct"] == [False, True, True, True]
    assert half["clusters"][1:] == [0, 0, 0] and half["majority_answer"] is not None


def test_figures_agree_with_the_recorded_verdicts():
    cfg = config()
    records = []
    result = evaluate(RecordedGenerator(str(RESPONSES), None, cfg), None, [TINY], cfg,
                      sample_sink=records.append)
    avg = sum(sum(r["correct"]) / len(r["correct"]) for r in records) / len(records)
    assert result["benchmarks"]["tiny_math"]["avg@4"] == pytest.approx(avg)
    assert "response_tokens/mean" not in result["average"]  # no tokenizer, no counts


def test_table_and_flat_metrics():
    cfg = config()
    result = evaluate(RecordedGenerator(str(RESPONSES), None, cfg), None, [TINY, EASY], cfg)
    table = format_table(result).splitlines()
    assert table[0].split() == ["benchmark", "problems", "avg@4", "pass@1", "pass@2", "pass@4",
                                "maj@1", "maj@2", "maj@4"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert list(rows) == ["tiny_math", "tiny_easy", "average"]
    assert rows["tiny_math"][0] == "3"
    assert rows["tiny_math"][1:] == [f"{100 * EXPECTED_TINY[k]:.1f}" for k in EXPECTED_TINY]
    assert rows["tiny_easy"][1:] == ["100.0"] * 7
    flat = flat_metrics(result)
    assert flat["eval/tiny_math/maj@2"] == pytest.approx(EXPECTED_TINY["maj@2"])
    assert flat["eval/average/pass@4"] == pytest.approx((EXPECTED_TINY["pass@4"] + 1) / 2)
    assert not any(key.endswith("num_problems") for key in flat)


def test_benchmark_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{"question": "y", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'problem' field \(it has: answer, "
                                         r"question\)"):
        load_benchmark(bad)
    bad.write_text('{"problem": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_benchmark(bad)
    named = load_benchmark(f"mine={TINY}", max_problems=2)
    assert named.name == "mine" and len(named.problems) == 2 and named.problems[1].line == 2
    assert load_benchmark(TINY).problems[2].answer == "12"  # numbers become text


def test_chat_template_and_system_prompt():
    class ChatTokenizer:
        chat_template = "yes"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    cfg = EvalConfig(system_prompt="Be brief.", prompt_template="Q: {prompt}")
    assert render_prompt("1+1?", ChatTokenizer(), cfg) == "system:Be brief.|user:Q: 1+1?"
    plain = EvalConfig(apply_chat_template=False, prompt_template="Q: {prompt}")
    assert render_prompt("1+{x}?", ChatTokenizer(), plain) == "Q: 1+{x}?"


def test_generator_answer_is_checked():
    class Short:
        def sample(self, prompts, params):
            return [["\\boxed{1}"] * (params.num_samples - 1) for _ in prompts]

    with pytest.raises(RuntimeError, match="3 responses .* expected 4"):
        evaluate(Short(), None, [TINY], config())


def test_megarl_eval_replays_recorded_samples(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--benchmarks", str(TINY), str(EASY), "--replay", str(RESPONSES),
               "--output-dir", str(out), "eval.samples_per_problem=4", "eval.k=[1,2,4]",
               "eval.apply_chat_template=false", "logging.progress=off"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "tiny_math" in printed.out and "average" in printed.out
    assert "eval: problem 4/4 (100%)" in printed.err  # plain progress lines, not a bar
    result = json.loads((out / "results.json").read_text())
    for key, value in EXPECTED_TINY.items():
        assert result["benchmarks"]["tiny_math"][key] == pytest.approx(value)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["benchmark"] == "tiny_math"
    # The samples file is itself a replay source: re-scoring it gives the same figures.
    rc = main(["eval", "--benchmarks", str(TINY), "--replay", str(out / "samples.jsonl"),
               "--output-dir", str(tmp_path / "again"), "eval.samples_per_problem=4",
               "eval.k=[1,2,4]", "eval.apply_chat_template=false", "logging.progress=off"])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["benchmarks"]["tiny_math"] == result["benchmarks"]["tiny_math"]


def test_a_rollout_client_is_wrapped_and_asked_once_per_batch():
    from megarl.eval.generation import as_generator

    class CharTokenizer:
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + [ord(c) for c in text]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids if i or not skip_special_tokens)

    class FakeClient:
        """Answers each request with the problem's reference (read off the prompt) boxed."""

        def __init__(self):
            self.batches = []

        def generate_batch(self, prompts_token_ids, sampling):
            self.batches.append((prompts_token_ids, sampling))
            answers = {"What is 1 + 1?": "2", "What is half of one?": "1/2",
                       "What is 3 * 4?": "12"}
            out = []
            for ids in prompts_token_ids:
                assert ids[0] == 0  # plain prompt: the tokenizer's special tokens are added
                text = "".join(chr(i) for i in ids[1:])
                answer = next(a for q, a in answers.items() if text.startswith(q))
                out.append(types.SimpleNamespace(token_ids=[ord(c) for c in f"\\boxed{{{answer}}}"]))
            return out

    cfg = config(problems_per_request_batch=8)
    client = FakeClient()
    result = evaluate(client, CharTokenizer(), [TINY], cfg)
    assert result["benchmarks"]["tiny_math"]["avg@4"] == 1.0
    (ids, sampling), = client.batches  # one batch: 3 problems x 4 samples
    assert len(ids) == 12 and ids[0] == ids[3] != ids[4]
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (0.6, 0.95, 3072)
    with pytest.raises(TypeError, match="neither an eval Generator"):
        as_generator(object(), None, cfg)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        as_generator(client, None, cfg)


def test_verdicts_from_a_reward_pool_off_the_main_thread():
    """The trainer may evaluate in a thread: with its reward worker pool the verdicts come from
    worker processes (math-verify's SIGALRM limits cannot run in a thread) and agree."""
    import threading

    from megarl.rollout.reward import RewardComputer

    cfg = config()
    expected = evaluate(RecordedGenerator(str(RESPONSES), None, cfg), None, [TINY], cfg)
    out = {}

    def run(pool):
        out["result"] = evaluate(RecordedGenerator(str(RESPONSES), None, cfg), None, [TINY],
                                 cfg, reward=pool)

    with RewardComputer("math", num_workers=1, timeout_s=30) as pool:
        thread = threading.Thread(target=run, args=(pool,))
        thread.start()
        thread.join(60)
    assert out["result"] == expected


def test_a_user_reward_function_is_not_taken_as_the_verdict():
    class GradedScorer:
        spec = "my_rewards:graded"

        def score(self, responses, answers):
            raise AssertionError("a non-math scorer must not be asked for verdicts")

    cfg = config()
    result = evaluate(RecordedGenerator(str(RESPONSES), None, cfg), None, [TINY], cfg,
                      reward=GradedScorer())
    assert result["benchmarks"]["tiny_math"]["avg@4"] == pytest.approx(EXPECTED_TINY["avg@4"])
