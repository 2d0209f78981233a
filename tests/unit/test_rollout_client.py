"""The rollout client against in-process fake servers: concurrency, retries, failover, errors,
time-outs and abort at shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from megarl.rollout.client import AsyncRolloutClient, GenerationError, RolloutClient
from megarl.rollout.http import ServerRejected
from megarl.rollout.protocol import SamplingParams, ServerReplyError
from megarl.rollout.servers import free_port
from tests.fixtures.fake_server import FakeServer, generate_reply

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=4)
FAST = dict(retry_backoff_s=0.01, request_timeout_s=5.0)


def echo(delay: float = 0.0, state: dict | None = None):
    """Reply with the prompt reversed, after `delay`; track the most requests in flight."""
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if state is not None:
            state["now"] = state.get("now", 0) + 1
            state["max"] = max(state.get("max", 0), state["now"])
        try:
            await asyncio.sleep(delay)
        finally:
            if state is not None:
                state["now"] -= 1
        return web.json_response(generate_reply(body["input_ids"][::-1]))
    return handler


async def status(code: int, request: web.Request) -> web.Response:
    return web.Response(status=code, text="nope")


def test_batch_in_order_within_the_concurrency_limit():
    state: dict = {}
    with FakeServer({"/generate": echo(0.02, state)}) as server:
        with RolloutClient([server.url], max_concurrency=3, **FAST) as client:
            prompts = [[i, i + 1] for i in range(12)]
            responses = client.generate_batch(prompts, SAMPLING)
    assert [r.token_ids for r in responses] == [p[::-1] for p in prompts]
    assert all(r.logprobs == [-0.5, -0.5] and r.finish_reason == "length" for r in responses)
    assert state["max"] == 3
    sent = server.calls[0][1]
    assert sent["return_logprob"] is True and sent["sampling_params"]["max_new_tokens"] == 4


def test_failing_and_unreachable_servers_are_retried_on_the_others():
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeServer({"/generate": lambda r: status(503, r)}) as bad, \
            FakeServer({"/generate": echo()}) as good:
        with RolloutClient([dead, bad.url, good.url], max_retries=3, **FAST) as client:
            responses = client.generate_batch([[1, 2]] * 10, SAMPLING)
            stats = client.stats
    assert all(r.token_ids == [2, 1] for r in responses)
    assert stats.num_retries >= 1 and stats.num_failed == 0
    assert set(stats.failures_by_server) <= {dead, bad.url}
    # a failing server is avoided for a while: most requests never see it
    assert len(bad.calls) < 10


def test_abort_replies_are_retried():
    seen = []

    async def abort_once(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["rid"])
        if len(seen) == 1:
            return web.json_response(generate_reply([], {"type": "abort", "message": "paused"}))
        return web.json_response(generate_reply([7]))

    with FakeServer({"/generate": abort_once}) as server:
        with RolloutClient([server.url], **FAST) as client:
            response = client.generate([1], SAMPLING)
    assert response.token_ids == [7] and response.num_attempts == 2
    assert seen[0] == seen[1]  # the same request id on the retry


def test_retries_run_out():
    with FakeServer({"/generate": lambda r: status(500, r)}) as server:
        with RolloutClient([server.url], max_retries=2, **FAST) as client:
            with pytest.raises(GenerationError, match="failed 3 times.*HTTP 500"):
                client.generate([1], SAMPLING)
            assert client.stats.num_failed == 1
    assert len(server.calls) == 3


def test_bad_requests_and_malformed_replies_are_not_retried():
    async def malformed(request: web.Request) -> web.Response:
        reply = generate_reply([3, 4])
        del reply["meta_info"]["output_token_logprobs"]
        return web.json_response(reply)

    with FakeServer({"/generate": lambda r: status(400, r)}) as rejecting, \
            FakeServer({"/generate": malformed}) as broken:
        with RolloutClient([rejecting.url], **FAST) as client:
            with pytest.raises(ServerRejected, match="HTTP 400"):
                client.generate([1], SAMPLING)
        with RolloutClient([broken.url], **FAST) as client:
            with pytest.raises(ServerReplyError, match="output_token_logprobs"):
                client.generate([1], SAMPLING)
    assert len(rejecting.calls) == 1 and len(broken.calls) == 1


def test_a_request_past_its_timeout_moves_to_another_server():
    with FakeServer({"/generate": echo(delay=30)}) as slow, FakeServer({"/generate": echo()}) as fast:
        with RolloutClient([slow.url, fast.url], request_timeout_s=0.3, retry_backoff_s=0.01,
                           max_concurrency=4) as client:
            start = time.monotonic()
            responses = client.generate_batch([[5, 6]] * 4, SAMPLING)
    assert all(r.token_ids == [6, 5] for r in responses)
    assert time.monotonic() - start < 20   # the slow server holds requests for 30 s


def test_close_aborts_requests_in_flight():
    cancelled = []

    async def forever(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(request.path)
            raise
        return web.json_response(generate_reply([1]))

    async def scenario(url: str) -> None:
        client = AsyncRolloutClient([url], **FAST)
        task = asyncio.ensure_future(client.generate_many([[1]] * 3, SAMPLING))
        while len(server.calls) < 3:
            await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(asyncio.CancelledError):
            await task

    with FakeServer({"/generate": forever}) as server:
        asyncio.run(scenario(server.url))
        deadline = time.monotonic() + 5
        while len(cancelled) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(cancelled) == 3  # the servers saw the clients go: SGLang aborts such requests
