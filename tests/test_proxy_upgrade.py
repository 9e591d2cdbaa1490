"""Upgrade: after the app's 101, bytes are tunnelled both ways until either side closes."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import StartApp, StartProxy
from tests.proxy_support import AppRequest, RawApp, parse_responses


async def test_websocket_through_the_proxy(start_app: StartApp, start_proxy: StartProxy) -> None:
    closed_by_client = asyncio.Event()

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo " + message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        closed_by_client.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    proxy = await start_proxy(await start_app(app))
    big = bytes(range(256)) * 4096
    async with aiohttp.ClientSession() as session, session.ws_connect(proxy.url + "/ws") as ws:
        for index in range(3):
            await ws.send_str(f"hello {index}")
            assert await ws.receive_str(timeout=10) == f"echo hello {index}"
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=10) == big[::-1]
        await ws.close()
    await asyncio.wait_for(closed_by_client.wait(), 10)
    assert "drainproxy_tunnels_opened_total 1.0" in await proxy.metrics_text()


async def test_raw_tunnel_carries_early_bytes_and_ends_on_either_close(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    @raw_app.route(b"/tunnel")
    async def tunnel(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        assert request.header(b"upgrade") == [b"echo/1"]
        assert request.header(b"connection") == [b"upgrade"]
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo/1\r\nConnection: Upgrade\r\n\r\n"
            b"hello from the app;"
        )
        while data := await request.reader.read(65536):
            writer.write(data.upper())
        return False

    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /tunnel HTTP/1.1\r\nHost: h\r\nUpgrade: echo/1\r\nConnection: Upgrade\r\n\r\n"
        b"early bytes;"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nUpgrade: echo/1\r\n" in head
    assert b"\r\nConnection: upgrade\r\n" in head
    assert await reader.readexactly(len(b"hello from the app;")) == b"hello from the app;"
    assert await reader.readexactly(len(b"early bytes;")) == b"EARLY BYTES;"
    writer.write(b"more")
    assert await reader.readexactly(4) == b"MORE"
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await raw_app.wait_for(lambda: raw_app.open_connections == 0)


async def test_upgrade_declined_by_the_app_is_a_plain_response(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /no-upgrade HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    (response,) = parse_responses(raw, [b"GET"])
    assert (response.status, response.body) == (200, b"/no-upgrade")
    assert response.header(b"connection") == [b"close"]


async def test_upgrade_split_over_fields_goes_on_as_one_list(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """RFC 9110 §5.3 and §7.8: several Upgrade fields are one list, in order; the app is offered
    every protocol (not only the last field's), and the client told every layer of a 101."""

    @raw_app.route(b"/layers")
    async def layers(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo/1\r\nUpgrade: layer/2\r\n"
            b"Connection: Upgrade\r\n\r\n"
        )
        while data := await request.reader.read(65536):
            writer.write(data.upper())
        return False

    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /layers HTTP/1.1\r\nHost: h\r\nUpgrade: echo/1\r\nConnection: Upgrade\r\n"
        b"upgrade: layer/2\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert head.count(b"pgrade: ") == 1
    assert b"\r\nUpgrade: echo/1, layer/2\r\n" in head
    writer.write(b"tunnelled")
    assert await reader.readexactly(9) == b"TUNNELLED"
    writer.close()
    (request,) = (request for request in raw_app.requests if request.path == b"/layers")
    assert request.header(b"upgrade") == [b"echo/1, layer/2"]


async def test_h2c_in_an_upgrade_list_never_reaches_the_app(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """RFC 9113 §3.1: h2c is answered as HTTP/1.1, also beside another protocol; the app is
    offered the rest, and here declines it."""
    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /offered HTTP/1.1\r\nHost: h\r\nUpgrade: h2c, websocket\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    (response,) = parse_responses(raw, [b"GET"])
    assert (response.status, response.body) == (200, b"/offered")
    (request,) = [r for r in raw_app.requests if r.path == b"/offered"]
    assert request.header(b"upgrade") == [b"websocket"]
    assert request.header(b"http2-settings") == []


@pytest.mark.parametrize(
    ("upgrade", "switched_to"),
    [
        (b"h2c", b"h2c"),  # h2c is never offered: the app got no Upgrade at all
        (b"H2C", b"websocket"),
        (b"h2c, websocket", b"h2c"),  # websocket was offered, h2c was not
        (b"websocket", b"other/1"),
    ],
)
async def test_a_101_to_a_protocol_not_offered_is_502(
    raw_app: RawApp, start_proxy: StartProxy, upgrade: bytes, switched_to: bytes
) -> None:
    """RFC 9110 §7.8 and the brief: a 101 switching to what the app was not offered is a
    malformed response (502), and its bytes never reach the client as a tunnel."""

    @raw_app.route(b"/switch")
    async def switch(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n"
            b"APP BYTES" % switched_to
        )
        await request.reader.read()
        return False

    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /switch HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n" % upgrade
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    (response,) = parse_responses(raw, [b"GET"])
    assert response.status == 502
    assert b"APP BYTES" not in raw
