"""The colocated transport on CPU against a fake SGLang server: call order, payloads that fit
SGLang's update_weights_from_tensor, one payload per server TP rank gathered over a trainer
group, and tensors that arrive intact. The CUDA IPC path itself is in tests/gpu/."""

from __future__ import annotations

import base64
import pickle

import torch
from aiohttp import web

from megarl.sync.colocated import ColocatedWeightSync, forking_pickle_serializer
from tests.fixtures.fake_server import FakeServer, ok_json
from tests.harness import run_distributed
from tests.unit.test_rollout_protocol import check_request

ENDPOINTS = ("/pause_generation", "/release_memory_occupation", "/resume_memory_occupation",
             "/begin_weight_update", "/end_weight_update", "/flush_cache",
             "/update_weight_version", "/continue_generation")


def fake_sglang(received: list) -> FakeServer:
    async def from_tensor(request: web.Request) -> web.Response:
        body = await request.json()
        # what SGLang's MultiprocessingSerializer.deserialize does, per TP rank
        received.append([pickle.loads(base64.b64decode(p)) for p in body["serialized_named_tensors"]])
        return await ok_json(request)

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.\n")

    async def null(request: web.Request) -> web.Response:
        return web.json_response(None)  # SGLang's memory handlers return nothing on success

    handlers = {path: ok_json for path in ENDPOINTS}
    handlers["/flush_cache"] = text
    handlers["/release_memory_occupation"] = null
    handlers["/resume_memory_occupation"] = null
    handlers["/update_weights_from_tensor"] = from_tensor
    return FakeServer(handlers)


def weights(rank: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer.{i}.weight", torch.full((4, 3), float(10 * rank + i))) for i in range(5)]


def test_release_update_cycle_on_one_rank():
    received: list = []
    with fake_sglang(received) as server:
        sync = ColocatedWeightSync(server.url, bucket_mb=100 / 2**20,
                                   serializer=forking_pickle_serializer)
        sync.connect()
        sync.release_memory()
        stats = sync.update(iter(weights(0)), version="12")
        sync.close()
    assert server.paths() == [
        "/pause_generation", "/release_memory_occupation", "/resume_memory_occupation",
        "/begin_weight_update", "/update_weights_from_tensor", "/update_weights_from_tensor",
        "/update_weights_from_tensor", "/end_weight_update", "/resume_memory_occupation",
        "/flush_cache", "/update_weight_version", "/continue_generation"]
    bodies = dict(server.calls[2:3])
    assert bodies["/resume_memory_occupation"] == {"tags": ["weights"]}
    assert server.calls[8][1] == {"tags": ["kv_cache", "cuda_graph"]}
    assert server.calls[10][1]["new_version"] == "12"
    for path, body in server.calls:
        if body is not None and path != "/update_weights_from_tensor":
            check_request(path, body)
    check_request("/update_weights_from_tensor", server.calls[4][1])
    got = [item for bucket in received for item in bucket[0]]  # 48-byte tensors, 100-byte buckets
    assert [len(bucket[0]) for bucket in received] == [2, 2, 1]
    assert [n for n, _ in got] == [n for n, _ in weights(0)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, weights(0)))
    assert stats.num_tensors == 5 and stats.num_buckets == 3


def test_update_without_release_still_pauses():
    received: list = []
    with fake_sglang(received) as server:
        sync = ColocatedWeightSync(server.url, serializer=forking_pickle_serializer)
        sync.connect()
        sync.update(iter(weights(0)), version="1")
        sync.close()
    assert "/resume_memory_occupation" not in server.paths()
    assert server.paths()[:2] == ["/pause_generation", "/begin_weight_update"]


def _two_ranks_share_a_server() -> list:
    import torch.distributed as dist

    rank = dist.get_rank()
    received: list = []
    server = fake_sglang(received).__enter__() if rank == 0 else None
    url = [server.url if server else None]
    dist.broadcast_object_list(url, src=0)
    sync = ColocatedWeightSync(url[0], bucket_mb=100 / 2**20, group=dist.group.WORLD,
                               serializer=forking_pickle_serializer)
    sync.connect()
    sync.update(iter(weights(rank)), version="2")
    sync.close()
    if server is None:
        return []
    server.__exit__(None, None, None)
    # per bucket: one payload per TP rank, in rank order, each with that rank's tensors
    return [[[(name, t.clone()) for name, t in payload] for payload in bucket] for bucket in received]


def test_the_group_leader_posts_one_payload_per_tp_rank():
    received = run_distributed(_two_ranks_share_a_server, world_size=2, timeout=120)[0]
    assert len(received) == 3 and all(len(bucket) == 2 for bucket in received)
    for tp_rank in (0, 1):
        got = [item for bucket in received for item in bucket[tp_rank]]
        assert [n for n, _ in got] == [n for n, _ in weights(tp_rank)]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, weights(tp_rank)))
