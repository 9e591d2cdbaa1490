"""Issue 17: header classification as a client and the app see it through the real proxy: each
X-Forwarded switch acts on its own field (in any spelling), every idempotent method is retried
after the keep-alive race, a 304 without Content-Length has no body, an unregistered status
with an empty reason passes as it came, and the app's Keep-Alive timeout is heeded in whichever
of several fields it comes."""

from __future__ import annotations

import asyncio

import pytest

from tests.proxy_support import (
    AppRequest,
    RawApp,
    RawClient,
    exchange,
    launch_proxy,
    request_once,
    response_bytes,
)
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

Writer = asyncio.StreamWriter


def last(app: RawApp, path: bytes) -> AppRequest:
    return [request for request in app.requests if request.path == path][-1]


@pytest.mark.parametrize(
    ("proto_mode", "host_mode", "expected_proto", "expected_host"),
    [
        ("overwrite", "preserve", [b"http"], [b"lb.example"]),
        ("preserve", "overwrite", [b"https"], [b"h.example"]),
        ("off", "overwrite", [b"https"], [b"h.example"]),
        ("overwrite", "off", [b"http"], [b"lb.example"]),
    ],
)
async def test_each_forwarded_switch_acts_on_its_own_field(
    tmp_path_factory: pytest.TempPathFactory,
    app: RawApp,
    proto_mode: str,
    host_mode: str,
    expected_proto: list[bytes],
    expected_host: list[bytes],
) -> None:
    """The client's fields come in odd spellings: in overwrite mode none of them may reach the
    app beside drainproxy's own value."""
    forwarded = {"x_forwarded_proto": proto_mode, "x_forwarded_host": host_mode}
    proxy = await launch_proxy(app.port, tmp_path_factory.mktemp("fwd"), {"forwarded": forwarded})
    path = f"/fwd-{proto_mode}-{host_mode}".encode()
    try:
        await request_once(
            proxy.port,
            b"GET %s HTTP/1.1\r\nHost: h.example\r\nX-FORWARDED-PROTO: https\r\n"
            b"x-forwarded-host: lb.example\r\nConnection: close\r\n\r\n" % path,
        )
    finally:
        proxy.stop()
    request = last(app, path)
    assert request.header(b"x-forwarded-proto") == expected_proto
    assert request.header(b"x-forwarded-host") == expected_host


@pytest.mark.parametrize(
    ("method", "retried"),
    [
        (b"HEAD", True),
        (b"OPTIONS", True),
        (b"PUT", True),
        (b"DELETE", True),
        (b"TRACE", True),
        (b"PATCH", False),
    ],
)
async def test_the_keep_alive_race_is_retried_for_every_idempotent_method(
    app: RawApp, proxy: ProxyProcess, method: bytes, retried: bool
) -> None:
    """RFC 9110 §9.2.2: a request whose method is idempotent goes again on a fresh connection
    when the app closed the pooled one without a byte of response; any other gets a 502."""
    path = b"/race-" + method.lower()

    @app.route(path)
    async def race(request: AppRequest, writer: Writer) -> bool:
        if request.sequence > 1:
            return False  # as if its idle timeout fired: close without answering
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return True

    before = len([r for r in app.requests if r.path == path])
    client = await RawClient.connect(proxy.port)
    await client.request(b"GET", b"/warm-up")  # leaves a pooled connection behind
    response = await client.request(method, path)
    await client.close()
    attempts = [r for r in app.requests if r.path == path][before:]
    if retried:
        assert response.status == 200
        assert [r.sequence > 1 for r in attempts] == [True, False], "pooled, then fresh"
        assert {r.method for r in attempts} == {method}
    else:
        assert response.status == 502
        assert len(attempts) == 1


async def test_a_304_without_content_length_has_no_body(app: RawApp, proxy: ProxyProcess) -> None:
    """RFC 9110 §15.4.5: a 304 never has content, so no length is needed to end it; the
    connection stays in step for the next exchange on both sides."""

    @app.route(b"/not-modified")
    async def not_modified(request: AppRequest, writer: Writer) -> bool:
        writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        return True

    client = await RawClient.connect(proxy.port)
    for _ in range(2):
        response = await client.request(b"GET", b"/not-modified")
        assert (response.status, response.body) == (304, b"")
        assert response.header(b"etag") == [b'"v1"']
        assert response.header(b"transfer-encoding") == []
        assert (await client.request(b"GET", b"/after")).body == b"/after"
    await client.close()


async def test_an_unregistered_status_with_an_empty_reason_passes(
    app: RawApp, proxy: ProxyProcess
) -> None:
    @app.route(b"/odd-status")
    async def odd(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 599 \r\nContent-Length: 2\r\n\r\nok")
        return True

    raw = await exchange(
        proxy.port, b"GET /odd-status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 599 \r\n")
    assert raw.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    ("name", "announced", "reused"),
    [
        ("none", [b"max=100"], True),
        ("one-field", [b"timeout=1, max=100"], False),
        ("first-field", [b"timeout=1", b"max=100"], False),
        ("second-field", [b"max=100", b"timeout=1"], False),
    ],
)
async def test_the_app_keep_alive_timeout_counts_in_any_of_several_fields(
    app: RawApp, proxy: ProxyProcess, name: str, announced: list[bytes], reused: bool
) -> None:
    """The app says it closes a connection idle for 1 s; with upstream.keep_alive_margin (1 s)
    that leaves no time to reuse it, so the next request takes another one. Several Keep-Alive
    fields are one list (RFC 9110 §5.3): the timeout counts wherever it is."""
    path = b"/keep-alive-" + name.encode()

    @app.route(path)
    async def announce(request: AppRequest, writer: Writer) -> bool:
        writer.write(response_bytes(200, b"ok", [(b"Keep-Alive", value) for value in announced]))
        return True

    client = await RawClient.connect(proxy.port)
    for _ in range(2):
        response = await client.request(b"GET", path)
        assert (response.status, response.body) == (200, b"ok")
        assert response.header(b"keep-alive") == [], "hop-by-hop"
    await client.close()
    first, second = (request.connection for request in app.requests if request.path == path)
    assert (first == second) is reused
