"""HTTP plumbing shared by the rollout client, the server admin calls and weight sync.

`EventLoopThread` runs one asyncio loop in a daemon thread so that synchronous callers (trainer
rank 0, the weight-sync strategies) can run coroutines and keep HTTP calls in flight while they
do blocking work themselves (a broadcast). `request_json` is the one function that turns a
server's answer into either a decoded body or a typed error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import Any, Coroutine, Optional, TypeVar

import aiohttp

T = TypeVar("T")


class ServerUnavailable(ConnectionError):
    """A server could not be reached, dropped the connection, timed out or answered 5xx/429:
    worth retrying, possibly on another server."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class ServerRejected(RuntimeError):
    """A server answered 4xx: the request itself is wrong, retrying will not help."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {body[:500]}")
        self.url = url
        self.status = status
        self.body = body


async def request_json(session: aiohttp.ClientSession, method: str, url: str,
                       payload: Optional[dict] = None, *, timeout_s: float,
                       expect_json: bool = True) -> Any:
    """One HTTP call. Returns the decoded JSON body (or the text when `expect_json` is false,
    or None for an empty body); raises ServerUnavailable or ServerRejected."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.request(method, url, json=payload, timeout=timeout) as resp:
            text = await resp.text()
            status = resp.status
    except asyncio.TimeoutError:
        raise ServerUnavailable(url, f"no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise ServerUnavailable(url, f"{type(exc).__name__}: {exc}") from None
    if status >= 500 or status == 429:
        raise ServerUnavailable(url, f"HTTP {status}: {text[:300]}")
    if status >= 400:
        raise ServerRejected(url, status, text)
    if not expect_json:
        return text
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise ServerRejected(url, status, f"reply is not JSON: {text[:300]}") from None


def new_session(max_connections: int = 0) -> aiohttp.ClientSession:
    """A client session without a connection cap (concurrency is limited by the callers)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                 timeout=aiohttp.ClientTimeout(total=None))


class EventLoopThread:
    """An asyncio loop in a daemon thread; `run` waits for a coroutine, `submit` does not."""

    def __init__(self, name: str = "megarl-http") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._session: Optional[aiohttp.ClientSession] = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None

    async def session(self) -> aiohttp.ClientSession:
        """A session bound to this loop (created on first use, closed by `close`); await it
        from coroutines running on this loop."""
        if self._session is None:
            self._session = new_session()
        return self._session

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        if self._session is not None:
            self.run(self._session.close(), timeout=10)
            self._session = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
