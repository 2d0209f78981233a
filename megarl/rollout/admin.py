"""Control calls to every generation server at once (never through the router, which would
send them to one server): pause and resume, weight-update sessions, versions, cache flushes,
memory release and resumption, server information and weight read-back.

Calls go to all servers concurrently; a failure names the server and the endpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Optional, Sequence

from . import protocol as P
from .http import EventLoopThread, ServerRejected, ServerUnavailable, request_json


class ServerCallError(RuntimeError):
    """A control call failed on one or more servers."""


class ServerAdmin:
    """Control calls on a fixed list of server URLs, run on an `EventLoopThread`."""

    def __init__(self, urls: Sequence[str], *, loop: EventLoopThread, timeout_s: float = 600.0):
        if not urls:
            raise ValueError("ServerAdmin needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.loop = loop
        self.timeout_s = timeout_s

    async def call(self, url: str, endpoint: str, payload: Optional[dict] = None, *,
                   method: str = "POST", expect_json: bool = True) -> Any:
        return await request_json(await self.loop.session(), method, url + endpoint, payload,
                                  timeout_s=self.timeout_s, expect_json=expect_json)

    def submit_all(self, endpoint: str, payload: Optional[dict] = None, *,
                   parse: Callable[[Any, str], Any] = P.parse_success_reply,
                   method: str = "POST") -> list["concurrent.futures.Future"]:
        """Start the call on every server; each future yields the parsed reply."""
        async def one(url: str) -> Any:
            body = await self.call(url, endpoint, payload, method=method)
            return parse(body, f"{url}{endpoint}")
        return [self.loop.submit(one(url)) for url in self.urls]

    def call_all(self, endpoint: str, payload: Optional[dict] = None, *,
                 parse: Callable[[Any, str], Any] = P.parse_success_reply,
                 method: str = "POST", expect_json: bool = True) -> list[Any]:
        """The call on every server, concurrently; raises ServerCallError listing failures."""
        async def one(url: str) -> Any:
            body = await self.call(url, endpoint, payload, method=method, expect_json=expect_json)
            return parse(body, f"{url}{endpoint}")

        async def everyone() -> list[Any]:
            return await asyncio.gather(*(one(u) for u in self.urls), return_exceptions=True)

        results = self.loop.run(everyone())
        raise_failures(endpoint, self.urls, results)
        return results

    # ------------------------------------------------------------------ named calls

    def pause(self, mode: str) -> None:
        self.call_all("/pause_generation", P.pause_generation_payload(mode), parse=_ignore)

    def resume(self) -> None:
        self.call_all("/continue_generation", P.continue_generation_payload(), parse=_ignore)

    def begin_weight_update(self) -> None:
        self.call_all("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self.call_all("/end_weight_update", {})

    def flush_cache(self) -> None:
        self.call_all("/flush_cache", None, parse=_ignore, expect_json=False)

    def set_weight_version(self, version: str) -> None:
        self.call_all("/update_weight_version", P.update_weight_version_payload(version))

    def abort_all(self) -> None:
        self.call_all("/abort_request", {"abort_all": True}, parse=_ignore, expect_json=False)

    def release_memory(self) -> None:
        """Free weights, KV cache and CUDA graphs (servers started with enable_memory_saver)."""
        self.call_all("/release_memory_occupation", P.memory_occupation_payload(), parse=_ignore,
                      expect_json=False)

    def resume_memory(self, tags: Sequence[str]) -> None:
        """Take back the memory of these regions (weights, kv_cache, cuda_graph)."""
        self.call_all("/resume_memory_occupation", P.memory_occupation_payload(tags),
                      parse=_ignore, expect_json=False)

    def server_info(self) -> list[dict[str, Any]]:
        return self.call_all("/server_info", None, method="GET", parse=P.parse_server_info)

    def weights_by_name(self, name: str, truncate_size: int) -> list[list]:
        return self.call_all("/get_weights_by_name",
                             P.get_weights_by_name_payload(name, truncate_size),
                             parse=lambda body, where: P.parse_weights_by_name_reply(body, name))

    def dev_checksums(self, names: Optional[Sequence[str]] = None) -> list[dict[str, str]]:
        """Per-parameter SHA-256 from each dev server (the dev server's own endpoint)."""
        payload = {} if names is None else {"names": list(names)}
        return self.call_all("/dev/weights_checksum", payload, parse=_checksums)


def raise_failures(endpoint: str, urls: Sequence[str], results: Sequence[Any]) -> None:
    failures = [f"{url}: {res}" for url, res in zip(urls, results)
                if isinstance(res, BaseException)]
    if failures:
        raise ServerCallError(f"{endpoint} failed on {len(failures)} of {len(urls)} servers:\n  "
                              + "\n  ".join(failures))


def _ignore(body: Any, where: str) -> Any:
    return body


def _checksums(body: Any, where: str) -> dict[str, str]:
    sums = body.get("checksums") if isinstance(body, dict) else None
    if not isinstance(sums, dict):
        raise P.ServerReplyError(where, "checksums", f"expected an object, got {body!r:.80}")
    return sums


__all__ = ["ServerAdmin", "ServerCallError", "ServerRejected", "ServerUnavailable",
           "raise_failures"]
