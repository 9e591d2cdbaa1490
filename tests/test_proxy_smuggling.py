"""Request smuggling: a table of ambiguous or invalid requests (CL.TE, TE.CL, TE.TE obfuscations,
chunk-size tricks, header syntax tricks). Each is refused (400, or 501 for a coding other than
chunked) before anything reaches the app, or (where it is in fact unambiguous) forwarded
re-framed so that the app sees exactly one request. In no case does the app see the hidden
second request."""

from __future__ import annotations

import asyncio

import pytest

from tests.proxy_support import (
    AppRequest,
    RawApp,
    RawClient,
    exchange,
    parse_responses,
)
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
CHUNK_WITH_SMUGGLED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)


def post(headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST /front HTTP/" + version + b"\r\nHost: h\r\n" + headers + b"\r\n" + body


REFUSED = {
    # RFC 9112 §3.2: an HTTP/1.1 request without Host is 400, absolute-form too (review).
    "absolute-form-without-host": b"GET http://a/front HTTP/1.1\r\n\r\n",
    # RFC 9112 §3.2.4: the asterisk-form is for OPTIONS only.
    "asterisk-form-get": b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
    # CL.TE and TE.CL: both framings present.
    "cl-te": post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
    "te-cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", CHUNK_WITH_SMUGGLED),
    "te-cl-other-order": post(
        b"Content-Length: 45\r\nTransfer-Encoding: chunked\r\n", CHUNK_WITH_SMUGGLED
    ),
    # TE.TE: obfuscated Transfer-Encoding one side might ignore.
    "te-xchunked": post(b"Transfer-Encoding: xchunked\r\n", CHUNK_WITH_SMUGGLED),
    "te-space-before-colon": post(b"Transfer-Encoding : chunked\r\n", CHUNK_WITH_SMUGGLED),
    "te-second-header": post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNK_WITH_SMUGGLED
    ),
    "te-chunked-then-identity": post(b"Transfer-Encoding: chunked, identity\r\n", SMUGGLED),
    "te-vertical-tab": post(b"Transfer-Encoding:\x0bchunked\r\n", CHUNK_WITH_SMUGGLED),
    "te-quoted": post(b'Transfer-Encoding: "chunked"\r\n', CHUNK_WITH_SMUGGLED),
    "te-obs-fold": post(b"Transfer-Encoding: identity\r\n chunked\r\n", CHUNK_WITH_SMUGGLED),
    "te-leading-space-line": post(b"X-A: 1\r\n Transfer-Encoding: chunked\r\n", SMUGGLED),
    "te-in-http10": post(b"Transfer-Encoding: chunked\r\n", CHUNK_WITH_SMUGGLED, b"1.0"),
    "te-gzip-only": post(b"Transfer-Encoding: gzip\r\n", SMUGGLED),
    "te-gzip-then-chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", CHUNK_WITH_SMUGGLED),
    # Content-Length tricks.
    "cl-differing": post(b"Content-Length: 0\r\nContent-Length: 37\r\n", SMUGGLED),
    "cl-list": post(b"Content-Length: 0, 37\r\n", SMUGGLED),
    "cl-plus": post(b"Content-Length: +37\r\n", SMUGGLED),
    "cl-negative": post(b"Content-Length: -1\r\n", SMUGGLED),
    "cl-hex": post(b"Content-Length: 0x25\r\n", SMUGGLED),
    "cl-overflow": post(b"Content-Length: 184467440737095516160\r\n", SMUGGLED),
    "cl-space-before-colon": post(b"Content-Length : 37\r\n", SMUGGLED),
    # Chunk-size and chunk-framing tricks.
    "chunk-size-hex-prefix": post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-plus": post(b"Transfer-Encoding: chunked\r\n", b"+5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-negative": post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-space": post(b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(
        b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-too-long": post(
        b"Transfer-Encoding: chunked\r\n", b"2\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk-missing-crlf": post(
        b"Transfer-Encoding: chunked\r\n", b"5\r\nhello0\r\n\r\n" + SMUGGLED
    ),
    "chunk-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n" + SMUGGLED),
    "chunk-extension-bad": post(
        b"Transfer-Encoding: chunked\r\n", b'5;a="open\r\nhello\r\n0\r\n\r\n' + SMUGGLED
    ),
    "chunk-extension-nul": post(
        b"Transfer-Encoding: chunked\r\n", b"5;a\x00=b\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    # Head syntax.
    "obs-fold": b"GET /front HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n",
    "bare-cr-in-value": b"GET /front HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
    "bare-cr-line-end": b"GET /front HTTP/1.1\rHost: h\r\n\r\n",
    "nul-in-value": b"GET /front HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    "control-in-name": b"GET /front HTTP/1.1\r\nHost: h\r\nX\x01A: b\r\n\r\n",
    "space-in-name": b"GET /front HTTP/1.1\r\nHost: h\r\nX A: b\r\n\r\n",
    "no-colon": b"GET /front HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",
    "two-hosts": b"GET /front HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no-host": b"GET /front HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "bad-method": b"G(T /front HTTP/1.1\r\nHost: h\r\n\r\n",
    "lowercase-method": b"get /front HTTP/1.1\r\nHost: h\r\n\r\n",
    "space-in-target": b"GET /front /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    "control-in-target": b"GET /front\x7f HTTP/1.1\r\nHost: h\r\n\r\n",
    "bad-version": b"GET /front HTTP/1.x\r\nHost: h\r\n\r\n",
    "http09": b"GET /front\r\n\r\n",
    # A body on GET (limits.get_head_body: refuse, the default; see tests/test_corpus.py).
    "get-with-body": b"GET /front HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
    % (len(SMUGGLED), SMUGGLED),
}

#: Unambiguous after all: forwarded, re-framed, as exactly one request.
FORWARDED = {
    "te-tab-before-value": post(b"Transfer-Encoding:\tchunked\r\n", CHUNK_WITH_SMUGGLED),
    "te-mixed-case": post(b"transfer-encoding: cHuNkEd\r\n", CHUNK_WITH_SMUGGLED),
    "connection-names-content-length": post(
        b"Connection: Content-Length\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED
    ),
    "connection-names-host": b"GET /front HTTP/1.1\r\nHost: h\r\nConnection: host\r\n\r\n",
    # llhttp accepts extra spaces in the request line; the app gets a normalised one.
    "double-space": b"GET  /front HTTP/1.1\r\nHost: h\r\n\r\n",
}


def smuggled(app: RawApp) -> list[bytes]:
    return [r.target for r in app.requests if b"smuggled" in r.target]


@pytest.mark.parametrize("name", list(REFUSED))
async def test_ambiguous_request_is_refused(app: RawApp, proxy: ProxyProcess, name: str) -> None:
    before = len(app.requests)
    raw = await exchange(proxy.port, REFUSED[name])
    (response,) = parse_responses(raw, [b"POST"])
    assert response.status in (400, 501, 505), response
    assert response.header(b"connection") == [b"close"]
    # A head is streamed to the app before a broken body is found: then the app sees that
    # one request, aborted. Never anything after it (checked for all cases at the end too).
    assert [r.path for r in app.requests[before:]] in ([], [b"/front"])
    assert smuggled(app) == []


@pytest.mark.parametrize("name", list(FORWARDED))
async def test_unambiguous_request_reaches_the_app_as_one(
    app: RawApp, proxy: ProxyProcess, name: str
) -> None:
    before = len(app.requests)
    payload = FORWARDED[name]
    raw = await exchange(
        proxy.port, payload + b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    method = payload.split(b" ", 1)[0]
    responses = parse_responses(raw, [method, b"GET"])
    assert [response.status for response in responses] == [200, 200]
    seen = app.requests[before:]
    assert [r.path for r in seen] == [b"/front", b"/last"]
    front = seen[0]
    assert front.header(b"host") == [b"h"]
    if SMUGGLED in payload:
        assert front.body == SMUGGLED
    assert smuggled(app) == []


async def test_response_cannot_drop_its_own_framing(app: RawApp, proxy: ProxyProcess) -> None:
    """The app's response names Content-Length in Connection: the client still gets it, so the
    next response on the connection is not read as this one's body."""

    @app.route(b"/front-response")
    async def naming(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
        )
        return True

    client = await RawClient.connect(proxy.port)
    response = await client.request(b"GET", b"/front-response")
    assert (response.body, response.header(b"content-length")) == (b"hello", [b"5"])
    assert (await client.request(b"GET", b"/front")).body == b"/front"
    await client.close()


async def test_app_never_saw_a_smuggled_request(app: RawApp, proxy: ProxyProcess) -> None:
    """Once every app connection has been read to its end, nothing smuggled is among them."""
    proxy.stop()
    await app.wait_for(lambda: app.open_connections == 0)
    assert smuggled(app) == []
    assert all(r.path in (b"/front", b"/last", b"/front-response") for r in app.requests)
