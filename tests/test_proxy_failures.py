"""The app failing in every way it can, and the keep-alive race: each failure answered (502,
504) or passed on as a cut, logged, and nobody else affected."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

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
from tests.support import ProxyProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

Writer = asyncio.StreamWriter


@pytest.fixture(scope="module")
def proxy_overrides() -> dict[str, Any]:
    return {"upstream": {"response_timeout": "1s"}}


async def metric(proxy: ProxyProcess, name: str, labels: str = "") -> float:
    text = await proxy.metrics_text()
    match = re.search(rf"^{name}{{?{re.escape(labels)}}}? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_app_refusing_connections_is_502(tmp_path: Path) -> None:
    proxy = await launch_proxy(free_port(), tmp_path)
    try:
        client = await RawClient.connect(proxy.port)
        for _ in range(2):
            response = await client.request(b"GET", b"/refused")
            assert response.status == 502
            assert b"cannot connect to the app" in response.body
        await client.close()
        await proxy.log.wait(r"502 for GET /refused from 127\.0\.0\.1: cannot connect")
    finally:
        proxy.stop()


async def test_no_response_head_in_time_is_504(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/never")
    async def never(request: AppRequest, writer: Writer) -> bool:
        await request.reader.read()  # until the proxy gives up on this connection
        return False

    before = app.disconnects
    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/never")
    assert response.status == 504
    assert b"no response head from the app within 1s" in response.body
    assert (await client.request(b"GET", b"/after")).body == b"/after"
    await client.close()
    await app.wait_for(lambda: app.disconnects > before)
    await proxy.log.wait(r"504 for GET /never from 127\.0\.0\.1")


async def test_keep_alive_race_is_retried_once_on_a_fresh_connection(
    app: RawApp, proxy: ProxyProcess
) -> None:
    """The app closes a pooled connection just as a request arrives on it (no byte of a
    response): an idempotent request goes again on a new connection, and succeeds."""

    @app.route(b"/race")
    async def race(request: AppRequest, writer: Writer) -> bool:
        if request.sequence > 1:
            return False  # as if its idle timeout fired: close without answering
        writer.write(response_bytes(200, b"fresh"))
        return True

    retried = await metric(proxy, "drainproxy_upstream_errors_total", 'kind="retried"')
    client = await RawClient.connect(proxy.port)
    await client.request(b"GET", b"/warm-up")  # leaves a pooled connection behind
    response = await client.request(b"GET", b"/race")
    assert (response.status, response.body) == (200, b"fresh")
    await client.close()
    attempts = [r for r in app.requests if r.path == b"/race"]
    first, second = attempts[-2:]
    assert first.sequence > 1  # on a pooled connection
    assert second.sequence == 1  # on a fresh one
    assert await metric(proxy, "drainproxy_upstream_errors_total", 'kind="retried"') == retried + 1


async def test_keep_alive_race_is_not_retried_for_a_post(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/race-post")
    async def race(request: AppRequest, writer: Writer) -> bool:
        await request.read_body()
        return False

    before = len(app.requests)
    client = await RawClient.connect(proxy.port)
    await client.request(b"GET", b"/warm-up")
    response = await client.request(b"POST", b"/race-post", body=b"once")
    assert response.status == 502
    await client.close()
    assert [r.path for r in app.requests[before:]] == [b"/warm-up", b"/race-post"]


async def test_app_closing_idle_pooled_connections_is_invisible(
    app: RawApp, proxy: ProxyProcess
) -> None:
    @app.route(b"/then-close")
    async def then_close(request: AppRequest, writer: Writer) -> bool:
        writer.write(response_bytes(200, b"bye"))
        await writer.drain()
        return False  # closes a connection the proxy considers reusable

    client = await RawClient.connect(proxy.port)
    for _ in range(3):
        assert (await client.request(b"GET", b"/then-close")).body == b"bye"
        assert (await client.request(b"GET", b"/next")).body == b"/next"
    await client.close()


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("garbage", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
        ("bad-status", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
        (
            "cl-and-te",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("two-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        ("bad-length", b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nabc"),
        ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n"),
        ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"),
        ("bare-cr", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n"),
        ("nul", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"),
        (
            "unsolicited-101",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        ),
    ],
)
async def test_invalid_responses_are_502(
    app: RawApp, proxy: ProxyProcess, name: str, answer: bytes
) -> None:
    path = b"/invalid-" + name.encode()

    @app.route(path)
    async def invalid(request: AppRequest, writer: Writer) -> bool:
        writer.write(answer)
        return False

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", path)
    assert response.status == 502, response
    assert (await client.request(b"GET", b"/after")).body == b"/after"
    await client.close()
    await proxy.log.wait(r"502 for GET " + re.escape(path.decode()))


async def test_invalid_chunk_mid_response_is_a_cut(app: RawApp, proxy: ProxyProcess) -> None:
    @app.route(b"/bad-chunk")
    async def bad_chunk(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        await writer.drain()
        await request.reader.read()
        return False

    client = await RawClient.connect(proxy.port)
    with pytest.raises(IncompleteResponse):
        await client.request(b"GET", b"/bad-chunk")
    await client.close()


async def test_an_app_answering_slowly_delays_nobody_else(app: RawApp, proxy: ProxyProcess) -> None:
    release = asyncio.Event()

    @app.route(b"/slow")
    async def slow(request: AppRequest, writer: Writer) -> bool:
        await release.wait()
        writer.write(response_bytes(200, b"slow"))
        return True

    slow_client = await RawClient.connect(proxy.port)
    slow_response = asyncio.ensure_future(slow_client.request(b"GET", b"/slow"))
    await app.received(b"/slow")
    for index in range(20):
        raw = await exchange(
            proxy.port, b"GET /quick HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert parse_responses(raw, [b"GET"])[0].body == b"/quick", index
    assert not slow_response.done()
    release.set()
    assert (await slow_response).body == b"slow"
    await slow_client.close()
