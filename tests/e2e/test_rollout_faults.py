"""A server that dies in the middle of a rollout: its requests finish on the other server, with
or without the router in front, and the dead server is reported."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from megarl.config import RolloutConfig
from megarl.rollout.client import RolloutClient
from megarl.rollout.protocol import SamplingParams
from megarl.rollout.servers import RolloutServers, http_get
from tests.fixtures.tiny_model import build_tiny_model

LONG = SamplingParams(temperature=1.0, max_new_tokens=80, stop_token_ids=())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("faults") / "model")


def kill_when_busy(servers: RolloutServers, index: int, killed: list) -> threading.Thread:
    """SIGKILL server `index` (its whole process group) once it is generating."""
    import json

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, body = http_get(servers.server_urls[index] + "/server_info")
            if json.loads(body)["num_requests_running"] > 0:
                os.killpg(servers.servers[index].pid, signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.01)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("use_router", [True, False], ids=["router", "no-router"])
def test_a_server_dying_mid_rollout_is_retried_on_the_other_and_reported(model_dir, tmp_path,
                                                                          use_router, caplog):
    cfg = RolloutConfig(backend="dev", num_servers=2, base_port=0, router_port=0,
                        use_router=use_router, router_policy="round_robin", health_timeout_s=120,
                        retry_backoff_s=0.1, max_retries=4,
                        server_args={"num_threads": 1, "max_batch_size": 8})
    with RolloutServers(cfg, model_path=str(model_dir), log_dir=tmp_path) as servers:
        with RolloutClient.from_config(cfg, servers.generate_urls) as client:
            killed: list = []
            killer = kill_when_busy(servers, 1, killed)
            responses = client.generate_batch([[1, 40, 41]] * 8, LONG)
            killer.join(5)
            assert killed, "the server was never busy: the test did not exercise a failure"
            assert len(responses) == 8
            assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in responses)
            if not use_router:  # our client saw the failures and retried elsewhere
                dead = servers.server_urls[1]
                assert client.stats.failures_by_server[dead] >= 1
                assert client.stats.num_retries >= 1 and client.stats.num_failed == 0
            with caplog.at_level(logging.WARNING, logger="megarl.rollout.servers"):
                problems = servers.report_unhealthy()
            assert list(problems) == [servers.server_urls[1]]
            assert "exited with code -9" in problems[servers.server_urls[1]]
            assert any("is down" in r.message for r in caplog.records)
