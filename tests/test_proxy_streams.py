"""Bodies far larger than the proxy may hold stream through with bounded memory, and a client
that goes away mid-exchange takes its app connection with it. The app connections are not
pooled here (max_idle_connections: 0), so every one open at the app belongs to an exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.proxy_support import (
    AppRequest,
    RawApp,
    add_streaming_routes,
    proc_status_kib,
)
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

Writer = asyncio.StreamWriter
MiB = 1 << 20
#: Far more than the proxy may hold; small enough for two cores (a GiB works, just slower).
BIG = 256 * MiB
BLOCK = b"x" * MiB
#: Loose: socket and parser buffers, never the body.
MEMORY_GROWTH_LIMIT_KIB = 48 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[RawApp]:
    raw_app = RawApp()

    add_streaming_routes(raw_app)

    await raw_app.start()
    yield raw_app
    await raw_app.stop()


@pytest.fixture(scope="module")
def proxy_overrides() -> dict[str, Any]:
    return {"upstream": {"max_idle_connections": 0}}


async def send_blocks(writer: Writer, size: int, *, chunked: bool = False) -> None:
    for _ in range(size // MiB):
        if chunked:
            writer.write(b"100000\r\n")
        writer.write(BLOCK)
        if chunked:
            writer.write(b"\r\n")
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")


async def test_large_bodies_stream_both_ways_in_bounded_memory(
    app: RawApp, proxy: ProxyProcess
) -> None:
    pid = proxy.proc.pid
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n")
    await reader.readuntil(b"/warm")
    baseline = proc_status_kib(pid, "VmRSS")

    writer.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % BIG)
    await send_blocks(writer, BIG)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await reader.readexactly(len(b"%d" % BIG)) == b"%d" % BIG

    writer.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    await send_blocks(writer, BIG // 4, chunked=True)
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert await reader.readexactly(len(b"%d" % (BIG // 4))) == b"%d" % (BIG // 4)

    writer.write(b"GET /download?%d HTTP/1.1\r\nHost: h\r\n\r\n" % BIG)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert b"\r\nContent-Length: %d\r\n" % BIG in head
    received = 0
    while received < BIG:
        data = await asyncio.wait_for(reader.read(4 * MiB), 60)
        assert data
        received += len(data)
    assert received == BIG
    writer.close()

    growth = proc_status_kib(pid, "VmHWM") - baseline
    assert growth < MEMORY_GROWTH_LIMIT_KIB, f"peak RSS grew {growth} KiB moving {BIG} bytes"


async def test_a_slow_reader_holds_the_app_back(app: RawApp, proxy: ProxyProcess) -> None:
    """Back-pressure: while the client reads nothing, the app cannot write far ahead."""
    written = 0
    stalled = asyncio.Event()

    @app.route(b"/firehose")
    async def firehose(request: AppRequest, writer: Writer) -> bool:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        for _ in range(BIG // MiB):
            writer.write(BLOCK)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                stalled.set()
                await writer.drain()
            written += MiB
        return True

    pid = proxy.proc.pid
    baseline = proc_status_kib(pid, "VmRSS")
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /firehose HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.wait_for(stalled.wait(), 30)
    assert written < 64 * MiB  # kernel buffers on two sockets, not the body
    assert proc_status_kib(pid, "VmRSS") - baseline < MEMORY_GROWTH_LIMIT_KIB
    writer.close()
    await app.wait_for(lambda: app.open_connections == 0)


async def test_client_abort_mid_upload_aborts_the_app_request(
    app: RawApp, proxy: ProxyProcess
) -> None:
    outcome: list[str] = []

    @app.route(b"/upload-abort")
    async def upload_abort(request: AppRequest, writer: Writer) -> bool:
        try:
            await request.read_body(keep=False)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            outcome.append(type(exc).__name__)
            return False
        outcome.append("complete")
        return False

    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /upload-abort HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % BIG)
    await send_blocks(writer, MiB)
    await app.received(b"/upload-abort")
    writer.close()
    await app.wait_for(lambda: bool(outcome) and app.open_connections == 0)
    assert outcome == ["IncompleteReadError"]
    await proxy.log.wait(r"client 127\.0\.0\.1 closed the connection during POST /upload-abort")
    assert (await proxy.status())["in_flight"] == 0


async def test_client_abort_while_waiting_reaches_the_app(app: RawApp, proxy: ProxyProcess) -> None:
    saw_close = asyncio.Event()

    @app.route(b"/wait-abort")
    async def wait_abort(request: AppRequest, writer: Writer) -> bool:
        if await request.reader.read() == b"":
            saw_close.set()
        return False

    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /wait-abort HTTP/1.1\r\nHost: h\r\n\r\n")
    await app.received(b"/wait-abort")
    writer.close()
    await asyncio.wait_for(saw_close.wait(), 10)
    await app.wait_for(lambda: app.open_connections == 0)


async def test_client_abort_mid_download_stops_the_app(app: RawApp, proxy: ProxyProcess) -> None:
    outcome: list[str] = []

    @app.route(b"/download-abort")
    async def download_abort(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4096 * MiB))
        try:
            for _ in range(4096):
                writer.write(BLOCK)
                await writer.drain()
        except ConnectionError as exc:
            outcome.append(type(exc).__name__)
            return False
        outcome.append("complete")
        return False

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /download-abort HTTP/1.1\r\nHost: h\r\n\r\n")
    await reader.readexactly(MiB)
    writer.close()
    await app.wait_for(lambda: bool(outcome) and app.open_connections == 0, timeout=30)
    assert outcome != ["complete"]
    assert (await proxy.status())["open_connections"] == 0
