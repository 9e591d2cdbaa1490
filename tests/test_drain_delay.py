"""Issue 17: during ``drain.readiness_fail_delay`` the pod must still look fully in service: ready,
accepting, and keeping keep-alive connections open (no ``Connection: close``, none closed).
Real proxy process, real sockets, a real SIGTERM."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.conftest import StartApp, StartProxy
from tests.proxy_support import RawClient
from tests.support import slow_app


async def test_keep_alive_connections_stay_open_during_the_readiness_delay(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        await start_app(slow_app(asyncio.Event(), asyncio.Event())),
        {
            "drain": {"readiness_fail_delay": "30s", "propagation": "1s", "idle_grace": "0s"},
            "termination_grace_period": "60s",
        },
    )
    before = await RawClient.connect(proxy.port)
    response = await before.request()
    assert response.status == 200 and response.header(b"connection") == []

    proxy.send(signal.SIGTERM)
    await proxy.log.wait(r"phase serving -> delaying")
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.admin_url + "/ready") as ready,
    ):
        assert ready.status == 200, "still ready during the delay"

    during = await RawClient.connect(proxy.port)
    for client in (before, during, before, during):
        response = await client.request()
        assert response.status == 200
        assert response.header(b"connection") == [], "no Connection: close yet"
        assert response.body == b"fast"
    status = await proxy.status()
    assert status["phase"] == "delaying"
    assert status["open_connections"] == 2, "neither keep-alive connection was closed"
    assert status["deadlines"]["drain_min_in"] is None
    assert status["deadlines"]["drain_timeout_in"] is None
    assert 0 < status["deadlines"]["phase_ends_in"] <= 30
    await before.close()
    await during.close()
