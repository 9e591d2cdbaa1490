"""Faults at scale: idle hordes, slowloris, the connection limit and file-descriptor exhaustion
must not stop the proxy from serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest

from tests.conftest import StartProxy
from tests.proxy_support import (
    AppRequest,
    IncompleteResponse,
    RawApp,
    RawClient,
    Response,
    exchange,
    parse_responses,
    proc_status_kib,
    response_bytes,
)
from tests.support import ProxyProcess, base_config, deep_merge

REQUEST = b"GET /normal HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


async def normal_request(port: int) -> int:
    raw = await exchange(port, REQUEST)
    return parse_responses(raw, [b"GET"])[0].status


async def test_idle_hordes_and_slowloris_do_not_stop_normal_traffic(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port, {"timeouts": {"request_head": "60s"}})
    idle: list[asyncio.StreamWriter] = []
    slow: list[asyncio.StreamWriter] = []
    try:
        baseline = proc_status_kib(proxy.proc.pid, "VmRSS")
        for _ in range(1000):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            idle.append(writer)
        for index in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /slow-%d HTTP/1.1\r\nHost: h\r\n" % index)
            slow.append(writer)

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):
                    for writer in slow:
                        writer.write(b"X-Drip: 1\r\n")
                    await asyncio.sleep(0.05)  # load shape, not synchronisation

        dripping = asyncio.ensure_future(drip())
        keep_alive = await RawClient.connect(proxy.port)
        for index in range(100):
            assert (await keep_alive.request(b"GET", b"/ka-%d" % index)).status == 200
            assert await normal_request(proxy.port) == 200
        await keep_alive.close()
        dripping.cancel()
        growth = proc_status_kib(proxy.proc.pid, "VmRSS") - baseline
        assert growth < 1050 * 16, f"{growth} KiB for 1,050 idle connections"
        assert not [r for r in raw_app.requests if r.path.startswith(b"/slow")]
    finally:
        for writer in idle + slow:
            writer.close()


async def test_connection_limit_refuses_with_503_then_recovers(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port, {"limits": {"max_connections": 20}})
    clients: list[RawClient] = []
    try:
        for _ in range(20):
            client = await RawClient.connect(proxy.port)
            assert (await client.request(b"GET", b"/held")).status == 200
            clients.append(client)
        raw = await exchange(proxy.port, REQUEST)
        (refused,) = parse_responses(raw, [b"GET"])
        assert (refused.status, refused.header(b"connection")) == (503, [b"close"])
        await proxy.log.wait(r"refused 1 connection\(s\) over limits\.max_connections \(20\)")
        for client in clients[:5]:
            response = await client.request(b"GET", b"/bye", [(b"Connection", b"close")])
            assert response.status == 200
            assert await client.closed_by_peer()
        assert await normal_request(proxy.port) == 200
        assert (await clients[-1].request(b"GET", b"/still")).status == 200
    finally:
        for client in clients:
            await client.close()


async def test_file_descriptor_exhaustion_does_not_kill_the_accept_loop(
    raw_app: RawApp, tmp_path: Path
) -> None:
    """With 64 file descriptors the proxy cannot take 200 connections; it must shed them and
    then serve again, not stop accepting."""
    config = deep_merge(base_config(raw_app.port), {"limits": {"max_connections": 10000}})
    starter = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
        "from drainproxy.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proxy = ProxyProcess(config, tmp_path, launcher=[sys.executable, "-c", starter])
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await proxy.started()
        for _ in range(200):
            with contextlib.suppress(OSError):
                connections.append(await asyncio.open_connection("127.0.0.1", proxy.port))
        assert proxy.proc.poll() is None
        # Let the proxy close every connection it did accept: once the client sees the close,
        # the proxy's descriptor is free again.
        for reader, writer in connections:
            with contextlib.suppress(OSError):
                writer.write(REQUEST)
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
        connections.clear()
        statuses = [await normal_request(proxy.port) for _ in range(20)]
        assert statuses == [200] * 20
        assert proxy.proc.poll() is None
        assert "Traceback" not in proxy.log.text()
    finally:
        for _, writer in connections:
            writer.close()
        proxy.stop()


# --- floods: every byte a peer sends is bounded in memory and in time (issue 11) ---------------

#: A flood is this many bytes at most, sent in pieces of FLOOD_PIECE.
FLOOD_BYTES = 64 << 20
FLOOD_PIECE = 64 << 10
#: The proxy's memory may grow by less than this while one peer floods it.
FLOOD_RSS_GROWTH_KIB = 32 << 10

#: Each flood: who sends it, what comes first, and the byte repeated after it without end.
REQUEST_FLOODS = {
    "request trailer field": (
        b"POST /flood HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: ",
        b"t",
    ),
    "request trailer fields": (
        b"POST /flood HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
        b"X-T: 1\r\n",
    ),
    "request chunk extension": (
        b"POST /flood HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=",
        b"e",
    ),
    "request chunk extensions after data": (
        b"POST /flood HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n1;e",
        b";e",
    ),
}
#: The same for an app, and the answer: 502 while the head is not done, else a cut.
RESPONSE_FLOODS = {
    "response head field": (b"HTTP/1.1 200 OK\r\nX-Head: ", b"h", 502),
    "response reason phrase": (b"HTTP/1.1 200 ", b"r", 502),
    "response interim heads": (b"", b"HTTP/1.1 100 Continue\r\n\r\n", 502),
    "response trailer field": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ",
        b"t",
        "cut",
    ),
    "response chunk extension": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5;ext=",
        b"e",
        "cut",
    ),
}


async def flood(writer: asyncio.StreamWriter, prefix: bytes, filler: bytes) -> int:
    """Write ``prefix`` then ``filler`` over and over, up to FLOOD_BYTES or until the peer
    goes away; returns the bytes written."""
    piece = filler * (FLOOD_PIECE // len(filler))
    sent = 0
    with contextlib.suppress(ConnectionError):
        writer.write(prefix)
        while sent < FLOOD_BYTES:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    return sent


async def live_status(proxy: ProxyProcess) -> int:
    port = int(proxy.admin_url.rpartition(":")[2])
    raw = await exchange(port, b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    return parse_responses(raw, [b"GET"])[0].status


async def others_are_served(proxy: ProxyProcess, rounds: int = 20) -> None:
    """Other clients get their answers, and the liveness probe answers, while a flood lasts
    (each waits at most the exchange's own 10 s guard: a hang fails, no time is asserted)."""
    keep_alive = await RawClient.connect(proxy.port)
    try:
        for index in range(rounds):
            assert (await keep_alive.request(b"GET", b"/other-%d" % index)).status == 200
            assert await normal_request(proxy.port) == 200
            assert await live_status(proxy) == 200
    finally:
        await keep_alive.close()


async def peak_growth_kib(proxy: ProxyProcess, baseline: int) -> int:
    return proc_status_kib(proxy.proc.pid, "VmHWM") - baseline


@pytest.mark.parametrize("name", sorted(REQUEST_FLOODS))
async def test_a_request_flood_is_bounded_and_refused(
    raw_app: RawApp, start_proxy: StartProxy, name: str
) -> None:
    prefix, filler = REQUEST_FLOODS[name]
    proxy = await start_proxy(raw_app.port)
    await others_are_served(proxy, rounds=2)  # warm: the baseline includes a served request
    baseline = proc_status_kib(proxy.proc.pid, "VmRSS")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    flooding = asyncio.ensure_future(flood(writer, prefix, filler))
    try:
        await others_are_served(proxy)
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        await asyncio.wait_for(flooding, 30)
    finally:
        flooding.cancel()
        writer.close()
    growth = await peak_growth_kib(proxy, baseline)
    assert growth < FLOOD_RSS_GROWTH_KIB, f"{growth} KiB for {name}"
    await proxy.log.wait(r"400 for POST /flood from 127\.0\.0\.1: chunk extensions or trailer")
    assert not [r for r in raw_app.requests if r.path == b"/flood" and r.body_read]


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
@pytest.mark.parametrize("name", sorted(RESPONSE_FLOODS))
async def test_a_response_flood_is_bounded_and_refused_or_cut(
    raw_app: RawApp, start_proxy: StartProxy, name: str, version: bytes
) -> None:
    """A head past limits.max_response_header_bytes is a 502; framing that carries no data
    past it, once the response began, cuts the response (for HTTP/1.0, with a reset)."""
    prefix, filler, outcome = RESPONSE_FLOODS[name]
    sent: list[int] = []

    @raw_app.route(b"/flood")
    async def flooding(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        sent.append(await flood(writer, prefix, filler))
        return False

    proxy = await start_proxy(raw_app.port)
    await others_are_served(proxy, rounds=2)
    baseline = proc_status_kib(proxy.proc.pid, "VmRSS")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /flood HTTP/" + version + b"\r\nHost: h\r\nConnection: close\r\n\r\n")
        reading = asyncio.ensure_future(asyncio.wait_for(reader.read(), 30))
        await others_are_served(proxy)
        await raw_app.wait_for(lambda: bool(sent), 30)
        try:
            raw = await reading
        except ConnectionResetError:
            raw = None
    finally:
        writer.close()
    growth = await peak_growth_kib(proxy, baseline)
    assert growth < FLOOD_RSS_GROWTH_KIB, f"{growth} KiB for {name}"
    assert sent[0] < FLOOD_BYTES, "the proxy stopped reading the flood"
    if outcome == "cut":
        if version == b"1.0":
            assert raw is None, "a cut close-delimited body must end with a reset"
        else:
            assert raw is not None
            with pytest.raises(IncompleteResponse):
                parse_responses(raw, [b"GET"])
        await proxy.log.wait(r"response to GET /flood from 127\.0\.0\.1 cut: chunk extensions")
    else:
        assert raw is not None
        (response,) = parse_responses(raw, [b"GET"])
        assert response.status == 502
        await proxy.log.wait(r"502 for GET /flood .*larger than limits\.max_response_header_bytes")


# --- an app failing mid-response: the cut never looks complete (issue 11) ---------------------

APP_FAILURES = {
    "reset": lambda writer: writer.transport.abort(),
    "close": lambda writer: writer.close(),
    "garbage": lambda writer: writer.write(b"zz\r\n"),
}


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("app_framing", ["chunked", "length"])
@pytest.mark.parametrize("failure", sorted(APP_FAILURES))
async def test_an_app_failing_mid_response_never_looks_complete(
    raw_app: RawApp, start_proxy: StartProxy, failure: str, app_framing: str, version: str
) -> None:
    """For an HTTP/1.0 client a chunked answer goes on close-delimited: its cut is a reset.
    Any other cut leaves the client a message short of its framing."""
    if failure == "garbage" and app_framing == "length":
        pytest.skip("a Content-Length body has no framing to break")
    framing = b"Transfer-Encoding: chunked" if app_framing == "chunked" else b"Content-Length: 99"
    first = b"7\r\npartial\r\n" if app_framing == "chunked" else b"partial"

    @raw_app.route(b"/fails")
    async def fails(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n" + first)
        await writer.drain()
        APP_FAILURES[failure](writer)
        return False

    proxy = await start_proxy(raw_app.port)
    request = b"GET /fails HTTP/" + version.encode() + b"\r\nHost: h\r\n\r\n"
    if version == "1.0" and app_framing == "chunked":
        with pytest.raises(ConnectionResetError):
            await exchange(proxy.port, request)
    else:
        with pytest.raises((IncompleteResponse, ConnectionResetError)):
            parse_responses(await exchange(proxy.port, request), [b"GET"])
    await proxy.log.wait(r"response to GET /fails from 127\.0\.0\.1 cut")


# --- closes with input pending are staged (issue 11; RFC 9112 §9.6) ----------------------------


@pytest.mark.parametrize("why", ["client-said-close", "request-refused"])
async def test_closing_with_pipelined_input_pending_loses_no_answer_byte(
    raw_app: RawApp, start_proxy: StartProxy, why: str
) -> None:
    """The answer that ends the connection (to a request that said Connection: close, or a
    414) reaches a slow reader whole and ends with a FIN, though the client pipelined more
    requests after it, which the proxy never reads."""
    size = 4 << 20

    @raw_app.route(b"/big")
    async def big(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(response_bytes(200, b"c" * size))
        return True

    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    expected: list[tuple[int, int | None]]
    if why == "client-said-close":
        writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        expected = [(200, size)]
    else:
        writer.write(b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        expected = [(414, None)]
    for index in range(3):
        writer.write(b"GET /after-%d HTTP/1.1\r\nHost: h\r\n\r\n" % index)
    received = bytearray()
    while data := await asyncio.wait_for(reader.read(64 << 10), 30):  # a reset raises here
        received += data
        await asyncio.sleep(0.002)  # a slow reader (load shape)
    writer.close()
    responses = parse_responses(bytes(received), [b"GET"] * 4)
    assert [(r.status, len(r.body) if r.status == 200 else None) for r in responses] == expected
    assert not [r for r in raw_app.requests if r.path.startswith(b"/after")]


# --- heads spread over many reads are gathered, not parsed piece by piece (issue 11) ----------


async def drip(writer: asyncio.StreamWriter, data: bytes, piece: int) -> None:
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
        await writer.drain()
        await asyncio.sleep(0.001)  # one read per piece (load shape, not synchronisation)


@pytest.mark.parametrize("piece", [1, 2, 3])
async def test_heads_dripped_both_ways_are_parsed(
    raw_app: RawApp, start_proxy: StartProxy, piece: int
) -> None:
    """The empty line that ends a head may fall across reads at any point."""
    app = raw_app
    proxy = await start_proxy(app.port)
    path = b"/dripped-%d" % piece

    async def dripped(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        await drip(writer, response_bytes(200, b"drip", [(b"X-Drip", b"d" * 50)]), piece)
        return True

    app.route(path)(dripped)
    app.route(path + b"-again")(dripped)

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    head = b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 50 + b"\r\n\r\n"
    await drip(writer, head + head.replace(path, path + b"-again"), piece)
    responses: list[Response] = []
    data = b""
    while len(responses) < 2:
        more = await asyncio.wait_for(reader.read(65536), 10)
        assert more, f"closed after {data!r}"
        data += more
        with contextlib.suppress(IncompleteResponse):
            responses = parse_responses(data, [b"GET"] * 2, eof=False)
    writer.close()
    assert [(r.status, r.body, r.header(b"x-drip")) for r in responses] == [
        (200, b"drip", [b"d" * 50])
    ] * 2
    assert [r.path for r in app.requests[-2:]] == [path, path + b"-again"]


async def test_a_tunnel_the_app_ends_reaches_a_still_sending_client_whole(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """After an Upgrade the app sends its last 1 MiB and half-closes while the client is still
    sending into the tunnel: the client gets every byte and a FIN, never a reset."""
    last = b"L" * (1 << 20)

    @raw_app.route(b"/tunnel")
    async def tunnel(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n" + last
        )
        await writer.drain()
        writer.write_eof()
        with contextlib.suppress(ConnectionError):
            while await request.reader.read(1 << 16):  # what the client still sends
                pass
        return False

    proxy = await start_proxy(raw_app.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /tunnel HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")

    async def keep_sending() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"c" * 4096)
                await writer.drain()
                await asyncio.sleep(0.001)  # load shape

    sending = asyncio.ensure_future(keep_sending())
    received = bytearray()
    try:
        while data := await asyncio.wait_for(reader.read(64 << 10), 30):  # a reset raises
            received += data
            await asyncio.sleep(0.002)  # a slow reader (load shape)
    finally:
        sending.cancel()
        writer.close()
    head, _, tail = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert tail == last
