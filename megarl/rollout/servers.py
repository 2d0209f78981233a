"""Start, connect to, watch and stop the generation servers and the router in front of them.

Two ways to get servers (`RolloutConfig`):
* `server_urls` empty: megarl starts `num_servers` servers itself, SGLang
  (`python -m sglang.launch_server`, rollout.backend=sglang) or the CPU dev server
  (`python -m megarl.rollout.dev_server`, rollout.backend=dev), server i on port base_port + i
  and, for SGLang, GPUs base_gpu_id + i * server_tp onwards; and, with use_router, an
  sglang-router (`python -m sglang_router.launch_router`) in front of them.
* `server_urls` set: servers (and optionally a router, `router_url`) were started elsewhere,
  e.g. on other nodes of a multi-node job; megarl waits for them and never stops them.

Every process megarl starts runs in its own process group with its output in a log file, and
is stopped by terminating the whole group, then killing it after a grace period. Start-up waits
for /health (and, for the router, for all workers to be healthy) with one deadline; a process
that exits, or a server that is not healthy by the deadline, fails with the server, the reason
and the tail of its log.

During a run (`check`, `ready_to_return`, `return_to_rotation`): a server that fails its health
check is taken out of rotation (removed from the router with sglang-router's worker API,
`DELETE /workers/{id}`, or dropped from `generate_urls` without a router) and, when megarl
started it, restarted on the same port. It serves again only after the caller has sent it the
current weights and calls `return_to_rotation` (`POST /workers`): until then the router cannot
route to it, though its health checks would find it up again.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

_POLL_S = 0.25
_ROUTER_TIMEOUT_S = 30.0
_MAX_FAILED_RESTARTS = 3
_live: "set[ManagedProcess]" = set()


class ServerStartupError(RuntimeError):
    """A server or the router did not come up: names it, says why, and quotes its log."""


def flags_from_dict(args: dict[str, Any]) -> list[str]:
    """{name: value} -> CLI flags: --name-with-dashes value; True -> bare flag; False/None -> none;
    lists -> --name a b."""
    out: list[str] = []
    for name, value in args.items():
        flag = "--" + str(name).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def sglang_server_command(*, model_path: str, host: str, port: int, tp_size: int,
                          mem_fraction_static: float, base_gpu_id: int,
                          enable_memory_saver: bool = False,
                          extra: Optional[dict[str, Any]] = None) -> list[str]:
    """`python -m sglang.launch_server ...` (flag names checked against the pinned SGLang)."""
    args = {"model_path": model_path, "host": host, "port": port, "tp_size": tp_size,
            "mem_fraction_static": mem_fraction_static, "base_gpu_id": base_gpu_id,
            "enable_memory_saver": enable_memory_saver, **(extra or {})}
    return [sys.executable, "-m", "sglang.launch_server", *flags_from_dict(args)]


def dev_server_command(*, model_path: str, host: str, port: int,
                       extra: Optional[dict[str, Any]] = None) -> list[str]:
    args = {"model_path": model_path, "host": host, "port": port, **(extra or {})}
    return [sys.executable, "-m", "megarl.rollout.dev_server", *flags_from_dict(args)]


def router_command(*, worker_urls: Sequence[str], host: str, port: int, policy: str,
                   request_timeout_s: float, extra: Optional[dict[str, Any]] = None) -> list[str]:
    args = {"host": host, "port": port, "worker_urls": list(worker_urls), "policy": policy,
            "request_timeout_secs": int(request_timeout_s), "log_level": "warn",
            # The router's metrics exporter defaults to port 29000: a second router on the
            # same host (another job, a test) would fail to start.
            "prometheus_port": free_port(), **(extra or {})}
    return [sys.executable, "-m", "sglang_router.launch_router", *flags_from_dict(args)]


_TRAINER_DIST_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_WORLD_SIZE", "ROLE_NAME"}


def importable_env() -> dict[str, str]:
    """This environment, with megarl importable by a child started from any directory."""
    root = str(Path(__file__).resolve().parents[2])
    # A server started by trainer rank 0 must not see the trainer job's torch.distributed
    # settings (torchrun's agent store, ranks, master address): it is not one of its ranks.
    env = {k: v for k, v in os.environ.items()
           if k not in _TRAINER_DIST_VARS and not k.startswith("TORCHELASTIC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class ManagedProcess:
    """A child process in its own process group, with its output in `log_path`."""

    name: str
    cmd: list[str]
    log_path: Path
    env: Optional[dict[str, str]] = None
    popen: Optional[subprocess.Popen] = field(default=None, repr=False)

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Stopped by the kernel if this process dies without stopping it (parent_guard).
            guarded = [sys.executable, "-m", "megarl.rollout.parent_guard", str(os.getpid()),
                       *self.cmd]
            self.popen = subprocess.Popen(guarded, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=self.env if self.env is not None
                                          else importable_env())
        _live.add(self)
        logger.info("started %s (pid %d): %s; log %s", self.name, self.popen.pid,
                    " ".join(self.cmd), self.log_path)
        return self

    @property
    def pid(self) -> Optional[int]:
        return None if self.popen is None else self.popen.pid

    def exit_code(self) -> Optional[int]:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; idempotent."""
        _live.discard(self)
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", self.name, grace_s)
        # children may outlive the leader (SGLang's schedulers): kill what is left of the group
        self._signal(signal.SIGKILL)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) survived SIGKILL", self.name, self.popen.pid)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_live):
        proc.stop(grace_s=5.0)


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """A plain GET for health checks (no event loop needed). Raises OSError when unreachable."""
    return http_request("GET", url, timeout_s=timeout_s)


