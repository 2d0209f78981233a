"""Colocated mode: trainer rank r shares a GPU with TP rank r % t of server r // t, so the
ranks [s*t, (s+1)*t) form server s's group; ranks beyond the servers belong to none."""

import torch.distributed as dist

from megarl.sync.colocated import server_group
from tests.harness import run_distributed


def _groups(num_servers, server_tp):
    group = server_group(num_servers, server_tp)
    if group is None:
        return None
    return dist.get_process_group_ranks(group), dist.get_rank(group)


def test_server_groups_follow_the_gpu_layout():
    assert run_distributed(_groups, 4, args=(2, 2)) == [
        ([0, 1], 0), ([0, 1], 1), ([2, 3], 0), ([2, 3], 1)]
    assert run_distributed(_groups, 4, args=(1, 2)) == [([0, 1], 0), ([0, 1], 1), None, None]
    assert run_distributed(_groups, 4, args=(4, 1)) == [None] * 4
