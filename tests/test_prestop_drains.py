"""preStop more than once (issue 12 item 4): Kubernetes runs the app container's preStop hook on
every container kill (liveness restarts too) and may deliver a hook twice. Each drain releases
only its own `GET /prestop` calls, when its own app stop is due. Real proxy process, real app
(told to stop over HTTP, which it counts); a release is checked against that count at the
moment it arrives."""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import StartApp, StartProxy
from tests.support import ProxyProcess


class StoppableApp:
    """An app told to stop by `app.stop: http` (POST /quit), which it counts and survives: a
    preStop call returning before its drain's stop sees a count too low."""

    def __init__(self) -> None:
        self.stops = 0

    def application(self) -> web.Application:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        async def quit_(request: web.Request) -> web.Response:
            self.stops += 1
            return web.Response(text="stopping")

        app = web.Application()
        app.router.add_get("/", hello)
        app.router.add_post("/quit", quit_)
        return app


async def start(
    start_app: StartApp, start_proxy: StartProxy, stop_timeout: str
) -> tuple[StoppableApp, ProxyProcess]:
    """The app stays up after its stop, so a recovery lasts ``stop_timeout``."""
    app = StoppableApp()
    port = await start_app(app.application())
    overrides: dict[str, Any] = {
        "drain": {"propagation": "300ms"},
        "app": {
            "stop": "http",
            "url": f"http://127.0.0.1:{port}/quit",
            "stop_timeout": stop_timeout,
        },
        "termination_grace_period": "60s",
    }
    return app, await start_proxy(port, overrides)


async def prestop(session: aiohttp.ClientSession, proxy: ProxyProcess, app: StoppableApp) -> int:
    """GET /prestop as the kubelet's httpGet hook; how many app stops were made when it returned."""
    async with session.get(proxy.admin_url + "/prestop") as response:
        assert response.status == 200
    return app.stops


async def test_prestop_while_recovering_waits_for_the_new_drain(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    app, proxy = await start(start_app, start_proxy, "30s")
    async with aiohttp.ClientSession() as session:
        assert await prestop(session, proxy, app) == 1
        await proxy.log.wait(r"phase stopping_app -> recovering")
        # The hook again (a second kill, or a repeated delivery) while waiting for the app.
        assert await prestop(session, proxy, app) == 2, "released before its drain's app stop"
        assert len(re.findall(r"phase recovering -> propagating", proxy.log.text())) == 1
    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0


async def test_prestop_after_sigterm_while_recovering_waits_for_that_drain(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    """The pod is deleted during a recovery: SIGTERM starts drain 2, then the app's preStop."""
    app, proxy = await start(start_app, start_proxy, "30s")
    async with aiohttp.ClientSession() as session:
        assert await prestop(session, proxy, app) == 1
        await proxy.log.wait(r"phase stopping_app -> recovering")
        proxy.send(signal.SIGTERM)
        await proxy.log.wait(r"phase recovering -> propagating")
        assert await prestop(session, proxy, app) == 2
    assert await proxy.exited() == 0


async def test_prestop_in_a_later_drain_and_twice_in_one(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    """Recovered, then killed again: the second drain's calls (two of them, a repeated
    delivery) are released by the second drain's app stop, together."""
    app, proxy = await start(start_app, start_proxy, "200ms")
    async with aiohttp.ClientSession() as session:
        assert await prestop(session, proxy, app) == 1
        await proxy.log.wait(r"phase recovering -> serving")
        calls = [prestop(session, proxy, app), prestop(session, proxy, app)]
        assert await asyncio.gather(*calls) == [2, 2]
    assert proxy.proc.poll() is None, "liveness restarts never stop drainproxy"
