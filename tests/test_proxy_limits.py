"""Timeouts and limits: what a client (or an app) may make drainproxy wait for or hold, each
expiry answered (408, 413, 414, 431, 503, 504) or closed, and logged. Timeouts here are short so
that expiring them is quick; tests wait for the answer or the close, never for a time."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from pathlib import Path
from typing import Any

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
    response_bytes,
)
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

Writer = asyncio.StreamWriter

LIMITS = {
    "timeouts": {"request_head": "500ms", "client_idle": "700ms", "client_body": "500ms"},
    "upstream": {"idle_timeout": "300ms"},
    "limits": {
        "max_request_line": "1KiB",
        "max_header_bytes": "4KiB",
        "max_headers": 20,
        "max_response_header_bytes": "16KiB",
        "max_body_bytes": "64KiB",
    },
}


@pytest.fixture(scope="module")
def proxy_overrides() -> dict[str, Any]:
    return LIMITS


async def answer(port: int, data: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    """Send ``data``; the status of the one answer and its Connection header."""
    raw = await exchange(port, data)
    (response,) = parse_responses(raw, [method])
    return response.status, b",".join(response.header(b"connection"))


# --- timeouts ------------------------------------------------------------------------------------


async def test_slow_request_head_gets_408(proxy: ProxyProcess) -> None:
    status, connection = await answer(proxy.port, b"GET /slowloris HTTP/1.1\r\nHost: h\r\n")
    assert (status, connection) == (408, b"close")
    await proxy.log.wait(r"408 for a request from 127\.0\.0\.1: request head not received")


async def test_dripping_head_still_times_out(proxy: ProxyProcess) -> None:
    """A byte every so often does not reset the head timeout (classic slowloris)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /drip HTTP/1.1\r\nHost: h\r\n" + b"X-Pad: " + b"a" * 500:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)  # load shape, not synchronisation

    dripping = asyncio.ensure_future(drip())
    raw = await asyncio.wait_for(reader.read(), 20)
    dripping.cancel()
    writer.close()
    assert parse_responses(raw, [b"GET"])[0].status == 408


async def test_silent_new_connection_is_closed_without_an_answer(proxy: ProxyProcess) -> None:
    assert await exchange(proxy.port, b"") == b""


