"""Weight sync against a real SGLang server on GPU (skipped without CUDA or without sglang).

* broadcast: an SGLang server on GPU 1 joins the weight-update group of this process (trainer
  rank 0 on GPU 0) over NCCL; after the sync, every recorded first row of every weight equals
  the trainer's (`sync.verify`, via /get_weights_by_name) and greedy generation changes.
* colocated: an SGLang server with --enable-memory-saver shares GPU 0 with this process; it
  releases its memory, then takes the new weights as CUDA IPC handles
  (/update_weights_from_tensor) and resumes.

The model is the tiny test model at a width SGLang's attention kernels accept (head_dim 64).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(900),
]
sglang = pytest.importorskip("sglang")

from megarl.config import RolloutConfig, SyncConfig  # noqa: E402
from megarl.rollout.client import RolloutClient  # noqa: E402
from megarl.rollout.protocol import SamplingParams  # noqa: E402
from megarl.rollout.servers import RolloutServers  # noqa: E402
from megarl.sync.broadcast import BroadcastWeightSync  # noqa: E402
from megarl.sync.colocated import ColocatedWeightSync  # noqa: E402
from megarl.sync.verify import Fingerprints, verify_servers  # noqa: E402
from tests.fixtures.tiny_model import build_model, build_tokenizer  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
PROMPT = [1, 33, 31, 17, 30, 99, 4, 75, 4]
SERVER_ARGS = {"skip_server_warmup": True, "disable_cuda_graph": True, "random_seed": 0,
               "dtype": "bfloat16"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sglang_model")
    build_model(0, dtype=torch.bfloat16, num_layers=2, hidden=256).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def new_weights(device: str) -> list[tuple[str, torch.Tensor]]:
    model = build_model(1, dtype=torch.bfloat16, num_layers=2, hidden=256).to(device)
    return [(n, t.detach()) for n, t in model.state_dict().items()]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: trainer and server")
def test_broadcast_into_a_sglang_server_over_nccl(model_dir, tmp_path):
    torch.cuda.set_device(0)
    cfg = RolloutConfig(backend="sglang", num_servers=1, base_gpu_id=1, use_router=False,
                        base_port=0, mem_fraction_static=0.3, health_timeout_s=600,
                        server_args=SERVER_ARGS)
    with RolloutServers(cfg, model_path=str(model_dir), log_dir=tmp_path) as servers:
        with RolloutClient.from_config(cfg, servers.generate_urls) as client:
            before = client.generate(PROMPT, GREEDY)
            sync = BroadcastWeightSync.from_config(SyncConfig(verify=True, bucket_mb=1),
                                                   servers.server_urls, backend="nccl")
            sync.connect()
            stats = sync.update(iter(new_weights("cuda:0")), version="1")
            sync.close()
            after = client.generate(PROMPT, GREEDY)
    assert stats.verified and stats.num_buckets > 1
    assert after.weight_version == "1" and after.token_ids != before.token_ids


def test_colocated_release_and_update_from_cuda_handles(model_dir, tmp_path):
    torch.cuda.set_device(0)
    cfg = RolloutConfig(backend="sglang", mode="colocated", num_servers=1, base_gpu_id=0,
                        use_router=False, base_port=0, mem_fraction_static=0.3,
                        health_timeout_s=600, server_args=SERVER_ARGS)
    with RolloutServers(cfg, model_path=str(model_dir), log_dir=tmp_path) as servers:
        sync = ColocatedWeightSync.from_config(SyncConfig(transport="colocated", bucket_mb=1),
                                               servers.server_urls[0])
        sync.connect()
        free_before = torch.cuda.mem_get_info()[0]
        sync.release_memory()
        assert torch.cuda.mem_get_info()[0] > free_before  # the server gave memory back
        weights = new_weights("cuda:0")
        fingerprints = Fingerprints()
        for name, tensor in weights:
            fingerprints.add(name, tensor)
        sync.update(iter(weights), version="2")
        verify_servers(sync.admin, sync.admin.server_info(), fingerprints)
        with RolloutClient.from_config(cfg, servers.generate_urls) as client:
            assert client.generate(PROMPT, GREEDY).weight_version == "2"
        sync.close()
