"""Weight sync by torch.distributed broadcast from trainer rank 0 into every server.

`connect()` asks every server for its TP size, gives server i the ranks
1 + (TP sizes of servers before i) onwards, posts /init_weights_update_group to all of them and
hosts the group's rendezvous itself as rank 0 (NCCL on GPU, gloo on CPU).

`update(named_tensors, version=...)` pauses generation, opens a weight-update session, and for
each bucket (`buckets.iter_buckets`, `sync.bucket_mb`) posts /update_weights_from_distributed
with the bucket's names, dtypes and shapes to every server and, while those calls are in flight
(SGLang receives inside the HTTP call), broadcasts the bucket. Then it closes the session,
flushes the servers' caches, stamps the weight version and resumes generation (also after a
failure, so servers are never left paused). With `sync.verify`, every server's weights are
compared with the trainer's afterwards (`verify.verify_servers`).

Only trainer global rank 0 creates this object (see `base.make_weight_sync`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from megarl.rollout import protocol as P
from megarl.rollout.admin import ServerAdmin, raise_failures
from megarl.rollout.http import EventLoopThread

from .base import NamedTensors, SyncStats, WeightSync, WeightSyncError
from .buckets import Bucket, iter_buckets
from .group import create_weight_update_group, destroy_weight_update_group
from .verify import Fingerprints, verify_servers

logger = logging.getLogger(__name__)

_POLL_S = 0.002


class BroadcastWeightSync(WeightSync):
    """The broadcast transport (see the module docstring)."""

    def __init__(self, server_urls: Sequence[str], *, bucket_mb: float = 512.0,
                 timeout_s: float = 600.0, group_port: int = 0,
                 master_address: Optional[str] = None, pause_mode: str = "abort",
                 flattened: bool = False, verify: bool = False,
                 backend: Optional[str] = None) -> None:
        self.server_urls = [u.rstrip("/") for u in server_urls]
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.group_port = group_port
        self.master_address = master_address
        self.pause_mode = pause_mode
        self.flattened = flattened
        self.verify = verify
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group: Any = None
        self.infos: list[dict] = []
        self._buffer: Optional[torch.Tensor] = None  # flattened buckets: reused every update
        self._loop: Optional[EventLoopThread] = None
        self.admin: Optional[ServerAdmin] = None

    @classmethod
    def from_config(cls, sync: Any, server_urls: Sequence[str],
                    backend: Optional[str] = None) -> "BroadcastWeightSync":
        return cls(server_urls, bucket_mb=sync.bucket_mb, timeout_s=sync.timeout_s,
                   group_port=sync.group_port, master_address=sync.master_address,
                   pause_mode=sync.pause_mode, flattened=sync.flattened_buckets,
                   verify=sync.verify, backend=backend)

    # ------------------------------------------------------------------ the group

    def connect(self) -> None:
        if self.group is not None:
            return
        self._loop = EventLoopThread("megarl-weight-sync")
        self.admin = ServerAdmin(self.server_urls, loop=self._loop, timeout_s=self.timeout_s)
        self.infos = self.admin.server_info()
        tp_sizes = [int(info["tp_size"]) for info in self.infos]
        world_size = 1 + sum(tp_sizes)
        port = self.group_port or _free_port()
        address = self.master_address or default_master_address(self.server_urls)
        futures = []
        offset = 1
        for url, tp in zip(self.server_urls, tp_sizes):
            payload = P.init_weights_update_group_payload(
                master_address=address, master_port=port, rank_offset=offset,
                world_size=world_size, backend=self.backend)
            call = self._post(url, "/init_weights_update_group", payload)
            futures.append(self._loop.submit(call))
            offset += tp
        logger.info("weight-update group: trainer rank 0 at %s:%d, %d server ranks, %s",
                    address, port, world_size - 1, self.backend)
        self.group = _while_replies_pending(
            lambda: create_weight_update_group(
                master_address=address, master_port=port, rank=0, world_size=world_size,
                group_name=P.WEIGHT_UPDATE_GROUP, backend=self.backend, timeout_s=self.timeout_s),
            futures, self.timeout_s, what="/init_weights_update_group")
        raise_failures("/init_weights_update_group", self.server_urls,
                       [_outcome(f) for f in futures])

    async def _post(self, url: str, endpoint: str, payload: dict) -> str:
        body = await self.admin.call(url, endpoint, payload)
        return P.parse_success_reply(body, url + endpoint)

    def close(self) -> None:
        if self.group is not None:
            try:
                self.admin.call_all("/destroy_weights_update_group",
                                    P.destroy_weights_update_group_payload())
            except Exception as exc:  # noqa: BLE001 - closing must not fail the run's shutdown
                logger.warning("destroying the servers' weight-update group failed: %s", exc)
            destroy_weight_update_group(self.group)
            self.group = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # ------------------------------------------------------------------ one update

    def update(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        if self.group is None:
            raise WeightSyncError("update() before connect()")
        stats = SyncStats(version=str(version))
        fingerprints = Fingerprints() if self.verify else None
        start = time.perf_counter()
        self.admin.pause(self.pause_mode)
        try:
            self.admin.begin_weight_update()
            self._send_all(_recording(named_tensors, fingerprints), stats)
            stats.timings["transfer"] = time.perf_counter() - start
            self.admin.end_weight_update()
            if self.pause_mode != "in_place":  # in_place keeps its KV cache by design
                self.admin.flush_cache()
            self.admin.set_weight_version(stats.version)
        finally:
            try:
                self.admin.resume()
            except Exception as exc:  # noqa: BLE001 - keep the original error, report this one
                logger.error("resuming generation after the weight update failed: %s", exc)
        stats.seconds = time.perf_counter() - start
        if fingerprints is not None:
            verify_servers(self.admin, self.infos, fingerprints)
            stats.verified = True
        logger.debug("weight sync %s: %d tensors, %.1f MB in %d buckets, %.2f s (%.2f GB/s)",
                    stats.version, stats.num_tensors, stats.num_bytes / 2**20, stats.num_buckets,
                    stats.seconds, stats.gbytes_per_s)
        return stats

    def _send_all(self, named_tensors: NamedTensors, stats: SyncStats) -> None:
        """Announce and broadcast every bucket. A bucket's reply (the server has loaded it) is
        collected after the next bucket went out, so that packing the next bucket overlaps
        with the servers loading the previous one; the servers take buckets in order."""
        timings = {"pack": 0.0, "broadcast": 0.0, "reply": 0.0}
        previous: Optional[tuple[list, str]] = None
        if self.flattened and self._buffer is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if self.backend == "nccl" else torch.device("cpu"))
            self._buffer = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=device)
        buckets = iter_buckets(named_tensors, self.bucket_bytes, flattened=self.flattened,
                               buffer=self._buffer)
        while True:
            mark = time.perf_counter()
            bucket = next(buckets, None)
            timings["pack"] += time.perf_counter() - mark
            if bucket is None:
                break
            what = f"bucket {stats.num_buckets} ({len(bucket)} tensors, first {bucket.names[0]})"
            mark = time.perf_counter()
            futures = self._broadcast(bucket, what, previous)
            timings["broadcast"] += time.perf_counter() - mark
            if previous is not None:
                mark = time.perf_counter()
                self._collect(*previous)
                timings["reply"] += time.perf_counter() - mark
            previous = (futures, what)
            stats.num_buckets += 1
            stats.num_tensors += len(bucket)
            stats.num_bytes += bucket.nbytes
        if previous is not None:
            mark = time.perf_counter()
            self._collect(*previous)
            timings["reply"] += time.perf_counter() - mark
        stats.timings.update(timings)

    def _broadcast(self, bucket: Bucket, what: str, previous: Optional[tuple[list, str]]) -> list:
        """Post the announcement to every server and broadcast the bucket; returns the calls."""
        payload = P.update_weights_from_distributed_payload(
            names=bucket.names, dtypes=bucket.dtypes, shapes=bucket.shapes,
            flattened=self.flattened)
        futures = self.admin.submit_all("/update_weights_from_distributed", payload)
        tensors = [bucket.flat] if self.flattened else bucket.tensors
        works = [dist.broadcast(t, group_src=0, group=self.group, async_op=True) for t in tensors]
        watched = futures + (previous[0] if previous is not None else [])
        _wait_watching(lambda: all(w.is_completed() for w in works), watched, self.timeout_s,
                       what=what)
        for work in works:
            work.wait()  # surfaces a failed broadcast as an exception
        return futures

    def _collect(self, futures: list, what: str) -> None:
        raise_failures(f"/update_weights_from_distributed of {what}", self.server_urls,
                       [_outcome(f, self.timeout_s) for f in futures])


def _recording(named_tensors: NamedTensors, fingerprints: Optional[Fingerprints]) -> NamedTensors:
    for name, tensor in named_tensors:
        if fingerprints is not None:
            fingerprints.add(name, tensor)
        yield name, tensor


def _outcome(future: concurrent.futures.Future, timeout_s: Optional[float] = None) -> Any:
    try:
        return future.result(timeout_s)
    except Exception as exc:  # noqa: BLE001 - reported per server by raise_failures
        return exc


def _while_replies_pending(blocking: Callable[[], Any], futures: list, timeout_s: float,
                           *, what: str) -> Any:
    """Run `blocking` (the group rendezvous, which servers join inside their HTTP calls) in a
    helper thread while watching those calls (see `_wait_watching`)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = blocking()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="megarl-weight-sync-io", daemon=True)
    thread.start()
    _wait_watching(lambda: not thread.is_alive(), futures, timeout_s, what=what)
    if "error" in result:
        raise WeightSyncError(f"{what}: {result['error']}") from result["error"]
    return result.get("value")


