"""The multi-process harness reports results, failures and time-outs, and leaves nothing behind."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests import harness


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), float(t), os.getpid()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()  # rank 0 waits on the dead peer until the pool is killed


def _sleep_forever():
    time.sleep(3600)


def test_results_come_back_per_rank():
    results = harness.run_distributed(_all_reduce_rank, world_size=2)
    assert [r[:3] for r in results] == [(0, 2, 1.0), (1, 2, 1.0)]


def test_exception_on_one_rank_fails_with_its_traceback_and_kills_the_pool():
    pids = [r[3] for r in harness.run_distributed(_all_reduce_rank, world_size=2)]
    with pytest.raises(harness.DistributedError) as err:
        harness.run_distributed(_fail_on_rank_one, world_size=2, timeout=60)
    message = str(err.value)
    assert "--- rank 1 ---" in message and "ValueError: rank one is unhappy" in message
    _assert_gone(pids)
    # the next call gets a fresh pool
    assert [r[2] for r in harness.run_distributed(_all_reduce_rank, world_size=2)] == [1.0, 1.0]


def test_timeout_fails_and_leaves_no_process():
    pids = [r[3] for r in harness.run_distributed(_all_reduce_rank, world_size=2)]
    start = time.monotonic()
    with pytest.raises(harness.DistributedError, match="did not finish within 2 s"):
        harness.run_distributed(_sleep_forever, world_size=2, timeout=2)
    assert time.monotonic() - start < 30
    _assert_gone(pids)


def _assert_gone(pids):
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie that has been reaped is gone; anything else is a leak
        with open(f"/proc/{pid}/status") as f:
            assert "zombie" in f.read().lower(), f"worker {pid} is still running"
