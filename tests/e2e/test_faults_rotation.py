"""Taking servers out of rotation and back, against in-process fake servers and a fake
sglang-router that speaks 0.3.2's worker API (`GET /workers`, `DELETE /workers/{id}`,
`POST /workers`; changes apply in the background, so megarl polls until they show). The real
router and real restarts are exercised by `test_faults.py`."""

from __future__ import annotations

from aiohttp import web

from megarl.config import RolloutConfig
from megarl.rollout.servers import RolloutServers
from tests.fixtures.fake_server import FakeServer


class Health:
    """A /health handler whose answer the test switches."""

    def __init__(self) -> None:
        self.ok = True

    async def __call__(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ok else 503, text="ok" if self.ok else "sick")


def test_without_a_router_a_failed_server_leaves_generate_urls_until_returned():
    health = Health()
    with FakeServer({"/health": health}) as a, FakeServer({"/health": Health()}) as b:
        servers = RolloutServers(RolloutConfig(server_urls=[a.url, b.url], use_router=False))
        assert servers.check() == {}
        health.ok = False
        assert list(servers.check()) == [a.url]
        assert servers.generate_urls == [b.url]
        assert servers.ready_to_return() == []   # started elsewhere and still unhealthy
        health.ok = True
        assert servers.ready_to_return() == [a.url]
        assert servers.generate_urls == [b.url]  # not before the caller has synced it
        servers.return_to_rotation([a.url])
        assert servers.generate_urls == [a.url, b.url] and servers.in_rotation == [a.url, b.url]


class FakeRouter:
    """The worker registry of sglang-router 0.3.2, applying each change one poll later."""

    def __init__(self, urls: list[str]) -> None:
        self.workers = {f"00000000-0000-0000-0000-00000000000{i}": url
                        for i, url in enumerate(urls)}
        self.pending: list = []

    async def workers_route(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            url = (await request.json())["url"]
            self.pending.append(lambda: self.workers.setdefault(f"{len(self.workers):036d}", url))
            return web.json_response({"status": "accepted"}, status=202)
        for change in self.pending:   # what was queued becomes visible now
            change()
        self.pending = []
        return web.json_response({"workers": [
            {"id": wid, "url": url, "is_healthy": True} for wid, url in self.workers.items()]})

    def delete_route(self, wid: str):
        async def delete(request: web.Request) -> web.Response:
            assert request.method == "DELETE"
            self.pending.append(lambda: self.workers.pop(wid))
            return web.json_response({"status": "accepted"}, status=202)
        return delete


def test_with_a_router_a_failed_server_is_removed_from_it_and_added_back():
    health = Health()
    with FakeServer({"/health": health}) as a, FakeServer({"/health": Health()}) as b:
        fake = FakeRouter([a.url, b.url])
        routes = {"/workers": fake.workers_route, "/health": Health()}
        routes |= {f"/workers/{wid}": fake.delete_route(wid) for wid in fake.workers}
        with FakeServer(routes) as router:
            cfg = RolloutConfig(server_urls=[a.url, b.url], router_url=router.url)
            servers = RolloutServers(cfg)
            health.ok = False
            servers.check()
            assert list(fake.workers.values()) == [b.url]   # the removal was waited for
            assert servers.generate_urls == [router.url]
            health.ok = True
            servers.return_to_rotation(servers.ready_to_return())
            assert sorted(fake.workers.values()) == sorted([a.url, b.url])
            assert ("/workers", {"url": a.url}) in router.calls
