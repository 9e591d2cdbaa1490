"""What the app and the client see of a request and a response: bytes kept, bytes removed, bytes
added, and the framing of every kind of response. One proxy and one raw-socket app serve the
whole module; each test uses its own paths."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import h11
import pytest

from tests.proxy_support import (
    AppRequest,
    IncompleteResponse,
    RawApp,
    RawClient,
    exchange,
    launch_proxy,
    parse_responses,
    request_once,
    response_bytes,
)
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

Writer = asyncio.StreamWriter


@pytest.fixture(scope="module")
def proxy_overrides() -> dict[str, Any]:
    # Pooled app connections outlive any pause of a loaded machine between two requests.
    return {"upstream": {"max_idle_connections": 2, "idle_timeout": "60s"}}


def last(app: RawApp, path: bytes) -> AppRequest:
    return [request for request in app.requests if request.path == path][-1]


# --- requests as the app sees them --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"/exact/a%2Fb/../c?x=1&y=%20&y=2&z"),
        (b"DELETE", b"/exact/;matrix=1?q=a+b&empty="),
        (b"PATCH", b"/exact/%E2%82%AC?%%"),
        (b"OPTIONS", b"*"),
        (b"GET", b"http://elsewhere.example/exact/absolute?x=1"),
        (b"PROPFIND", b"/exact/dav"),
    ],
)
async def test_method_and_target_reach_the_app_byte_exact(
    app: RawApp, proxy: ProxyProcess, method: bytes, target: bytes
) -> None:
    before = len(app.requests)
    response = await request_once(
        proxy.port,
        method + b" " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        method,
    )
    assert response.status == 200
    seen = app.requests[before:]
    assert [(r.method, r.target, r.version) for r in seen] == [(method, target, b"HTTP/1.1")]


async def test_header_order_case_and_duplicates_are_kept(app: RawApp, proxy: ProxyProcess) -> None:
    sent = [
        (b"X-First", b"1"),
        (b"cookie", b"a=1"),
        (b"X-Dup", b"one"),
        (b"Accept", b"text/plain"),
        (b"x-dup", b"two"),
        (b"Cookie", b"b=2"),
        (b"X-Empty", b""),
        (b"X-Spaces", b"inner  spaces\tand tab"),
    ]
    head = b"".join(name + b": " + value + b"\r\n" for name, value in sent)
    await request_once(
        proxy.port, b"GET /order HTTP/1.1\r\nHost: h\r\n" + head + b"Connection: close\r\n\r\n"
    )
    names = {name.lower() for name, _ in sent}
    received = [(n, v) for n, v in last(app, b"/order").headers if n.lower() in names]
    assert received == sent


async def test_hop_by_hop_headers_are_removed_both_ways(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/hop")
    async def hop(request: AppRequest, writer: Writer) -> bool:
        writer.write(
            response_bytes(
                200,
                b"ok",
                [
                    (b"Connection", b"X-Resp-Private, keep-alive"),
                    (b"X-Resp-Private", b"secret"),
                    (b"Keep-Alive", b"timeout=5"),
                    (b"Proxy-Connection", b"keep-alive"),
                    (b"Upgrade", b"h2c"),
                    (b"X-Resp-Kept", b"yes"),
                ],
            )
        )
        return True

    client = await RawClient.connect(proxy.port)
    response = await client.request(
        b"GET",
        b"/hop",
        [
            (b"Connection", b"keep-alive, X-Private, x-other-private"),
            (b"X-Private", b"secret"),
            (b"X-Other-Private", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Checksum"),
            (b"Upgrade", b"websocket"),
            (b"X-Kept", b"yes"),
        ],
    )
    await client.close()
    seen = {name.lower() for name, _ in last(app, b"/hop").headers}
    removed = {b"x-private", b"x-other-private", b"keep-alive", b"proxy-connection", b"te"}
    removed |= {b"trailer", b"upgrade", b"connection", b"transfer-encoding"}
    assert not seen & removed
    assert b"x-kept" in seen
    answered = {name.lower() for name, _ in response.headers}
    assert not answered & {b"x-resp-private", b"keep-alive", b"proxy-connection", b"upgrade"}
    assert response.header(b"x-resp-kept") == [b"yes"]
    assert response.header(b"connection") == []


async def test_forwarded_headers_by_default(app: RawApp, proxy: ProxyProcess) -> None:
    await request_once(
        proxy.port,
        b"GET /xff HTTP/1.1\r\nHost: shop.example:8443\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.7, 10.0.0.1\r\n"
        b"Connection: close\r\n\r\n",
    )
    request = last(app, b"/xff")
    assert request.header(b"x-forwarded-for") == [b"203.0.113.9, 198.51.100.7, 10.0.0.1, 127.0.0.1"]
    assert request.header(b"x-forwarded-proto") == [b"http"]
    assert request.header(b"x-forwarded-host") == [b"shop.example:8443"]
    assert request.header(b"host") == [b"shop.example:8443"]


@pytest.mark.parametrize(
    ("mode", "expected_proto", "expected_host", "expected_for"),
    [
        (
            {
                "x_forwarded_for": "append",
                "x_forwarded_proto": "preserve",
                "x_forwarded_host": "preserve",
            },
            [b"https"],
            [b"lb.example"],
            [b"203.0.113.9, 127.0.0.1"],
        ),
        (
            {
                "x_forwarded_for": "append",
                "x_forwarded_proto": "overwrite",
                "x_forwarded_host": "overwrite",
            },
            [b"http"],
            [b"h.example"],
            [b"203.0.113.9, 127.0.0.1"],
        ),
        (
            {"x_forwarded_for": "off", "x_forwarded_proto": "off", "x_forwarded_host": "off"},
            [b"https"],
            [b"lb.example"],
            [b"203.0.113.9"],
        ),
    ],
    ids=["preserve", "overwrite", "off"],
)
async def test_forwarded_modes(
    tmp_path_factory: pytest.TempPathFactory,
    app: RawApp,
    mode: dict[str, Any],
    expected_proto: list[bytes],
    expected_host: list[bytes],
    expected_for: list[bytes],
) -> None:
    proxy = await launch_proxy(app.port, tmp_path_factory.mktemp("fwd"), {"forwarded": mode})
    try:
        await request_once(
            proxy.port,
            b"GET /fwd HTTP/1.1\r\nHost: h.example\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: lb.example\r\nX-Forwarded-For: 203.0.113.9\r\n"
            b"Connection: close\r\n\r\n",
        )
    finally:
        proxy.stop()
    request = last(app, b"/fwd")
    assert request.header(b"x-forwarded-proto") == expected_proto
    assert request.header(b"x-forwarded-host") == expected_host
    assert request.header(b"x-forwarded-for") == expected_for


async def test_http10_client_without_host(app: RawApp, proxy: ProxyProcess) -> None:
    raw = await exchange(proxy.port, b"GET /ten HTTP/1.0\r\n\r\n")
    (response,) = parse_responses(raw, [b"GET"])
    assert response.status == 200
    assert response.body == b"/ten"
    request = last(app, b"/ten")
    assert request.version == b"HTTP/1.1"
    assert request.header(b"host") == [b"127.0.0.1:%d" % app.port]
    assert request.header(b"x-forwarded-host") == []


async def test_http10_keep_alive(app: RawApp, proxy: ProxyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for path in (b"/ten-ka-1", b"/ten-ka-2"):
        writer.write(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"\r\nConnection: keep-alive\r\n" in head
        assert await reader.readexactly(len(path)) == path
    writer.write(b"GET /ten-ka-3 HTTP/1.0\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(-1), 10)
    assert rest.endswith(b"/ten-ka-3")
    writer.close()


# --- connections ---------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_app_connection(app: RawApp, proxy: ProxyProcess) -> None:
    """Counted by the connections that carried the requests: the app check's TCP connects
    (every 100 ms, no bytes) are connections too, and would make this count depend on timing."""
    client = await RawClient.connect(proxy.port)
    await client.request(b"GET", b"/warm")
    for index in range(5):
        response = await client.request(b"GET", b"/ka?%d" % index)
        assert response.body == b"/ka?%d" % index
    await client.close()
    # The app is the module's: only this test's requests count (the pooled connection may have
    # carried an earlier test's, so its sequence numbers need not start at 1).
    carriers = [
        (request.connection, request.sequence)
        for request in app.requests
        if request.path in (b"/warm", b"/ka")
    ]
    first = carriers[0][1]
    assert carriers == [(carriers[0][0], first + index) for index in range(6)]


async def test_idle_app_connections_are_bounded(app: RawApp, proxy: ProxyProcess) -> None:
    """Five concurrent exchanges need five app connections; only two stay pooled after."""
    arrived = 0
    release = asyncio.Event()

    @app.route(b"/held")
    async def held(request: AppRequest, writer: Writer) -> bool:
        nonlocal arrived
        arrived += 1
        if arrived == 5:
            release.set()
        await release.wait()
        writer.write(response_bytes(200, b"held"))
        return True

    clients = [await RawClient.connect(proxy.port) for _ in range(5)]
    responses = await asyncio.gather(*(client.request(b"GET", b"/held") for client in clients))
    assert [response.body for response in responses] == [b"held"] * 5
    for client in clients:
        await client.close()
    await app.wait_for(lambda: app.open_connections == 2)


async def test_pipelined_requests_are_answered_in_order(app: RawApp, proxy: ProxyProcess) -> None:
    gate = asyncio.Event()

    @app.route(b"/pipe-slow")
    async def slow(request: AppRequest, writer: Writer) -> bool:
        await gate.wait()
        writer.write(response_bytes(200, b"first"))
        return True

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /pipe-slow HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /pipe-2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"HEAD /pipe-3 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /pipe-4 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
        b"GET /pipe-5 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    await app.received(b"/pipe-slow")
    gate.set()
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    responses = parse_responses(raw, [b"GET", b"POST", b"HEAD", b"POST", b"GET"])
    assert [r.body for r in responses] == [b"first", b"/pipe-2", b"", b"/pipe-4", b"/pipe-5"]
    assert last(app, b"/pipe-2").body == b"hello"
    assert last(app, b"/pipe-4").body == b"abc"


# --- response framing ----------------------------------------------------------------------------


async def test_chunked_response_is_relayed_chunked(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/chunked")
    async def chunked(request: AppRequest, writer: Writer) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-T: 1\r\n\r\n"
        )
        return True

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/chunked")
    assert response.body == b"hello world"
    assert response.header(b"transfer-encoding") == [b"chunked"]
    assert (await client.request(b"GET", b"/after-chunked")).body == b"/after-chunked"
    await client.close()


async def test_content_length_response_keeps_its_length(app: RawApp, proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/length")
    assert response.header(b"content-length") == [b"7"]
    assert response.header(b"transfer-encoding") == []
    await client.close()


@pytest.mark.parametrize(
    ("method", "status", "extra"),
    [
        (b"HEAD", 200, [(b"Content-Length", b"1000")]),
        (b"HEAD", 200, [(b"Transfer-Encoding", b"chunked")]),
        (b"GET", 204, []),
        (b"GET", 304, [(b"ETag", b'"v1"'), (b"Content-Length", b"1000")]),
    ],
    ids=["head-length", "head-chunked", "204", "304"],
)
async def test_bodyless_responses_keep_the_connection_in_step(
    app: RawApp, proxy: ProxyProcess, method: bytes, status: int, extra: list[tuple[bytes, bytes]]
) -> None:
    path = b"/bodyless-%d-%s" % (status, extra[0][0] if extra else b"none")

    @app.route(path)
    async def bodyless(request: AppRequest, writer: Writer) -> bool:
        head = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
        writer.write(b"HTTP/1.1 %d X\r\n%s\r\n" % (status, head))
        return True

    client = await RawClient.connect(proxy.port)
    for _ in range(2):
        response = await client.request(method, path)
        assert (response.status, response.body) == (status, b"")
        assert (await client.request(b"GET", b"/after")).body == b"/after"
    await client.close()


async def test_interim_responses_reach_http11_clients(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/early-hints")
    async def hints(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        writer.write(response_bytes(200, b"final"))
        return True

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/early-hints")
    assert (response.interim, response.status, response.body) == ([103], 200, b"final")
    await client.close()
    raw = await exchange(proxy.port, b"GET /early-hints HTTP/1.0\r\n\r\n")
    assert b" 103 " not in raw
    assert parse_responses(raw, [b"GET"])[0].body == b"final"


async def test_close_delimited_response(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/until-close")
    async def until_close(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"the body")
        return False

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/until-close")
    assert response.body == b"all of the body"
    assert response.header(b"transfer-encoding") == [b"chunked"]
    assert (await client.request(b"GET", b"/after")).body == b"/after"
    await client.close()
    raw = await exchange(proxy.port, b"GET /until-close HTTP/1.0\r\n\r\n")
    assert raw.endswith(b"\r\n\r\nall of the body")


async def test_expect_100_continue(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/expect")
    async def expect(request: AppRequest, writer: Writer) -> bool:
        assert request.header(b"expect") == [b"100-continue"]
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        size = await request.read_body()
        writer.write(response_bytes(200, b"got %d" % size))
        return True

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"PUT /expect HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(b"abcde")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await reader.readexactly(5) == b"got 5"
    writer.close()


async def test_expect_answered_early_by_the_app(app: RawApp, proxy: ProxyProcess) -> None:
    """The app refuses the body: the client gets the answer and a closed connection, since the
    body it announced never came."""

    @app.route(b"/expect-refused")
    async def refused(request: AppRequest, writer: Writer) -> bool:
        writer.write(response_bytes(417, b"no"))
        return False

    raw = await exchange(
        proxy.port,
        b"PUT /expect-refused HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    (response,) = parse_responses(raw, [b"PUT"])
    assert (response.status, response.header(b"connection")) == (417, [b"close"])


# --- failures ----------------------------------------------------------------------------------


async def test_app_dropping_the_connection_before_a_response_is_502(
    app: RawApp, proxy: ProxyProcess
) -> None:
    @app.route(b"/drop")
    async def drop(request: AppRequest, writer: Writer) -> bool:
        await request.read_body()
        return False

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"POST", b"/drop", body=b"x")
    assert response.status == 502
    assert response.header(b"content-type") == [b"text/plain; charset=utf-8"]
    assert b"closed the connection" in response.body
    assert (await client.request(b"GET", b"/after")).body == b"/after"
    await client.close()
    await proxy.log.wait(r"502 for POST /drop from 127\.0\.0\.1")


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_response_cut_mid_body_reaches_the_client_as_a_cut(
    app: RawApp, proxy: ProxyProcess, framing: str
) -> None:
    path = b"/cut-" + framing.encode()

    @app.route(path)
    async def cut(request: AppRequest, writer: Writer) -> bool:
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n")
        await writer.drain()
        return False

    client = await RawClient.connect(proxy.port)
    with pytest.raises(IncompleteResponse):
        await client.request(b"GET", path)
    await client.close()
    with pytest.raises((IncompleteResponse, ConnectionResetError)):
        parse_responses(await exchange(proxy.port, b"GET " + path + b" HTTP/1.0\r\n\r\n"), [b"GET"])


async def test_close_delimited_cut_is_a_reset_for_http10(app: RawApp, proxy: ProxyProcess) -> None:
    """An HTTP/1.0 client knows the end of a close-delimited body only by the close: a cut must
    be a reset, never a clean close."""

    @app.route(b"/reset-mid-body")
    async def reset(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n")
        await writer.drain()
        writer.transport.abort()
        return False

    with pytest.raises(ConnectionResetError):
        await exchange(proxy.port, b"GET /reset-mid-body HTTP/1.0\r\n\r\n")


async def test_malformed_request_gets_400_and_others_are_served(
    app: RawApp, proxy: ProxyProcess
) -> None:
    client = await RawClient.connect(proxy.port)
    assert (await client.request(b"GET", b"/before")).status == 200
    raw = await exchange(proxy.port, b"GET /bad HTTP/1.1\r\nHost: h\r\nNo colon here\r\n\r\n")
    (response,) = parse_responses(raw, [b"GET"])
    assert response.status == 400
    assert response.header(b"connection") == [b"close"]
    assert (await client.request(b"GET", b"/after-bad")).body == b"/after-bad"
    await client.close()
    assert not [r for r in app.requests if r.path == b"/bad"]


async def test_a_strict_app_accepts_everything_the_proxy_sends(tmp_path: Path) -> None:
    """h11 as the app: every request the proxy writes (keep-alive, bodies re-framed, HEAD,
    HTTP/1.0 clients) must parse strictly; aiohttp is the client."""
    errors: list[str] = []
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: Writer) -> None:
        conn = h11.Connection(h11.SERVER)
        body = bytearray()
        method = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    method = event.method
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    bodies.append(bytes(body))
                    reply = b"%d bytes" % len(body)
                    body.clear()
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=200, headers=[(b"Content-Length", b"%d" % len(reply))]
                            )
                        )
                    )
                    if method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=reply)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except h11.ProtocolError as exc:
            errors.append(repr(exc))
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await launch_proxy(port, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            for data in (b"", b"small", b"x" * 300_000):
                async with session.post(proxy.url + "/len", data=data) as response:
                    assert await response.read() == b"%d bytes" % len(data)

            async def chunks() -> AsyncIterator[bytes]:
                for part in (b"a" * 10, b"b" * 70_000, b"c"):
                    yield part

            async with session.put(proxy.url + "/chunked", data=chunks()) as response:
                assert await response.read() == b"70011 bytes"
            async with session.head(proxy.url + "/head") as response:
                assert response.status == 200
        raw = await exchange(proxy.port, b"GET /ten HTTP/1.0\r\n\r\n")
        assert parse_responses(raw, [b"GET"])[0].body == b"0 bytes"
    finally:
        proxy.stop()
        server.close()
    assert errors == []
    assert bodies[:3] == [b"", b"small", b"x" * 300_000]
