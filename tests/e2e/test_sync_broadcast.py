"""End to end on CPU: two dev servers behind the real sglang-router, a trainer that syncs new
weights by broadcast over gloo, and a rollout step with data, rewards and dynamic sampling.

The "trainer" is a plain torch process of a 2-rank gloo world (tests.harness): rank 0 joins
the weight-update group and broadcasts, rank 1 only drains its stream. It holds the servers'
HF model with a known update applied. Afterwards every server's weights must equal the
trainer's bit for bit, and greedy generation through the router must match the trainer's own.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from megarl.config import AlgorithmConfig, RewardConfig, RolloutConfig, SyncConfig
from megarl.rollout.admin import ServerAdmin
from megarl.rollout.batch import collect_rollout_batch
from megarl.rollout.client import RolloutClient
from megarl.rollout.data import PromptDataset, PromptSampler
from megarl.rollout.http import EventLoopThread
from megarl.rollout.protocol import SamplingParams
from megarl.rollout.reward import RewardComputer
from megarl.rollout.servers import RolloutServers
from megarl.sync.verify import tensor_checksum
from tests.fixtures.tiny_model import build_tiny_model, build_tokenizer
from tests.harness import run_distributed

PROMPT = [1, 33, 31, 17, 30, 99, 4, 75, 4]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_e2e")
    model_dir = build_tiny_model(root / "model", seed=0)
    cfg = RolloutConfig(backend="dev", num_servers=2, base_port=0, router_port=0,
                        router_policy="round_robin", health_timeout_s=120, retry_backoff_s=0.1,
                        server_args={"num_threads": 1, "max_batch_size": 16})
    with RolloutServers(cfg, model_path=str(model_dir), log_dir=root / "logs") as servers:
        client = RolloutClient.from_config(cfg, servers.generate_urls)
        loop = EventLoopThread()
        admin = ServerAdmin(servers.server_urls, loop=loop)
        try:
            yield {"root": root, "model": model_dir, "servers": servers, "client": client,
                   "admin": admin, "cfg": cfg}
        finally:
            client.close()
            loop.close()


def updated_model(model_dir: str, step: int):
    """The servers' model with a known, seeded update applied `step` times."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _ in range(step):
            for _, param in sorted(model.named_parameters()):
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def local_greedy(model) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=GREEDY.max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _trainer(server_urls: list[str], model_dir: str) -> dict:
    """Trainer ranks: every rank streams its weights; only global rank 0 sends them."""
    import torch.distributed as dist

    from megarl.sync import make_weight_sync

    rank = dist.get_rank()
    results = {"rank": rank, "syncs": []}
    for step, flattened in ((1, True), (2, False)):
        model = updated_model(model_dir, step)
        cfg = SyncConfig(bucket_mb=0.02, verify=True, flattened_buckets=flattened, timeout_s=60)
        sync = make_weight_sync(cfg, server_urls, rank=rank)
        sync.connect()
        stats = sync.update(model.state_dict().items(), version=f"step-{step}")
        sync.close()
        results["syncs"].append(stats.as_dict())
        results["group_members"] = type(sync).__name__
    results["checksums"] = {n: tensor_checksum(t) for n, t in model.state_dict().items()}
    results["greedy"] = local_greedy(model)
    return results


def test_generation_spreads_over_both_servers(stack):
    admin = stack["admin"]
    before = [info["num_requests_finished"] for info in admin.server_info()]
    responses = stack["client"].generate_batch([PROMPT] * 8, SamplingParams(max_new_tokens=6))
    assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in responses)
    assert all(r.finish_reason in ("stop", "length") for r in responses)
    after = [info["num_requests_finished"] for info in admin.server_info()]
    assert all(a > b for a, b in zip(after, before))  # the router used both


