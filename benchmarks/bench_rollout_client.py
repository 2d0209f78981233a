"""Overhead of the rollout client against a server that answers instantly.

A separate process serves /generate with a fixed, valid reply (OUTPUT_TOKENS tokens with
log-probs) without looking at the request. The benchmark sends the same requests with
`RolloutClient.generate_batch` (payload building, concurrency limit, retry bookkeeping, reply
validation) and, as the baseline in the same run, with a bare aiohttp loop at the same
concurrency that only posts and decodes the JSON. Rounds alternate; the table reports the
median requests per second and the client's share of the bare loop's rate.

    python benchmarks/bench_rollout_client.py [--json PATH] [--requests 4000] [--concurrency 256]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

OUTPUT_TOKENS = 64
PROMPT = list(range(1, 257))


def serve(port: int) -> None:
    """The instant-reply server (run in its own process)."""
    from aiohttp import web

    reply = json.dumps({"text": "", "output_ids": list(range(OUTPUT_TOKENS)), "meta_info": {
        "id": "x", "finish_reason": {"type": "length", "length": OUTPUT_TOKENS},
        "prompt_tokens": len(PROMPT), "completion_tokens": OUTPUT_TOKENS,
        "weight_version": "0",
        "output_token_logprobs": [[-0.25, t, None] for t in range(OUTPUT_TOKENS)]}}).encode()

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def bare_loop(url: str, num_requests: int, concurrency: int) -> float:
    """Seconds for the baseline: post and decode, nothing else."""
    import aiohttp

    payload = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": OUTPUT_TOKENS},
               "return_logprob": True}

    async def main() -> None:
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one() -> None:
                async with limit:
                    async with session.post(url + "/generate", json=payload) as resp:
                        json.loads(await resp.text())
            await asyncio.gather(*(one() for _ in range(num_requests)))

    start = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - start


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve", type=int, default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    from megarl.rollout.client import RolloutClient
    from megarl.rollout.protocol import SamplingParams
    from megarl.rollout.servers import free_port, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        wait_healthy(url, deadline=time.monotonic() + 60)
        client = RolloutClient([url], max_concurrency=args.concurrency)
        sampling = SamplingParams(max_new_tokens=OUTPUT_TOKENS)
        prompts = [PROMPT] * args.requests
        client.generate_batch(prompts[:200], sampling)  # warm up both paths
        bare_loop(url, 200, args.concurrency)
        bare_s, client_s = [], []
        for _ in range(args.rounds):
            bare_s.append(bare_loop(url, args.requests, args.concurrency))
            start = time.perf_counter()
            responses = client.generate_batch(prompts, sampling)
            client_s.append(time.perf_counter() - start)
            assert len(responses) == args.requests and len(responses[-1].logprobs) == OUTPUT_TOKENS
        client.close()
    finally:
        server.terminate()
        server.wait(10)

    bare, ours = statistics.median(bare_s), statistics.median(client_s)
    rows = [
        {"client": "bare aiohttp loop", "requests_per_s": args.requests / bare, "ratio": 1.0,
         "us_per_request": 1e6 * bare / args.requests},
        {"client": "RolloutClient.generate_batch", "requests_per_s": args.requests / ours,
         "ratio": bare / ours, "us_per_request": 1e6 * ours / args.requests},
    ]
    common.print_table(rows, f"{args.requests} requests, concurrency {args.concurrency}, "
                             f"{OUTPUT_TOKENS} output tokens per reply, median of {args.rounds}")
    common.write_json(args.json, "rollout_client", {
        "requests": args.requests, "concurrency": args.concurrency,
        "output_tokens": OUTPUT_TOKENS, "bare_seconds": bare_s, "client_seconds": client_s,
        "rows": rows})


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
