"""Run a test function in N processes joined by one gloo process group.

    results = run_distributed(check_something, world_size=2, args=(seed,), timeout=120)

`results[r]` is what rank r returned. The function must be importable (module level) and its
arguments and result picklable. An exception on any rank fails the call with a
`DistributedError` carrying every failing rank's traceback; a call past `timeout` fails too.

Workers are spawned once per world size and reused, because importing torch and megatron-core
dominates their start-up. After every call the worker tears down megatron's model-parallel
state, so each test starts from a plain world group. When a call fails or times out, the whole
pool is killed (a rank stuck in a collective with a dead peer cannot be saved) and the next call
starts a fresh one, so no process outlives a failing test. Workers also exit on their own when
the test process disappears.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

_SPAWN = mp.get_context("spawn")
_POLL_S = 0.5
_GRACE_S = 5.0  # how long to wait for the other ranks' reports once one rank failed


class DistributedError(AssertionError):
    """A rank raised, or the ranks did not all finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_megatron_state() -> None:
    import sys

    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the test process dies, even while the
    worker is stuck in a collective and cannot notice by itself."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world_size: int, port: int, tasks, results, parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300)
    )
    while True:
        try:
            task = tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the test
            results.put((rank, False, traceback.format_exc()))
        finally:
            try:
                _reset_megatron_state()
            except Exception:  # noqa: BLE001
                pass
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        port = free_port()
        self.tasks = [_SPAWN.Queue() for _ in range(world_size)]
        self.results = _SPAWN.Queue()
        self.procs = [
            _SPAWN.Process(
                target=_worker, args=(r, world_size, port, self.tasks[r], self.results, os.getpid()),
                # Not daemonic: the code under test may start processes of its own (reward
                # workers, servers). Workers exit by themselves when the test process is gone.
                daemon=False, name=f"megarl-test-rank{r}",
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        reports: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        while len(reports) < self.world_size:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + _GRACE_S):
                break
            try:
                rank, ok, value = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                for p in dead:
                    rank = self.procs.index(p)
                    reports.setdefault(rank, (False, f"worker died (exit code {p.exitcode})"))
                if dead and failed_at is None:
                    failed_at = time.monotonic()
                continue
            reports[rank] = (ok, value)
            if not ok and failed_at is None:
                failed_at = time.monotonic()
        errors = {r: v for r, (ok, v) in reports.items() if not ok}
        missing = sorted(set(range(self.world_size)) - set(reports))
        if errors or missing:
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if missing and not errors:
                parts.append(f"ranks {missing} did not finish within {timeout:.0f} s")
            elif missing:
                parts.append(f"ranks {missing} did not report (probably waiting on a failed rank)")
            raise DistributedError(
                f"{getattr(fn, '__name__', fn)} failed at world size {self.world_size}:\n"
                + "\n".join(parts)
            )
        return [reports[r][1] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)


_pools: dict[int, _Pool] = {}


def run_distributed(
    fn: Callable, world_size: int, args: tuple = (), kwargs: dict | None = None,
    timeout: float = 180.0,
) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results."""
    pool = _pools.get(world_size)
    if pool is not None and not pool.alive():
        pool.close(kill=True)
        pool = None
    if pool is None:
        pool = _pools[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args, kwargs or {}, timeout)
    except BaseException:
        _pools.pop(world_size, None)
        pool.close(kill=True)
        raise


def shutdown() -> None:
    """Stop every pool (called at the end of the test session)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.close()


def live_worker_pids() -> list[int]:
    return [p.pid for pool in _pools.values() for p in pool.procs if p.is_alive()]


atexit.register(shutdown)