async def test_idle_keep_alive_connection_is_closed(proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    assert (await client.request(b"GET", b"/then-idle")).status == 200
    assert await client.closed_by_peer()
    await client.close()


async def test_stalled_request_body_gets_408_and_the_app_request_is_aborted(
    app: RawApp, proxy: ProxyProcess
) -> None:
    outcome: list[str] = []

    @app.route(b"/stall")
    async def stall(request: AppRequest, writer: Writer) -> bool:
        try:
            await request.read_body()
        except asyncio.IncompleteReadError:
            outcome.append("aborted")
        return False

    status, connection = await answer(
        proxy.port,
        b"POST /stall HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly ten..",
        b"POST",
    )
    assert (status, connection) == (408, b"close")
    await app.wait_for(lambda: outcome == ["aborted"])
    await proxy.log.wait(r"408 for POST /stall from 127\.0\.0\.1: no request body bytes")


async def test_idle_app_connections_are_closed(app: RawApp, proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    assert (await client.request(b"GET", b"/pooled")).status == 200
    await client.close()
    await app.wait_for(lambda: app.open_connections == 0)


async def test_expiries_and_refusals_are_counted(proxy: ProxyProcess) -> None:
    """The tests above expired each client-side timeout at least once; /metrics says so."""
    text = await proxy.metrics_text()
    for kind in ("request_head", "client_idle", "client_body", "upstream_idle"):
        assert re.search(rf'^drainproxy_timeouts_total{{kind="{kind}"}} [1-9]', text, re.M), kind
    assert re.search(r'^drainproxy_requests_rejected_total{status="408"} [1-9]', text, re.M)


async def test_connect_timeout_is_504(tmp_path: Path) -> None:
    """An app whose accept queue is full never completes a connect."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue (its length is backlog + 1)
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    proxy = await launch_proxy(
        listener.getsockname()[1], tmp_path, {"upstream": {"connect_timeout": "300ms"}}
    )
    try:
        status, _ = await answer(
            proxy.port, b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert status == 504
        await proxy.log.wait(r"504 for GET /c from 127\.0\.0\.1: no connection to the app within")
    finally:
        proxy.stop()
        for sock in [*fillers, listener]:
            sock.close()


# --- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "request_bytes", "status"),
    [
        ("long-target", b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
        ("big-head", b"GET /big HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        (
            "many-fields",
            b"GET /many HTTP/1.1\r\nHost: h\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(25))
            + b"\r\n",
            431,
        ),
        (
            "length-over-limit",
            b"POST /cl HTTP/1.1\r\nHost: h\r\nContent-Length: 70000\r\n\r\n",
            413,
        ),
        ("version", b"GET /v HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    ],
)
async def test_limits_answer_before_the_app_sees_anything(
    app: RawApp, proxy: ProxyProcess, name: str, request_bytes: bytes, status: int
) -> None:
    before = len(app.requests)
    assert await answer(proxy.port, request_bytes) == (status, b"close")
    assert len(app.requests) == before


async def test_huge_header_arriving_in_pieces_is_cut_off(proxy: ProxyProcess) -> None:
    """llhttp holds a header until it ends: the limit must apply while it grows."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /growing HTTP/1.1\r\nHost: h\r\nX-Huge: ")
    sent = 0

    async def grow() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while sent < 64 << 20:
                writer.write(b"h" * 8192)
                await writer.drain()
                sent += 8192
                await asyncio.sleep(0)  # drain() need not yield: let the reader see the answer

    growing = asyncio.ensure_future(grow())
    raw = await asyncio.wait_for(reader.read(), 10)
    sent_before_answer = sent
    growing.cancel()
    writer.close()
    assert parse_responses(raw, [b"GET"])[0].status == 431
    assert sent_before_answer < 32 << 20


async def test_chunked_body_over_the_limit_gets_413(app: RawApp, proxy: ProxyProcess) -> None:
    body = b"".join(b"4000\r\n" + b"c" * 0x4000 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    status, connection = await answer(
        proxy.port,
        b"POST /chunked-big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
        b"POST",
    )
    assert (status, connection) == (413, b"close")


async def test_body_within_the_limit_passes(app: RawApp, proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    response = await client.request(b"POST", b"/fits", body=b"f" * 65536)
    assert response.status == 200
    await client.close()
    assert app.requests[-1].body == b"f" * 65536


async def test_deep_pipelines_are_answered_then_refused(app: RawApp, proxy: ProxyProcess) -> None:
    """Requests parsed ahead are bounded (memory per connection); the rest get a 503 in
    order and a close, so the client retries them elsewhere."""
    before = len(app.requests)
    raw = await exchange(proxy.port, b"GET /deep HTTP/1.1\r\nHost: h\r\n\r\n" * 200)
    responses = parse_responses(raw, [b"GET"] * 200)
    statuses = [response.status for response in responses]
    assert statuses == [200] * (len(statuses) - 1) + [503]
    assert 1 < len(statuses) < 200
    assert len(app.requests) - before == len(statuses) - 1


async def test_a_rejected_request_in_a_pipeline_is_answered_in_order(
    app: RawApp, proxy: ProxyProcess
) -> None:
    raw = await exchange(
        proxy.port,
        b"GET /in-order-1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /in-order-2 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /" + b"x" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    responses = parse_responses(raw, [b"GET"] * 4)
    assert [(r.status, r.body) for r in responses[:2]] == [
        (200, b"/in-order-1"),
        (200, b"/in-order-2"),
    ]
    assert responses[2].status == 414
    assert len(responses) == 3
    assert not [r for r in app.requests if r.path == b"/never"]


async def test_app_response_is_not_limited(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/big-answer")
    async def big_answer(request: AppRequest, writer: Writer) -> bool:
        writer.write(response_bytes(200, b"z" * 200_000, [(b"X-Long", b"l" * 6000)]))
        return True

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/big-answer")
    assert (response.status, len(response.body)) == (200, 200_000)
    await client.close()


# --- chunked framing beyond its data (issue 11): small chunks and trailers still pass ---------


async def test_one_byte_chunks_and_small_trailers_pass_both_ways(
    app: RawApp, proxy: ProxyProcess
) -> None:
    """Chunked framing may cost several times its data (``http1.CHUNK_OVERHEAD_ALLOWANCE``):
    10,000 one-byte chunks are five times their data and still pass, request and response."""
    chunks = b"".join(b"1;n=v\r\n%c\r\n" % (97 + i % 26) for i in range(10_000))
    data = bytes(97 + i % 26 for i in range(10_000))

    @app.route(b"/tiny-chunks")
    async def tiny_chunks(request: AppRequest, writer: Writer) -> bool:
        await request.read_body()
        assert request.body == data
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks
            + b"0\r\nX-Trailer: "
            + b"t" * 3000
            + b"\r\n\r\n"
        )
        return True

    client = await RawClient.connect(proxy.port)
    client.writer.write(
        b"POST /tiny-chunks HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\nX-Trailer: "
        + b"t" * 3000
        + b"\r\n\r\n"
    )
    client.conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"h")]))
    client.conn.send(h11.EndOfMessage())
    response = await client.read_response()
    assert (response.status, response.body) == (200, data)
    await client.close()


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"0\r\nX-Trailer: " + b"t" * 5000 + b"\r\n\r\n", id="long-trailer-field"),
        pytest.param(b"0\r\n" + b"X-T: 1\r\n" * 700 + b"\r\n", id="many-trailer-fields"),
        # llhttp skips extensions without a callback: they are counted per socket read, so
        # the limit holds to within one read (up to 256 KiB).
        pytest.param(
            b"5;" + b"e" * (1 << 20) + b"\r\nhello\r\n0\r\n\r\n", id="long-chunk-extension"
        ),
    ],
)
async def test_chunked_framing_past_the_head_limit_gets_400(
    app: RawApp, proxy: ProxyProcess, tail: bytes
) -> None:
    status, connection = await answer(
        proxy.port,
        b"POST /framing HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n" + tail,
        b"POST",
    )
    assert (status, connection) == (400, b"close")
    await proxy.log.wait(r"400 for POST /framing .*: chunk extensions or trailer fields larger")