def test_trainer_syncs_weights_by_broadcast_bit_for_bit(stack):
    client, admin = stack["client"], stack["admin"]
    original = client.generate(PROMPT, GREEDY)
    rank0, rank1 = run_distributed(_trainer, world_size=2,
                                   args=(stack["servers"].server_urls, str(stack["model"])),
                                   timeout=150)
    assert rank0["group_members"] == "BroadcastWeightSync"
    assert rank1["group_members"] == "DrainWeightSync"
    for stats in rank0["syncs"]:
        assert stats["verified"] and stats["num_tensors"] == len(rank0["checksums"])
        assert stats["num_buckets"] > 1  # 0.02 MB buckets: several broadcasts
    for sums in admin.dev_checksums():
        assert sums == rank0["checksums"]
    after = client.generate(PROMPT, GREEDY)
    assert after.token_ids == rank0["greedy"] != original.token_ids
    assert after.weight_version == "step-2"
    assert {info["weight_version"] for info in admin.server_info()} == {"step-2"}
    assert not any(info["paused"] for info in admin.server_info())


def test_a_sync_during_generation_aborts_and_the_client_retries_on_new_weights(stack):
    """pause_mode=abort: requests in flight end as aborted, the client retries them, and they
    run once generation continues, on the new weights."""
    import threading

    from megarl.sync import BroadcastWeightSync

    client, admin = stack["client"], stack["admin"]
    retries_before = client.stats.num_retries
    result: dict = {}
    long = SamplingParams(temperature=1.0, max_new_tokens=300, stop_token_ids=())
    thread = threading.Thread(target=lambda: result.update(
        responses=client.generate_batch([PROMPT] * 8, long)))
    thread.start()
    deadline = time.monotonic() + 30
    while not all(i["num_requests_running"] for i in admin.server_info()):
        assert time.monotonic() < deadline, "generation never started on both servers"
        time.sleep(0.01)
    sync = BroadcastWeightSync(stack["servers"].server_urls, bucket_mb=0.05, timeout_s=60)
    sync.connect()
    sync.update(updated_model(str(stack["model"]), 3).state_dict().items(), version="step-3")
    sync.close()
    thread.join(60)
    responses = result["responses"]
    assert len(responses) == 8 and client.stats.num_retries > retries_before
    retried = [r for r in responses if r.num_attempts > 1]
    assert retried and all(r.weight_version == "step-3" for r in retried)


def test_collect_rollout_batch_with_data_rewards_and_dynamic_sampling(stack, tmp_path):
    data_file = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    tokenizer = build_tokenizer()
    dataset = PromptDataset([data_file], tokenizer, max_prompt_tokens=64)
    assert len(dataset) == 6 and dataset.stats.num_malformed == 1
    sampler = PromptSampler(dataset, seed=3)
    rollout = RolloutConfig(prompts_per_step=3, samples_per_prompt=4, max_new_tokens=8,
                            temperature=1.0)
    algorithm = AlgorithmConfig(dynamic_sampling=True, max_sampling_rounds=2, overlong="filter")
    reward = RewardConfig(function="tests.unit.test_reward:first_char_parity",
                          num_workers=2, timeout_s=10)
    with RewardComputer.from_config(reward) as scorer:
        batch = collect_rollout_batch(client=stack["client"], sampler=sampler, scorer=scorer,
                                      tokenizer=tokenizer, rollout=rollout, algorithm=algorithm)
    assert 1 <= batch.num_groups <= 3 and len(batch) == 4 * batch.num_groups
    for g in set(batch.group_ids):  # every kept group has reward variance
        assert len({r for r, gid in zip(batch.task_rewards, batch.group_ids) if gid == g}) > 1
    for tokens, logprobs, truncated, mask in zip(batch.response_token_ids, batch.rollout_logprobs,
                                                 batch.truncated, batch.loss_mask):
        assert len(tokens) == len(logprobs) <= 8 and mask == (not truncated)
    assert batch.counts["num_prompts_drawn"] >= 3 and sampler.state_dict()["position"] > 0
