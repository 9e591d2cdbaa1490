"""The smuggling and desync corpus (issue 11): one row per class of input, each run through the
real drainproxy process in front of an app that reads what it receives both with h11 and with
a deliberately lenient reader (tests/recording_app.py).

A row fails when:
- a client does not get the statuses (and, for the app's answers, the body: its own target)
  the RFC calls for;
- h11 and the lenient reader disagree on the number or the boundaries of the requests on any
  app connection, or either of them reads a request drainproxy did not mean to forward;
- after the row, a following request on the same connection (when it stays open) or from
  another client does not get its own answer.

``/R/`` in a row stands for ``/r/<row name>/``: each row's requests are told apart by target."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import pytest_asyncio

from tests.proxy_support import Response, ResponseAssembly, launch_proxy, next_event
from tests.recording_app import RecordingApp, SeenRequest
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: (status, body): body None is not checked; an answer from the app echoes its target.
Answer = tuple[int, bytes | None]
#: (method, target, body) of a request the app should read.
Seen = tuple[bytes, bytes, bytes]

#: A hidden request in a body; bodies are not expanded (their lengths are counted).
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
CHUNKED_SMUGGLED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
NEXT = b"GET /R/next HTTP/1.1\r\nHost: h\r\n\r\n"


@dataclass(frozen=True)
class Row:
    #: One payload per client connection, sent in order (the next before the answers).
    send: tuple[bytes, ...]
    #: What each connection gets back, in order.
    answers: tuple[tuple[Answer, ...], ...]
    #: What the app reads (both readers), in any order across connections.
    app_sees: tuple[Seen, ...] = ()
    #: The app's answer to ``/R/s``, byte for byte.
    script: bytes | None = None
    #: A further check of the requests as the lenient reader saw them.
    check: Callable[[list[SeenRequest]], None] | None = None


def ok(target: bytes) -> Answer:
    return (200, target)


def request(head: bytes, body: bytes = b"") -> bytes:
    return head + b"\r\n\r\n" + body


def refused(payload: bytes, status: int = 400) -> Row:
    """A request refused before anything of it reaches the app; the one pipelined after it
    is not read either."""
    return Row((payload + NEXT,), (((status, None),),))


def forwarded(payload: bytes, method: bytes, body: bytes = b"") -> Row:
    """A request forwarded as exactly one request, and the one pipelined after it as another."""
    return Row(
        (payload + NEXT,),
        ((ok(b"/R/a"), ok(b"/R/next")),),
        ((method, b"/R/a", body), (b"GET", b"/R/next", b"")),
    )


def scripted(response: bytes, answer: Answer, *, method: bytes = b"GET") -> Row:
    """The app answers ``/R/s`` with ``response``; the client pipelines ``/R/next`` behind it."""
    return Row(
        (request(method + b" /R/s HTTP/1.1\r\nHost: h") + NEXT,),
        ((answer, ok(b"/R/next")),),
        ((method, b"/R/s", b""), (b"GET", b"/R/next", b"")),
        script=response,
    )


def upgrade_poison_rows() -> tuple[bytes, bytes]:
    """Issue 11 item 1, verbatim: an Upgrade request announcing 130 body bytes, then a POST
    whose head as forwarded to the app is exactly 130 bytes, its body a hidden request."""
    poison = request(
        b"GET /poison HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
        b"Content-Length: 130"
    )
    forwarded_fields = (
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n"
    )
    head = b"POST /r/upgrade-with-body/attack HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n" % len(
        SMUGGLED
    )
    pad = 130 - len(head) - len(forwarded_fields) - len(b"X-Pad: \r\n\r\n")
    attack = head + b"X-Pad: " + b"p" * pad + b"\r\n\r\n" + SMUGGLED
    return poison, attack


POISON, ATTACK = upgrade_poison_rows()


def sees_headers(fields: dict[bytes, list[bytes]]) -> Callable[[list[SeenRequest]], None]:
    """The row's request ``/R/a`` reaches the app with these fields as the lenient reader (a
    WSGI app: ``_`` read as ``-``) sees them."""

    def check(requests: list[SeenRequest]) -> None:
        (front,) = [seen for seen in requests if seen.target.endswith(b"/a")]
        assert {name: front.headers.get(name) for name in fields} == fields, front.headers

    return check


ROWS: dict[str, Row] = {
    # --- classes that passed before issue 11 -------------------------------------------------
    "cl-te": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked",
                b"0\r\n\r\n" + SMUGGLED)
    ),
    "te-cl": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4",
                CHUNKED_SMUGGLED)
    ),
    "cl-duplicate-differing": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 38",
                SMUGGLED)
    ),
    "cl-negative": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: -1", SMUGGLED)
    ),
    "cl-hex": refused(request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 0x26", SMUGGLED)),
    "bare-lf": refused(b"GET /R/a HTTP/1.1\nHost: h\nContent-Length: 0\n\n"),
    "obs-fold": refused(request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded")),
    "chunk-size-0x": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked",
                b"0x5\r\nhello\r\n0\r\n\r\n")
    ),
    "chunk-size-too-small": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked",
                b"2\r\nhello\r\n0\r\n\r\n" + SMUGGLED)
    ),
    "chunk-bare-lf": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked",
                b"5\nhello\n0\n\n" + SMUGGLED)
    ),
    "te-not-chunked-last": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity", SMUGGLED)
    ),
    "te-other-coding": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked",
                CHUNKED_SMUGGLED),
        501,
    ),
    "chunked-forwarded": forwarded(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked", CHUNKED_SMUGGLED),
        b"POST",
        SMUGGLED,
    ),
    "interim-103": scripted(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        (200, b"ok"),
    ),
    "unrequested-101": scripted(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
        (502, None),
    ),
    "response-cl-te": scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        (502, None),
    ),
    "response-cl-differing": scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", (502, None)
    ),
    "response-bare-lf": scripted(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", (502, None)),
    "response-obs-fold": scripted(
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok", (502, None)
    ),
    "response-chunked-twice": scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        (502, None),
    ),
    "response-content_length": scripted(
        b"HTTP/1.1 200 OK\r\nContent_Length: 9\r\nContent-Length: 2\r\n\r\nok", (200, b"ok")
    ),
    # --- 1. Upgrade with a body ---------------------------------------------------------------
    "upgrade-with-body": Row(
        (POISON, ATTACK),
        (((400, None),), (ok(b"/R/attack"),)),
        ((b"POST", b"/R/attack", SMUGGLED),),
    ),
    "upgrade-chunked-body": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
                b"Transfer-Encoding: chunked", CHUNKED_SMUGGLED)
    ),
    # The app answers an Upgrade request 200 and stops reading HTTP on that connection: the
    # connection must not go back to the pool (the next client would wait, then get a 504).
    "upgrade-app-switches": Row(
        (request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x"),),
        ((ok(b"/R/a"),),),
        ((b"GET", b"/R/a", b""),),
    ),
    # --- 2. bytes past the end of a response --------------------------------------------------
    "bytes-after-length": scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nX-Injected: ",
        (200, b"ok"),
    ),
    "bytes-after-204": scripted(
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nX-Injected: ", (204, b"")
    ),
    "bytes-after-304": scripted(
        b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nX-Injected: ", (304, b"")
    ),
    "bytes-after-head": scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nX-Injected: ",
        (200, b""),
        method=b"HEAD",
    ),
    "bytes-after-chunked": scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Injected: ",
        (200, b"ok"),
    ),
    # --- 3. look-alike names ------------------------------------------------------------------
    "content_length": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent_Length: 38", SMUGGLED)
    ),
    "content_length-on-get": refused(
        request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nContent_Length: 38", SMUGGLED)
    ),
    "transfer_encoding": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nTransfer_Encoding: chunked"
                % len(CHUNKED_SMUGGLED), CHUNKED_SMUGGLED)
    ),
    "transfer---encoding": refused(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nTransfer---Encoding: chunked", CHUNKED_SMUGGLED)
    ),
    "x_forwarded_for": Row(
        (request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 10.9.9.9"),),
        ((ok(b"/R/a"),),),
        ((b"GET", b"/R/a", b""),),
        check=sees_headers({b"x-forwarded-for": [b"127.0.0.1"]}),
    ),
    "x_forwarded_proto": Row(
        (request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nX_Forwarded_Proto: https"),),
        ((ok(b"/R/a"),),),
        ((b"GET", b"/R/a", b""),),
        check=sees_headers({b"x-forwarded-proto": [b"http"]}),
    ),
    "x_forwarded_host": Row(
        (request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nX_Forwarded_Host: evil.example"),),
        ((ok(b"/R/a"),),),
        ((b"GET", b"/R/a", b""),),
        check=sees_headers({b"x-forwarded-host": [b"h"]}),
    ),
    # --- 4. Content-Length in canonical decimal -----------------------------------------------
    "cl-leading-zero": forwarded(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 010", b"0123456789"),
        b"POST",
        b"0123456789",
    ),
    "cl-many-zeros": forwarded(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 00000000000000000005", b"hello"),
        b"POST",
        b"hello",
    ),
    "response-cl-leading-zero": scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 002\r\n\r\nok", (200, b"ok")
    ),
    # --- 5. Host --------------------------------------------------------------------------------
    "host-list": refused(request(b"GET /R/a HTTP/1.1\r\nHost: a, evil.example")),
    "host-userinfo-path": refused(request(b"GET /R/a HTTP/1.1\r\nHost: good@evil.example/x")),
    "host-non-ascii": refused(request(b"GET /R/a HTTP/1.1\r\nHost: \xffa\xff")),
    "absolute-form": Row(
        (request(b"GET http://evil.example/R/a HTTP/1.1\r\nHost: good.example"),),
        ((ok(b"http://evil.example/R/a"),),),
        ((b"GET", b"http://evil.example/R/a", b""),),
        check=sees_headers({b"host": [b"evil.example"], b"x-forwarded-host": [b"evil.example"]}),
    ),
    "absolute-form-userinfo": refused(
        request(b"GET http://good.example@evil.example/R/a HTTP/1.1\r\nHost: good.example")
    ),
    # --- 6. GET and HEAD with a body (limits.get_head_body: refuse) ---------------------------
    "get-with-length": refused(
        request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: %d" % len(SMUGGLED), SMUGGLED)
    ),
    "get-chunked": refused(
        request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked", CHUNKED_SMUGGLED)
    ),
    "head-with-length": refused(
        request(b"HEAD /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: %d" % len(SMUGGLED), SMUGGLED)
    ),
    "get-length-zero": forwarded(
        request(b"GET /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 0"), b"GET"
    ),
    # --- 7. valid messages accepted -----------------------------------------------------------
    "cl-trailing-ows": forwarded(
        request(b"POST /R/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5 ", b"hello"), b"POST", b"hello"
    ),
    "response-cl-trailing-ows": scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2 \r\n\r\nok", (200, b"ok")
    ),
    # --- 8. invalid responses -----------------------------------------------------------------
    "status-099": scripted(b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", (502, None)),
    "status-600": scripted(b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n", (502, None)),
    "reason-control": scripted(b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", (502, None)),
    "cl-on-100": scripted(
        b"HTTP/1.1 100 Continue\r\nContent-Length: 2\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        (502, None),
    ),
    "cl-on-204": scripted(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n", (204, b"")
    ),
}  # fmt: skip


# --- the run -----------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def recording_app() -> AsyncIterator[RecordingApp]:
    scripts = {
        b"/r/%s/s" % name.encode(): row.script
        for name, row in ROWS.items()
        if row.script is not None
    }
    app = RecordingApp(scripts)
    await app.start()
    yield app
    await app.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def corpus_proxy(
    recording_app: RecordingApp, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ProxyProcess]:
    overrides: Mapping[str, Any] = {"upstream": {"response_timeout": "20s"}}
    process = await launch_proxy(recording_app.port, tmp_path_factory.mktemp("corpus"), overrides)
    yield process
    process.stop()


async def read_answers(
    reader: asyncio.StreamReader, methods: list[bytes], timeout: float = 10.0
) -> list[Response]:
    """The responses to ``methods`` as h11 reads them, until all came or the proxy closed."""
    conn = h11.Connection(h11.CLIENT)
    responses: list[Response] = []
    for method in methods:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is not h11.IDLE:
            break
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"h")]))
        conn.send(h11.EndOfMessage())
        assembly = ResponseAssembly()
        while True:
            event = next_event(conn)
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), timeout))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return responses
            if response := assembly.add(event):
                responses.append(response)
                break
    return responses


def expand(data: bytes, name: str) -> bytes:
    return data.replace(b"/R/", b"/r/%s/" % name.encode())


def first_method(payload: bytes) -> bytes:
    return payload.split(b" ", 1)[0]


async def get(port: int, target: bytes) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)
        (response,) = await read_answers(reader, [b"GET"])
        return response
    finally:
        writer.close()


@pytest.mark.parametrize("name", list(ROWS))
async def test_corpus_row(
    name: str, recording_app: RecordingApp, corpus_proxy: ProxyProcess
) -> None:
    row = ROWS[name]
    port = corpus_proxy.port
    await recording_app.end_connections()  # rows do not share app connections
    first = len(recording_app.streams)
    connections = []
    for payload in row.send:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(expand(payload, name))
        connections.append((reader, writer))
    try:
        last: list[Response] = []
        for (reader, _), answers, payload in zip(connections, row.answers, row.send, strict=True):
            methods = [first_method(payload)] + [b"GET"] * (len(answers) - 1)
            got = await read_answers(reader, methods)
            assert [r.status for r in got] == [status for status, _ in answers], got
            for response, (_, body) in zip(got, answers, strict=True):
                assert not response.header(b"x-injected")
                if body is not None:
                    assert response.body == expand(body, name), response
            last = got
        follow = [(b"GET", b"/R/other", b"")]
        reader, writer = connections[-1]
        if last and last[-1].header(b"connection") != [b"close"]:
            # A following request on the same connection gets its own answer.
            writer.write(expand(b"GET /R/same HTTP/1.1\r\nHost: h\r\n\r\n", name))
            (same,) = await read_answers(reader, [b"GET"])
            assert (same.status, same.body) == (200, expand(b"/R/same", name))
            follow.append((b"GET", b"/R/same", b""))
        other = await get(port, expand(b"/R/other", name))
        assert (other.status, other.body) == (200, expand(b"/R/other", name))
    finally:
        for _, writer in connections:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    lenient = recording_app.lenient_view(first)
    strict = recording_app.strict_view(first)
    for stream_lenient, (stream_strict, error) in zip(lenient, strict, strict=True):
        assert error is None, (error, stream_strict)
        assert stream_strict == stream_lenient
    marker = b"/r/%s/" % name.encode()
    seen = [r for stream in lenient for r in stream if marker in r.target]
    expected = [
        SeenRequest(method, expand(target, name), expand(body, name))
        for method, target, body in (*row.app_sees, *follow)
    ]
    assert sorted(seen, key=repr) == sorted(expected, key=repr)
    assert not [r for stream in lenient for r in stream if b"smuggled" in r.target]
    if row.check is not None:
        row.check(seen)