def http_request(method: str, url: str, body: Any = None,
                 timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, text) of one HTTP call with an optional JSON body; OSError when unreachable."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_healthy(url: str, *, deadline: float, process: Optional[ManagedProcess] = None,
                 path: str = "/health", ready: Optional[Callable[[str], bool]] = None,
                 what: str = "server") -> None:
    """Poll `url + path` until it answers 200 (and `ready(body)` holds) or fail by `deadline`
    (a time.monotonic() value) or as soon as `process` exits."""
    last = "no answer yet"
    start = time.monotonic()
    while True:
        if process is not None and process.exit_code() is not None:
            raise ServerStartupError(
                f"{what} {url} exited with code {process.exit_code()} before becoming healthy; "
                f"log {process.log_path}:\n{process.log_tail()}")
        try:
            wait_s = min(5.0, max(0.5, deadline - time.monotonic()))
            status, body = http_get(url + path, timeout_s=wait_s)
            if status == 200 and (ready is None or ready(body)):
                return
            last = f"HTTP {status} {body[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            tail = f"; log {process.log_path}:\n{process.log_tail()}" if process else ""
            raise ServerStartupError(
                f"{what} {url} did not become healthy within {time.monotonic() - start:.0f} s "
                f"(last answer: {last}){tail}")
        time.sleep(_POLL_S)


def _router_ready(expected: int) -> Callable[[str], bool]:
    def ready(body: str) -> bool:
        try:
            return int(json.loads(body).get("healthy_workers", 0)) >= expected
        except (ValueError, AttributeError):
            return False
    return ready


