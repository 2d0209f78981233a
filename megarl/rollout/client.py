"""The generation client: many /generate requests in flight, retried on failing servers.

`AsyncRolloutClient` sends one request per (prompt, sample) to the router or, without a router,
to the least-busy server. It limits the requests in flight (`max_concurrency`), bounds each by
`request_timeout_s`, and retries a request that hit a connection error, a time-out, an HTTP
5xx/429 or an abort (a paused or dying server) with exponential back-off, up to `max_retries`
times, preferring another server; a server that fails is avoided for a cool-down period. A
reply that breaks the protocol or an HTTP 4xx is not retried: it raises at once with the field
or the server's message. `close()` cancels what is still in flight, which closes the
connections, and SGLang aborts requests whose client disconnected.

`RolloutClient` is the synchronous facade that trainer rank 0 calls:
`generate_batch(prompts_token_ids, sampling) -> list[Response]`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import aiohttp

from .http import EventLoopThread, ServerRejected, ServerUnavailable, new_session, request_json
from .protocol import (Response, SamplingParams, ServerReplyError, generate_payload,
                       parse_generate_reply)

logger = logging.getLogger(__name__)

_COOLDOWN_S = 5.0


class GenerationError(RuntimeError):
    """A request failed for good (retries exhausted, or an error retrying cannot fix)."""


@dataclass
class ClientStats:
    """Counts since the client was created (or since `reset`)."""

    num_requests: int = 0
    num_retries: int = 0
    num_failed: int = 0
    failures_by_server: Counter = field(default_factory=Counter)
    """Retryable failures per server URL: the servers that dropped, timed out or aborted."""

    def as_dict(self) -> dict[str, Any]:
        return {"num_requests": self.num_requests, "num_retries": self.num_retries,
                "num_failed": self.num_failed, "failures_by_server": dict(self.failures_by_server)}


class _Aborted(Exception):
    """The server ended the request with finish_reason abort (paused or shutting down)."""


class AsyncRolloutClient:
    """Asynchronous /generate client over a router URL or a list of server URLs."""

    def __init__(self, urls: Sequence[str], *, max_concurrency: int = 256,
                 request_timeout_s: float = 1800.0, max_retries: int = 3,
                 retry_backoff_s: float = 1.0) -> None:
        if not urls:
            raise ValueError("AsyncRolloutClient needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.stats = ClientStats()
        self._session: Optional[aiohttp.ClientSession] = None
        self._semaphore: Optional[asyncio.Semaphore] = None
        self._in_flight = Counter()
        self._avoid_until: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._prefix = f"megarl-{uuid.uuid4().hex[:8]}"

    def set_urls(self, urls: Sequence[str]) -> None:
        """Send new requests to these URLs from now on (servers taken out of or put back into
        rotation when there is no router); requests in flight finish where they are."""
        if not urls:
            raise ValueError("AsyncRolloutClient needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]

    def _ensure_open(self) -> None:
        if self._session is None:
            self._session = new_session()
            self._semaphore = asyncio.Semaphore(self.max_concurrency)

    def _pick_url(self, exclude: Optional[str]) -> str:
        now = time.monotonic()
        usable = [u for u in self.urls if self._avoid_until.get(u, 0.0) <= now] or self.urls
        if exclude is not None and len(usable) > 1:
            usable = [u for u in usable if u != exclude] or usable
        return min(usable, key=lambda u: self._in_flight[u])

    async def generate(self, input_ids: Sequence[int], sampling: SamplingParams) -> Response:
        """One response, retried on another server when one fails."""
        self._ensure_open()
        request_id = f"{self._prefix}-{next(self._ids)}"
        payload = generate_payload(input_ids, sampling, request_id=request_id)
        self.stats.num_requests += 1
        last_url: Optional[str] = None
        for attempt in range(self.max_retries + 1):
            url = self._pick_url(exclude=last_url)
            try:
                response = await self._attempt(url, payload)
                response.num_attempts = attempt + 1
                return response
            except (ServerUnavailable, _Aborted) as exc:
                self.stats.failures_by_server[url] += 1
                self._avoid_until[url] = time.monotonic() + _COOLDOWN_S
                last_url, last_error = url, exc
                if attempt == self.max_retries:
                    break
                self.stats.num_retries += 1
                delay = self.retry_backoff_s * (2 ** attempt)
                logger.warning("request %s failed on %s (%s); retry %d/%d in %.1f s",
                               request_id, url, exc, attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
            except (ServerRejected, ServerReplyError):
                self.stats.num_failed += 1
                raise
        self.stats.num_failed += 1
        raise GenerationError(f"request {request_id} failed {self.max_retries + 1} times; "
                              f"last error: {last_error}")

    async def _attempt(self, url: str, payload: dict) -> Response:
        async with self._semaphore:
            self._in_flight[url] += 1
            try:
                body = await request_json(self._session, "POST", url + "/generate", payload,
                                          timeout_s=self.request_timeout_s)
            finally:
                self._in_flight[url] -= 1
        response = parse_generate_reply(body, endpoint=f"{url}/generate")
        if response.finish_reason == "abort":
            reason = body["meta_info"]["finish_reason"].get("message", "")
            raise _Aborted(f"aborted by the server: {reason}")
        return response

    async def generate_many(self, prompts: Sequence[Sequence[int]],
                            sampling: SamplingParams) -> list[Response]:
        """One response per prompt, in order; the first failure cancels the rest and raises."""
        self._ensure_open()
        tasks = [asyncio.ensure_future(self.generate(p, sampling)) for p in prompts]
        self._tasks.update(tasks)
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._tasks.difference_update(tasks)

    async def abort_outstanding(self) -> int:
        """Cancel every request in flight (their connections close); returns how many."""
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def close(self) -> None:
        await self.abort_outstanding()
        if self._session is not None:
            await self._session.close()
            self._session = None


class RolloutClient:
    """Synchronous facade over `AsyncRolloutClient`, for callers without an event loop."""

    def __init__(self, urls: Sequence[str], **options: Any) -> None:
        self._loop = EventLoopThread("megarl-rollout-client")
        self._client = AsyncRolloutClient(urls, **options)

    @classmethod
    def from_config(cls, rollout: Any, urls: Sequence[str]) -> "RolloutClient":
        """A client with the limits of a `RolloutConfig` (urls: `RolloutServers.generate_urls`)."""
        return cls(urls, max_concurrency=rollout.max_concurrency,
                   request_timeout_s=rollout.request_timeout_s, max_retries=rollout.max_retries,
                   retry_backoff_s=rollout.retry_backoff_s)

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    def set_urls(self, urls: Sequence[str]) -> None:
        """See `AsyncRolloutClient.set_urls` (call between batches; a list swap is atomic)."""
        self._client.set_urls(urls)

    def generate_batch(self, prompts_token_ids: Sequence[Sequence[int]],
                       sampling: SamplingParams) -> list[Response]:
        """One response per prompt (repeat a prompt for several samples), in order."""
        return self._loop.run(self._client.generate_many(prompts_token_ids, sampling))

    def generate(self, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> Response:
        return self._loop.run(self._client.generate(prompt_token_ids, sampling))

    def close(self) -> None:
        """Abort what is in flight and release the connections and the loop thread."""
        try:
            self._loop.run(self._client.close(), timeout=30)
        finally:
            self._loop.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