@pytest.mark.parametrize(
    ("name", "response", "status"),
    [
        ("head", response_bytes(200, b"ok", [(b"X-Big", b"b" * 17000)]), 502),
        # Many small heads: counted per socket read, so past the limit within one read.
        ("interim-heads", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 10_000, 502),
        (
            "trailer",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
            + b"X-T: 1\r\n" * 3000
            + b"\r\n",
            None,
        ),
    ],
)
async def test_a_response_past_max_response_header_bytes_is_refused_or_cut(
    app: RawApp, proxy: ProxyProcess, name: str, response: bytes, status: int | None
) -> None:
    """A head past the limit is a 502 and the connection goes on; a trailer section past it
    (the response began) cuts the response. Either way the app connection is not reused."""
    path = b"/too-much-" + name.encode()

    @app.route(path)
    async def too_much(request: AppRequest, writer: Writer) -> bool:
        writer.write(response)
        return True

    client = await RawClient.connect(proxy.port)
    if status is None:
        with pytest.raises(IncompleteResponse):
            await client.request(b"GET", path)
    else:
        assert (await client.request(b"GET", path)).status == status
        assert (await client.request(b"GET", b"/after-" + path[1:])).status == 200
    await client.close()
    await proxy.log.wait(rf"GET /too-much-{name} .*larger than limits\.max_response_header_bytes")
