"""/status of a real proxy process through an admin drain: the deadlines while draining, and none
once the drain is over (a drained proxy has no drain.timeout to come); the drain record stays."""

from __future__ import annotations

import asyncio

from tests.conftest import StartProxy
from tests.proxy_support import AppRequest, RawApp, RawClient, response_bytes


async def test_status_deadlines_through_an_admin_drain(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    release = asyncio.Event()

    @raw_app.route(b"/slow")
    async def slow(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(response_bytes(200, b"slow"))
        return False

    proxy = await start_proxy(
        raw_app.port, {"drain": {"propagation": "0s", "min": "0s", "timeout": "20s"}}
    )
    client = await RawClient.connect(proxy.port)
    try:
        slow_request = asyncio.ensure_future(client.request(b"GET", b"/slow"))
        await raw_app.received(b"/slow")
        admin = await RawClient.connect(int(proxy.admin_url.rpartition(":")[2]))
        try:
            assert (await admin.request(b"POST", b"/drain")).status == 202
        finally:
            await admin.close()
        await proxy.log.wait(r"phase propagating -> draining")
        draining = await proxy.status()
        assert draining["phase"] == "draining"
        assert draining["in_flight"] == 1
        deadlines = draining["deadlines"]
        assert 0 < deadlines["drain_timeout_in"] <= 20
        assert deadlines["phase_ends_in"] == deadlines["drain_timeout_in"]
        assert deadlines["drain_min_in"] is None  # drain.min 0 s: passed on entry
        release.set()
        assert (await slow_request).status == 200
    finally:
        await client.close()
    await proxy.log.wait(r"phase stopping_app -> drained")
    drained = await proxy.status()
    assert drained["phase"] == "drained"
    assert drained["deadlines"] == {
        "phase_ends_in": None,
        "drain_min_in": None,
        "drain_timeout_in": None,
    }
    assert drained["drain"]["sources"] == ["admin"]
    assert drained["drain"]["forced"] is False