def _wait_watching(is_done: Callable[[], bool], futures: list, timeout_s: float, *,
                   what: str) -> None:
    """Wait until `is_done()`; a server call that fails first, or the deadline, ends the wait
    with an error instead of leaving the trainer blocked on servers that will never join."""
    deadline = time.monotonic() + timeout_s
    while not is_done():
        done, _ = concurrent.futures.wait(futures, timeout=_POLL_S,
                                          return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            raise WeightSyncError(f"{what}: a server failed while the trainer waited for it: "
                                  f"{failed[0].exception()}; the weight-update group is unusable")
        if len(done) == len(futures):  # every server answered: only the local side remains
            time.sleep(_POLL_S)
        if time.monotonic() > deadline:
            raise WeightSyncError(f"{what}: not finished within sync.timeout_s={timeout_s:g} s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def default_master_address(server_urls: Sequence[str]) -> str:
    """127.0.0.1 when every server is on this host, else the address of the interface that
    routes to the first server (found without sending anything)."""
    hosts = [urlparse(u).hostname or "" for u in server_urls]
    if all(h in ("127.0.0.1", "localhost", "::1") for h in hosts):
        return "127.0.0.1"
    remote = next(h for h in hosts if h not in ("127.0.0.1", "localhost", "::1"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((remote, 9))
        return s.getsockname()[0]