class RolloutServers:
    """The servers (and router) of one run, from a `RolloutConfig`; a context manager.

    `server_urls` are the servers themselves (weight updates and control calls go there);
    `generate_urls` is where generation requests go: the router, or the servers when there is
    no router.
    """

    def __init__(self, rollout: Any, *, model_path: Optional[str] = None,
                 log_dir: Optional[str | Path] = None) -> None:
        self.cfg = rollout
        self.model_path = model_path
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="megarl-servers-"))
        self.servers: list[ManagedProcess] = []
        self.router: Optional[ManagedProcess] = None
        self.server_urls: list[str] = [u.rstrip("/") for u in rollout.server_urls]
        self.router_url: Optional[str] = (rollout.router_url.rstrip("/") if rollout.router_url
                                          else None)
        self.out_of_rotation: dict[str, float] = {}
        """Servers taken out of rotation -> when a restarted one must be healthy (monotonic)."""
        self.num_restarts = 0
        self._failed_restarts: dict[str, int] = {}

    @property
    def generate_urls(self) -> list[str]:
        """Where generation requests go: the router, or the servers in rotation (all of them
        when none is: the client then fails on them with a clear error)."""
        if self.router_url:
            return [self.router_url]
        return self.in_rotation or list(self.server_urls)

    @property
    def in_rotation(self) -> list[str]:
        return [u for u in self.server_urls if u not in self.out_of_rotation]

    def __enter__(self) -> "RolloutServers":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "RolloutServers":
        """Start (or connect to) the servers and the router and wait until they are healthy."""
        deadline = time.monotonic() + self.cfg.health_timeout_s
        try:
            if not self.server_urls:
                self._launch_servers()
            for i, url in enumerate(self.server_urls):
                proc = self.servers[i] if self.servers else None
                wait_healthy(url, deadline=deadline, process=proc, what=f"server {i}")
            if self.cfg.use_router:
                if self.router_url is None:
                    self._launch_router()
                wait_healthy(self.router_url, deadline=deadline, process=self.router,
                             path="/readiness" if self.router else "/health",
                             ready=_router_ready(len(self.server_urls)) if self.router else None,
                             what="router")
        except BaseException:
            self.stop()
            raise
        logger.info("rollout servers ready: %s%s", ", ".join(self.server_urls),
                    f" behind router {self.router_url}" if self.router_url else "")
        return self

    def _launch_servers(self) -> None:
        cfg = self.cfg
        if not self.model_path:
            raise ServerStartupError("starting servers needs a model path (model.hf_path)")
        for i in range(cfg.num_servers):
            port = free_port(cfg.host) if cfg.base_port == 0 else cfg.base_port + i
            if cfg.backend == "dev":
                cmd = dev_server_command(model_path=self.model_path, host=cfg.host, port=port,
                                         extra=cfg.server_args)
            else:
                cmd = sglang_server_command(
                    model_path=self.model_path, host=cfg.host, port=port, tp_size=cfg.server_tp,
                    mem_fraction_static=cfg.mem_fraction_static,
                    base_gpu_id=cfg.base_gpu_id + i * cfg.server_tp,
                    enable_memory_saver=cfg.mode == "colocated", extra=cfg.server_args)
            proc = ManagedProcess(f"{cfg.backend} server {i}", cmd,
                                  self.log_dir / f"server_{i}.log")
            self.servers.append(proc.start())
            self.server_urls.append(f"http://{_url_host(cfg.host)}:{port}")

    def _launch_router(self) -> None:
        cfg = self.cfg
        port = free_port(cfg.host) if cfg.router_port == 0 else cfg.router_port
        cmd = router_command(worker_urls=self.server_urls, host=cfg.host, port=port,
                             policy=cfg.router_policy, request_timeout_s=cfg.request_timeout_s,
                             extra=cfg.router_args)
        self.router = ManagedProcess("sglang-router", cmd, self.log_dir / "router.log").start()
        self.router_url = f"http://{_url_host(cfg.host)}:{port}"

    def _process_of(self, url: str) -> Optional[ManagedProcess]:
        return self.servers[self.server_urls.index(url)] if self.servers else None

    def health(self, urls: Optional[Sequence[str]] = None) -> dict[str, str]:
        """'ok' or what is wrong, per server URL (exit codes of servers megarl started)."""
        report = {}
        for url in self.server_urls if urls is None else urls:
            proc = self._process_of(url)
            if proc is not None and proc.exit_code() is not None:
                report[url] = f"exited with code {proc.exit_code()} (log {proc.log_path})"
                continue
            try:
                status, body = http_get(url + "/health", timeout_s=5.0)
                report[url] = "ok" if status == 200 else f"unhealthy: HTTP {status} {body[:100]!r}"
            except OSError as exc:
                report[url] = f"unreachable: {exc}"
        return report

    def report_unhealthy(self) -> dict[str, str]:
        """Log and return the servers that are not healthy (call after a rollout: the router
        retries requests of a failed server on the others without telling the client)."""
        problems = {url: state for url, state in self.health().items() if state != "ok"}
        for url, state in problems.items():
            logger.warning("rollout server %s is down: %s; its requests went to the others",
                           url, state)
        return problems

    # --- rotation: failed servers out, restarted, back once they hold the current weights ----

    def check(self) -> dict[str, str]:
        """Take every server in rotation that is not healthy out of rotation (router first) and
        restart it when megarl started it; returns {url: what was wrong} of those."""
        problems = {url: state for url, state in self.health(self.in_rotation).items()
                    if state != "ok"}
        for url, state in problems.items():
            logger.warning("rollout server %s is down: %s; taking it out of rotation", url, state)
            self._remove_from_router(url)
            self.out_of_rotation[url] = 0.0
            self._restart(url)
        return problems

    def _restart(self, url: str) -> None:
        proc = self._process_of(url)
        if proc is None:  # started elsewhere: it returns when it is healthy again
            return
        proc.stop(grace_s=5.0)
        proc.start()
        self.num_restarts += 1
        self.out_of_rotation[url] = time.monotonic() + self.cfg.health_timeout_s
        logger.warning("restarted %s at %s (log %s)", proc.name, url, proc.log_path)

    def ready_to_return(self) -> list[str]:
        """Servers out of rotation that are healthy again; restarted ones are waited for until
        their deadline (rollout.health_timeout_s after the restart). One that is not up by then
        is restarted again, at most 3 times in a row; after that it stays out."""
        ready = []
        for url, deadline in list(self.out_of_rotation.items()):
            proc = self._process_of(url)
            if proc is None:
                if self.health([url])[url] == "ok":
                    ready.append(url)
                continue
            if self._failed_restarts.get(url, 0) >= _MAX_FAILED_RESTARTS:
                continue
            try:
                wait_healthy(url, deadline=deadline, process=proc, what=f"restarted {proc.name}")
                ready.append(url)
            except ServerStartupError as exc:
                self._failed_restarts[url] = self._failed_restarts.get(url, 0) + 1
                logger.error("%s", exc)
                if self._failed_restarts[url] < _MAX_FAILED_RESTARTS:
                    self._restart(url)
                else:
                    logger.error("giving up on %s after %d failed restarts", url,
                                 _MAX_FAILED_RESTARTS)
        return ready

    def return_to_rotation(self, urls: Sequence[str]) -> None:
        """Serve from these servers again (call once they hold the current weights)."""
        for url in urls:
            self._add_to_router(url)
            self.out_of_rotation.pop(url, None)
            self._failed_restarts.pop(url, None)
            logger.info("rollout server %s is back in rotation", url)

    def router_workers(self) -> dict[str, dict]:
        """The router's workers by URL (sglang-router's `GET /workers`)."""
        status, body = http_get(self.router_url + "/workers", timeout_s=10.0)
        if status != 200:
            raise OSError(f"GET {self.router_url}/workers: HTTP {status} {body[:200]!r}")
        return {w["url"].rstrip("/"): w for w in json.loads(body)["workers"]}

    def _remove_from_router(self, url: str) -> None:
        if not self.router_url:
            return
        try:
            worker = self.router_workers().get(url)
            if worker is not None:
                http_request("DELETE", f"{self.router_url}/workers/{worker['id']}")
            self._wait_router(lambda workers: url not in workers)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("could not remove %s from the router %s (%s): it may still route "
                         "requests there", url, self.router_url, exc)

    def _add_to_router(self, url: str) -> None:
        if not self.router_url:
            return
        try:
            status, body = http_request("POST", self.router_url + "/workers", {"url": url})
            if status >= 300:
                raise OSError(f"HTTP {status} {body[:200]!r}")
            self._wait_router(lambda workers: workers.get(url, {}).get("is_healthy", False))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("could not add %s back to the router %s (%s): it will get no "
                         "requests", url, self.router_url, exc)

    def _wait_router(self, done: Callable[[dict], bool]) -> None:
        """The router applies worker changes in the background: poll until `done(workers)`."""
        deadline = time.monotonic() + _ROUTER_TIMEOUT_S
        while not done(self.router_workers()):
            if time.monotonic() > deadline:
                raise OSError(f"the router did not apply the change within {_ROUTER_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop what megarl started (router first); servers started elsewhere are left alone."""
        if self.router is not None:
            self.router.stop()
        for proc in self.servers:
            proc.stop()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
