"""Framing through the real proxy where h11 cannot be the client's reader (transfer codings
other than chunked), and the ``limits.get_head_body`` switch (issue 11 items 6 and 8)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartProxy
from tests.proxy_support import AppRequest, RawApp, RawClient, exchange


def split_head(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields.setdefault(name.lower(), []).append(value.strip())
    return status_line, fields, rest


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """The payload of a chunked body, and what follows its last chunk."""
    payload = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert data.startswith(b"\r\n"), data
            return bytes(payload), data[2:]
        payload += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


async def test_coding_below_chunked_stays_labelled_and_rechunked(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """``gzip, chunked``: the client gets the coded payload labelled ``gzip, chunked``, not an
    unlabelled gzip body, and the connection stays usable."""

    @raw_app.route(b"/coded")
    async def coded(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"4\r\n\x1f\x8b\x08\x00\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        return True

    proxy = await start_proxy(raw_app.port)
    raw = await exchange(
        proxy.port,
        b"GET /coded HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n"
        b"Connection: close\r\n\r\n",
    )
    status_line, fields, rest = split_head(raw)
    assert status_line == b"HTTP/1.1 200 OK"
    assert fields[b"transfer-encoding"] == [b"gzip, chunked"]
    payload, rest = dechunk(rest)
    assert payload == b"\x1f\x8b\x08\x00abc"
    status_line, fields, body = split_head(rest)
    assert (status_line, body) == (b"HTTP/1.1 200 X", b"/next")


@pytest.mark.parametrize("coding", [b"chunked, gzip", b"gzip"])
async def test_coding_after_chunked_is_close_delimited_and_labelled(
    raw_app: RawApp, start_proxy: StartProxy, coding: bytes
) -> None:
    """RFC 9112 §6.3: a response whose last coding is not chunked ends at the close; so it does
    for the client, with the codings named, byte for byte."""
    body = b"2\r\nok\r\n0\r\n\r\n\x1f\x8b-coded"

    @raw_app.route(b"/coded")
    async def coded(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n" + body)
        return False  # the close ends the body

    proxy = await start_proxy(raw_app.port)
    raw = await exchange(proxy.port, b"GET /coded HTTP/1.1\r\nHost: h\r\n\r\n")
    status_line, fields, rest = split_head(raw)
    assert status_line == b"HTTP/1.1 200 OK"
    assert fields[b"transfer-encoding"] == [coding]
    assert fields[b"connection"] == [b"close"]
    assert b"content-length" not in fields
    assert rest == body


async def test_coding_for_an_http10_client_is_502(raw_app: RawApp, start_proxy: StartProxy) -> None:
    """An HTTP/1.0 client cannot be sent Transfer-Encoding (RFC 9112 §6.1), and without it the
    coding would be unlabelled."""

    @raw_app.route(b"/coded")
    async def coded(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        return True

    proxy = await start_proxy(raw_app.port)
    raw = await exchange(proxy.port, b"GET /coded HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 502 ")


async def test_get_and_head_bodies_forwarded_when_allowed(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """``limits.get_head_body: forward``, for apps that read GET bodies: the body goes with its
    request, framed, and the next request is its own."""
    proxy = await start_proxy(raw_app.port, {"limits": {"get_head_body": "forward"}})
    client = await RawClient.connect(proxy.port)
    try:
        response = await client.request(b"GET", b"/search", body=b'{"q": 1}')
        assert (response.status, response.body) == (200, b"/search")
        response = await client.request(b"HEAD", b"/probe", body=b"xy")
        assert response.status == 200
        response = await client.request(b"GET", b"/after")
        assert (response.status, response.body) == (200, b"/after")
    finally:
        await client.close()
    seen = [(r.method, r.path, r.body) for r in raw_app.requests]
    assert seen == [
        (b"GET", b"/search", b'{"q": 1}'),
        (b"HEAD", b"/probe", b"xy"),
        (b"GET", b"/after", b""),
    ]


async def test_get_body_refused_by_default_names_the_switch(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port)
    raw = await exchange(
        proxy.port, b"GET /search HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nxy"
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"GET request with a body (limits.get_head_body)" in raw
    assert raw_app.requests == []


async def test_connect_is_405_not_a_malformed_target(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port)
    raw = await exchange(
        proxy.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 405 ")
    assert raw_app.requests == []


async def test_look_alike_forwarding_field_never_reaches_a_wsgi_app(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """Issue 11 item 3: with ``x_forwarded_proto: overwrite`` a WSGI app (``_`` read as ``-``)
    saw ``https,http``; the look-alike is dropped, so it sees only drainproxy's value."""
    proxy = await start_proxy(raw_app.port, {"forwarded": {"x_forwarded_proto": "overwrite"}})
    raw = await exchange(
        proxy.port,
        b"GET /p HTTP/1.1\r\nHost: h\r\nX_Forwarded_Proto: https\r\nX_Forwarded_For: 10.0.0.9\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    (seen,) = raw_app.requests
    as_wsgi = {name.lower().replace(b"_", b"-") for name, _ in seen.headers}
    assert as_wsgi >= {b"x-forwarded-proto", b"x-forwarded-for"}
    assert seen.header(b"x-forwarded-proto") == [b"http"]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert not [name for name, _ in seen.headers if b"_" in name]


async def test_bytes_after_a_response_on_a_pooled_connection_end_it(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """Issue 11 item 2, the other path: the unasked bytes come in a later write, while the
    connection waits in the pool. They end it; the next request gets a fresh connection and
    its own answer, not the injected one."""
    answered = asyncio.Event()

    @raw_app.route(b"/first")
    async def first(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await answered.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\nContent-Length: 6\r\n\r\ninject")
        return True

    proxy = await start_proxy(raw_app.port)
    client = await RawClient.connect(proxy.port)
    try:
        response = await client.request(b"GET", b"/first")
        assert (response.status, response.body) == (200, b"ok")
        answered.set()
        await raw_app.wait_for(lambda: raw_app.disconnects >= 1)  # drainproxy closed it
        response = await client.request(b"GET", b"/second")
        assert (response.status, response.body) == (200, b"/second")
        assert not response.header(b"x-injected")
    finally:
        await client.close()
    first_seen, second_seen = raw_app.requests
    assert (first_seen.path, second_seen.path) == (b"/first", b"/second")
    assert second_seen.connection != first_seen.connection
