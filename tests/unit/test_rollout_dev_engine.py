"""The dev server's generation engine: batching does not change results, SGLang's sampling and
log-prob conventions, stop conditions, pause modes and exclusive weight access."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from megarl.rollout.dev_engine import (DevEngine, EngineRequest, RequestError, Sampling,
                                       parse_sampling, sample_token)
from tests.fixtures.tiny_model import build_model

EOS = 2


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    engine = DevEngine(build_model(0), eos_token_ids=(EOS,), max_batch_size=8, seed=0)
    yield engine
    engine.stop()


def run(engine: DevEngine, prompts: list[list[int]], sampling: Sampling,
        during=None) -> list[dict]:
    """Submit all prompts at once (one batch) and return the replies."""
    async def main():
        loop = asyncio.get_running_loop()
        reqs = [EngineRequest(rid=str(i), input_ids=p, sampling=sampling, return_logprob=True,
                              future=loop.create_future(), loop=loop) for i, p in enumerate(prompts)]
        for req in reqs:
            engine.submit(req)
        if during is not None:
            await during(reqs)
        return await asyncio.gather(*(r.future for r in reqs))
    return asyncio.run(main())


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding without cache or batching: the full sequence re-run each step."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def test_batched_greedy_equals_unbatched_reference(engine):
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50], [1, 60, 61, 62]]
    greedy = Sampling(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    together = run(engine, prompts, greedy)
    for prompt, reply in zip(prompts, together):
        tokens, logprobs = reference_greedy(engine.model, prompt, 6)
        assert reply["output_ids"] == tokens
        got = [lp for lp, _, _ in reply["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-5)
        assert reply["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
        assert reply["meta_info"]["prompt_tokens"] == len(prompt)


def test_seeded_sampling_is_reproducible_and_logprobs_use_the_temperature(engine):
    sampling = Sampling(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, seed=11,
                        ignore_eos=True)
    first = run(engine, [[1, 30, 31]], sampling)[0]
    second = run(engine, [[1, 30, 31], [1, 70]], sampling)[0]
    assert first["output_ids"] == second["output_ids"]
    with torch.no_grad():
        logits = engine.model(torch.tensor([[1, 30, 31]])).logits[0, -1].float()
    token = first["output_ids"][0]
    expected = float(torch.log_softmax(logits / 0.7, -1)[token])
    assert first["meta_info"]["output_token_logprobs"][0][0] == pytest.approx(expected, abs=1e-5)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    top2 = {sample_token(logits, Sampling(top_k=2), gen)[0] for _ in range(200)}
    assert top2 == {0, 1}
    # p = softmax: [.64, .24, .09, .03, .01]; top_p .7 keeps the first two
    nucleus = {sample_token(logits, Sampling(top_p=0.7), gen)[0] for _ in range(200)}
    assert nucleus == {0, 1}
    assert sample_token(logits, Sampling(temperature=0.0), gen)[0] == 0


def test_stop_conditions(engine):
    greedy = Sampling(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    first = run(engine, [[1, 50]], greedy)[0]["output_ids"]
    stop_at = first[2]
    stopped = run(engine, [[1, 50]], Sampling(temperature=0.0, max_new_tokens=6,
                                              stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert stopped["output_ids"] == first[:first.index(stop_at) + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    empty = run(engine, [[1, 50]], Sampling(max_new_tokens=0))[0]
    assert empty["output_ids"] == [] and empty["meta_info"]["finish_reason"]["type"] == "length"


def test_requests_are_checked(engine):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.check([1, 999], Sampling())
    with pytest.raises(RequestError, match="context length"):
        engine.check([1] * 10, Sampling(max_new_tokens=600))
    with pytest.raises(RequestError, match="frequency_penalty not supported"):
        parse_sampling({"frequency_penalty": 0.5})
    with pytest.raises(RequestError, match="top_k"):
        parse_sampling({"top_k": 0})


def test_pause_abort_ends_running_requests(engine):
    async def pause_soon(reqs):
        while not reqs[0].output_ids:
            await asyncio.sleep(0.001)
        engine.pause("abort")

    long = Sampling(temperature=0.0, max_new_tokens=400, ignore_eos=True)
    try:
        reply = run(engine, [[1, 50]], long, during=pause_soon)[0]
    finally:
        engine.resume()
    assert reply["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(reply["output_ids"]) < 400


def test_pause_in_place_parks_requests_and_lets_an_update_through(engine):
    events = []

    async def pause_then_update(reqs):
        while not reqs[0].output_ids:
            await asyncio.sleep(0.001)
        engine.pause("in_place")
        await asyncio.sleep(0.05)
        parked_at = len(reqs[0].output_ids)
        with engine.exclusive():  # a weight update while the request is parked
            events.append(("update", parked_at))
            await asyncio.sleep(0.05)
            assert len(reqs[0].output_ids) == parked_at
        engine.resume()

    reply = run(engine, [[1, 50]], Sampling(temperature=0.0, max_new_tokens=200, ignore_eos=True),
                during=pause_then_update)[0]
    assert reply["meta_info"]["finish_reason"]["type"] == "length"
    assert len(reply["output_ids"]) == 200 and events


def test_exclusive_waits_for_a_running_batch_when_not_paused(engine):
    order = []

    async def update_midway(reqs):
        while not reqs[0].output_ids:
            await asyncio.sleep(0.001)

        def update():
            with engine.exclusive():
                order.append(("update", reqs[0].finish is not None))
        thread = threading.Thread(target=update)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.005)

    run(engine, [[1, 50]], Sampling(temperature=0.0, max_new_tokens=150, ignore_eos=True),
        during=update_midway)
    assert order == [("update", True)]  # the update ran only after the request finished


def test_engine_keeps_serving_after_a_model_failure(engine, monkeypatch):
    original = engine.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine.model, "forward", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(engine, [[1, 50]], Sampling(max_new_tokens=3))
    monkeypatch.setattr(engine.model, "forward", original)
    time.sleep(0.01)
    assert len(run(engine, [[1, 50]], Sampling(max_new_tokens=3, ignore_eos=True))[0]["output_ids"]) == 3
