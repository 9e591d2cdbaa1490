"""Random and mutated requests through the proxy, for a bounded number of examples: the proxy
never crashes, every connection ends (with answers, then a close), answers are well-formed, and
the proxy keeps serving. Hypothesis drives blocking sockets in a worker thread while the app
runs in the test's event loop."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import StartProxy
from tests.proxy_support import RawApp, exchange, parse_responses

TEMPLATES = [
    b"GET /a?q=1 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\n\r\n",
    b"GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD /e HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
    b"GET /f HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"PUT /g HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
]
SENTINEL = b"GET /sentinel HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
#: Bytes that matter to HTTP/1.1 framing, so mutations hit the interesting places.
SPECIAL = [
    b"\r\n",
    b"\r",
    b"\n",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"0",
    b"f",
    b"-",
    b"+",
    b'"',
    b"chunked",
    b"Content-Length: ",
    b"Transfer-Encoding: ",
    b"Host: ",
    b"\r\n\r\n",
    b"99999999999999999999",
    b"HTTP/1.1",
    b"GET / HTTP/1.1\r\n",
]

fragment = st.one_of(st.sampled_from(SPECIAL), st.binary(min_size=1, max_size=8))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        if kind == "insert":
            data[at:at] = draw(fragment)
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 6))]
        elif kind == "replace" and at < len(data):
            data[at : at + 1] = draw(fragment)
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 20))]
    return bytes(data)


@st.composite
def connection_input(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """What one client sends, in the pieces it sends it, and whether it then half-closes."""
    if draw(st.integers(0, 9)) == 0:
        payload = draw(st.binary(max_size=300))
    else:
        payload = b"".join(draw(st.lists(mutated(), min_size=1, max_size=3)))
    if draw(st.booleans()):
        payload += SENTINEL
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    return [piece for piece in pieces if piece], draw(st.booleans())


def run_one(port: int, pieces: list[bytes], half_close: bool) -> bytes:
    """Send, then read until the proxy closes; fail if it neither answers nor closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy may close early (a 400) while we still send
        received = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no close within 10s after {pieces!r}") from None
            if not data:
                break
            received += data
        return bytes(received)


async def test_fuzzed_requests_never_break_the_proxy(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        raw_app.port,
        {
            "timeouts": {"request_head": "300ms", "client_body": "300ms", "client_idle": "300ms"},
            "upstream": {"response_timeout": "2s"},
        },
    )
    statuses: Counter[bytes] = Counter()

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(connection_input())
    def fuzz(case: tuple[list[bytes], bool]) -> None:
        pieces, half_close = case
        received = run_one(proxy.port, pieces, half_close)
        assert proxy.proc.poll() is None, "the proxy died"
        if received:
            assert received.startswith(b"HTTP/1.1 "), received[:200]
            statuses[received[9:10] + b"xx"] += 1

    await asyncio.to_thread(fuzz)
    assert statuses[b"2xx"] and statuses[b"4xx"], statuses
    raw = await exchange(proxy.port, SENTINEL)
    assert parse_responses(raw, [b"GET"])[0].status == 200
    log = proxy.log.text()
    assert "Traceback" not in log and "internal error" not in log
    for request in raw_app.requests:  # whatever came in, what went out is strictly valid
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(request.raw_head)
        assert isinstance(conn.next_event(), h11.Request), request.raw_head
