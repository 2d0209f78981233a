"""Process management: whole process groups stopped, start-up deadlines, clear start-up errors,
health reports, and flag building."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from aiohttp import web

from megarl.config import RolloutConfig
from megarl.rollout.servers import (ManagedProcess, RolloutServers, ServerStartupError,
                                    flags_from_dict, free_port, wait_healthy)
from tests.fixtures.fake_server import FakeServer

# a leader that starts a child ignoring SIGTERM, prints both pids, and waits
STUBBORN = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(os.getpid(), child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split()[2] != "Z"


def test_stop_ends_the_whole_process_group(tmp_path):
    proc = ManagedProcess("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "p.log").start()
    deadline = time.monotonic() + 20
    while not proc.log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    leader, child = map(int, proc.log_path.read_text().split())
    assert alive(leader) and alive(child)
    proc.stop(grace_s=0.5)
    time.sleep(0.2)
    assert not alive(leader) and not alive(child)
    proc.stop()  # idempotent


def test_a_process_that_never_becomes_healthy_fails_by_the_deadline(tmp_path):
    sleeper = ManagedProcess("sleeper", [sys.executable, "-c", "print('starting', flush=True); "
                             "import time; time.sleep(60)"], tmp_path / "s.log").start()
    try:
        # On a loaded machine the interpreter may take seconds to start: the deadline under
        # test begins once the process has written its first line.
        until = time.monotonic() + 30
        while "starting" not in (tmp_path / "s.log").read_text() and time.monotonic() < until:
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(ServerStartupError) as info:
            wait_healthy(f"http://127.0.0.1:{free_port()}", deadline=start + 1.5, process=sleeper)
        assert 1.4 < time.monotonic() - start < 15
        message = str(info.value)
        assert "did not become healthy within" in message and "Connection refused" in message
        assert "starting" in message  # the log tail
    finally:
        sleeper.stop(grace_s=1)


def test_connected_servers_that_stay_unhealthy_fail_startup():
    async def unhealthy(request):
        return web.Response(status=503)

    with FakeServer({"/health": unhealthy}) as server:
        cfg = RolloutConfig(server_urls=[server.url], use_router=False, health_timeout_s=1.0)
        start = time.monotonic()
        with pytest.raises(ServerStartupError, match=r"server 0 .* did not become healthy.*HTTP 503"):
            RolloutServers(cfg).start()
        assert time.monotonic() - start < 15   # a 1 s deadline, not forever


def test_a_server_that_exits_at_startup_fails_fast_with_its_log(tmp_path):
    cfg = RolloutConfig(backend="dev", use_router=False, base_port=0, health_timeout_s=120,
                        server_args={"num_threads": 1})
    start = time.monotonic()
    with pytest.raises(ServerStartupError) as info:
        RolloutServers(cfg, model_path=str(tmp_path / "no_model"), log_dir=tmp_path).start()
    assert time.monotonic() - start < 60  # not the 120 s deadline
    message = str(info.value)
    assert "exited with code" in message and "no_model" in message
    assert str(tmp_path / "server_0.log") in message


def test_health_report_and_generate_urls():
    async def ok(request):
        return web.Response(status=200)

    dead = f"http://127.0.0.1:{free_port()}"
    with FakeServer({"/health": ok}) as server:
        servers = RolloutServers(RolloutConfig(server_urls=[server.url, dead], use_router=False))
        report = servers.health()
    assert report[server.url] == "ok" and report[dead].startswith("unreachable")
    assert servers.generate_urls == [server.url, dead]
    routed = RolloutServers(RolloutConfig(server_urls=[dead], router_url="http://r:1"))
    assert routed.generate_urls == ["http://r:1"]


def test_flags_from_dict():
    assert flags_from_dict({"tp_size": 2, "enable_memory_saver": True, "log_level": None,
                            "skip": False, "worker_urls": ["a", "b"], "json": {"k": 1}}) == [
        "--tp-size", "2", "--enable-memory-saver", "--worker-urls", "a", "b", "--json", '{"k": 1}']


def test_a_started_process_dies_with_the_process_that_started_it(tmp_path):
    """A launcher killed outright must not leave its servers holding GPUs (parent_guard)."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from megarl.rollout.servers import ManagedProcess\n"
        f"p = ManagedProcess('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'],"
        f" Path({str(tmp_path / 'child.log')!r})).start()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    launcher.kill()                      # no atexit, no cleanup: only the kernel can help
    launcher.wait()
    until = time.monotonic() + 30
    while time.monotonic() < until:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/status") as f:
            if "zombie" in f.read().lower():
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the started process outlived its launcher")
