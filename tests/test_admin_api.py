"""The admin API's HTTP (h11 over asyncio streams) against a real drainproxy process: routing
(404, 405 with Allow, HEAD), keep-alive and pipelining, HTTP/1.0, the bounds on a request's
size and time (400, 408, 413, 431, 501), Expect: 100-continue."""

from __future__ import annotations

import asyncio
import json

import pytest

from drainproxy.control.admin import MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_HEAD_BYTES
from tests.proxy_support import RawClient, exchange, parse_responses
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")


def admin_port(proxy: ProxyProcess) -> int:
    return int(proxy.admin_url.rpartition(":")[2])


async def test_unknown_path_is_404_and_the_connection_stays_usable(proxy: ProxyProcess) -> None:
    client = await RawClient.connect(admin_port(proxy))
    try:
        missing = await client.request(b"GET", b"/nope")
        assert missing.status == 404
        live = await client.request(b"GET", b"/live")
        assert (live.status, live.body) == (200, b"live\n")
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        (b"POST", b"/ready", b"GET, HEAD"),
        (b"DELETE", b"/metrics", b"GET, HEAD"),
        (b"GET", b"/drain", b"POST"),
        (b"POST", b"/prestop", b"GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_naming_the_allowed_ones(
    proxy: ProxyProcess, method: bytes, path: bytes, allow: bytes
) -> None:
    client = await RawClient.connect(admin_port(proxy))
    try:
        response = await client.request(method, path)
        assert response.status == 405
        assert response.header(b"allow") == [allow]
    finally:
        await client.close()
    assert (await proxy.status())["phase"] == "serving"  # nothing was triggered


async def test_head_answers_the_get_head_without_a_body(proxy: ProxyProcess) -> None:
    raw = await exchange(
        admin_port(proxy), b"HEAD /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    (response,) = parse_responses(raw, [b"HEAD"])
    assert response.status == 200
    assert response.header(b"content-length") == [b"5"]
    assert raw.endswith(b"\r\n\r\n")  # no body bytes after the head


async def test_pipelined_requests_are_answered_in_order(proxy: ProxyProcess) -> None:
    requests = b"".join(
        b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path for path in (b"/live", b"/nope", b"/ready")
    )
    raw = await exchange(
        admin_port(proxy),
        requests + b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    responses = parse_responses(raw, [b"GET"] * 4)
    assert [response.status for response in responses] == [200, 404, 200, 200]
    assert responses[3].header(b"content-type") == [b"application/json; charset=utf-8"]
    assert json.loads(responses[3].body)["phase"] == "serving"


async def test_absolute_form_targets_are_routed_by_their_path(proxy: ProxyProcess) -> None:
    raw = await exchange(
        admin_port(proxy),
        b"GET http://admin.example:9901/live?x=1 HTTP/1.1\r\nHost: admin.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    (response,) = parse_responses(raw, [b"GET"])
    assert (response.status, response.body) == (200, b"live\n")


async def test_http_1_0_gets_its_answer_and_a_close(proxy: ProxyProcess) -> None:
    raw = await exchange(admin_port(proxy), b"GET /live HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\nlive\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
        (b"GET /live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
async def test_a_malformed_or_oversized_head_is_refused_and_closed(
    proxy: ProxyProcess, request_bytes: bytes, status: int
) -> None:
    raw = await exchange(admin_port(proxy), request_bytes)  # returns once the admin closes
    (response,) = parse_responses(raw, [b"GET"])
    assert response.status == status
    assert response.header(b"connection") == [b"close"]
    live = await RawClient.connect(admin_port(proxy))  # and everyone else is still served
    try:
        assert (await live.request(b"GET", b"/live")).status == 200
    finally:
        await live.close()


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 16 * MAX_BODY_BYTES])
async def test_a_body_above_the_limit_is_413_and_starts_no_drain(
    proxy: ProxyProcess, size: int
) -> None:
    """Also when the client is still sending: the 413 must not be lost to a reset."""
    body = b"x" * size
    head = b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    raw = await exchange(admin_port(proxy), head + body)
    (response,) = parse_responses(raw, [b"POST"])
    assert response.status == 413
    assert (await proxy.status())["drain"] is None


async def test_expect_100_continue_is_answered_before_the_body(proxy: ProxyProcess) -> None:
    """A client that waits for 100 Continue gets it; here on a path answered 404 after the
    body, so the module's proxy keeps serving."""
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port(proxy))
    try:
        writer.write(
            b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 404 ")


async def test_a_request_slower_than_the_bound_gets_408(proxy: ProxyProcess) -> None:
    """A head that never ends (slowloris) is answered 408 and closed (after REQUEST_TIMEOUT,
    10 s: the test waits for the answer, bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port(proxy))
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")


async def test_a_flood_of_silent_connections_does_not_lock_the_probes_out(
    proxy: ProxyProcess,
) -> None:
    """MAX_CONNECTIONS silent connections (anyone who reaches the admin port can open them):
    a probe that comes next is still answered, as the oldest idle connection makes room, and
    the flood's first connection is the one closed (review finding: /live and /ready failed)."""
    held = [await RawClient.connect(admin_port(proxy)) for _ in range(MAX_CONNECTIONS)]
    try:
        # Each probe is answered on its own connection, however many silent ones are open.
        for _ in range(3):
            probe = await RawClient.connect(admin_port(proxy))
            try:
                assert (await probe.request(b"GET", b"/live")).status == 200
            finally:
                await probe.close()
        assert await held[0].closed_by_peer()
    finally:
        for client in held:
            await client.close()


async def test_a_silent_new_connection_is_closed_after_the_request_bound(
    proxy: ProxyProcess,
) -> None:
    """A connection that never sends a byte is closed after REQUEST_TIMEOUT (10 s), not kept for
    the keep-alive idle time (75 s); the test waits for the close, bounded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port(proxy))
    try:
        assert await asyncio.wait_for(reader.read(-1), 30) == b""
    finally:
        writer.close()
