"""``upstream.protocol: h2c`` with plain HTTP clients: HTTP/1.1 requests carried as streams to an
HTTP/2 app (bodies both ways, framing translated), and HTTP/2 clients with trailers."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme

from tests.h2_app import H2App
from tests.h2_support import H2TestClient
from tests.proxy_support import RawClient, launch_proxy, parse_responses
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1 << 20


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def h2_app() -> AsyncIterator[H2App]:
    app = H2App()
    await app.start()
    yield app
    await app.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def proxy(
    h2_app: H2App, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ProxyProcess]:
    process = await launch_proxy(
        h2_app.port, tmp_path_factory.mktemp("proxy"), {"upstream": {"protocol": "h2c"}}
    )
    yield process
    process.stop()


async def test_http1_requests_reach_an_h2c_app(h2_app: H2App, proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    for path in (b"/first", b"/second"):  # one keep-alive connection, two streams
        response = await client.request(target=path, headers=[(b"X-Trace", b"t")])
        assert (response.status, response.body) == (200, path)
    await client.close()
    request = next(r for r in h2_app.requests if r.header(b":path") == b"/first")
    assert request.header(b":authority") == b"test"
    assert request.header(b":method") == b"GET"
    assert request.header(b"x-trace") == b"t"
    assert request.header(b"x-forwarded-for") == b"127.0.0.1"
    assert request.header(b"connection") is None


async def test_chunked_upload_becomes_data_frames(h2_app: H2App, proxy: ProxyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = b"u" * MiB
    for _ in range(3):
        writer.write(b"%x\r\n" % len(block) + block + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-body-size: %d\r\n" % (3 * MiB) in head.lower()
    writer.close()
    request = next(r for r in h2_app.requests if r.header(b":path") == b"/upload")
    assert request.header(b"transfer-encoding") is None


async def test_response_without_length_is_chunked_for_http1(proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    response = await client.request(target=b"/big?%d" % (4 * MiB))
    assert response.status == 200
    assert response.header(b"transfer-encoding") == [b"chunked"]
    assert len(response.body) == 4 * MiB
    await client.close()


async def test_http10_client_gets_a_close_delimited_body(proxy: ProxyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /big?100000 HTTP/1.0\r\nHost: h\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 30)
    [response] = parse_responses(data, [b"GET"])
    assert len(response.body) == 100000
    writer.close()


async def test_app_reset_is_a_502(proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    assert (await client.request(target=b"/reset")).status == 502
    await client.close()


async def test_upgrade_cannot_reach_an_h2_app(proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    headers = [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    assert (await client.request(target=b"/ws", headers=headers)).status == 502
    await client.close()


async def test_http2_client_gets_the_apps_trailers(proxy: ProxyProcess) -> None:
    client = await H2TestClient.connect(proxy.port)
    response = await client.response(client.request(b"/trailers"))
    assert (response.status, bytes(response.body)) == (200, b"with trailers")
    assert response.trailer(b"x-checksum") == b"abc"
    await client.close()


async def test_curl_through_to_an_h2c_app(proxy: ProxyProcess, tmp_path: Path) -> None:
    for flag in ("--http2-prior-knowledge", "--http1.1"):
        process = await asyncio.create_subprocess_exec(
            "curl", "-sS", flag, proxy.url + "/curl", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert out == b"/curl", flag


async def test_app_goaway_lets_its_last_stream_finish_and_new_ones_go_elsewhere(
    proxy: ProxyProcess,
) -> None:
    """A graceful GOAWAY from the app (nginx sends one at keepalive_requests): the stream it
    names is answered in full over the old connection; the next one opens a new connection."""
    client = await H2TestClient.connect(proxy.port)
    response = await client.response(client.request(b"/goaway"))
    assert (response.status, len(response.body)) == (200, 50_000)
    after = await client.response(client.request(b"/after-goaway"))
    assert (after.status, bytes(after.body)) == (200, b"/after-goaway")
    await client.close()


async def test_idle_app_connections_are_closed(h2_app: H2App, tmp_path: Path) -> None:
    """upstream.idle_timeout applies to the HTTP/2 connections to the app as to the pool."""
    proxy = await launch_proxy(
        h2_app.port, tmp_path, {"upstream": {"protocol": "h2c", "idle_timeout": "200ms"}}
    )
    try:
        client = await RawClient.connect(proxy.port)
        assert (await client.request(target=b"/before-idle")).status == 200
        await client.close()
        await proxy.log.wait(r"closed 1 app connection\(s\) at the end of their reuse window")
    finally:
        proxy.stop()


async def test_streams_beyond_the_apps_limit_wait_for_a_slot(tmp_path: Path) -> None:
    """The app allows 10 streams per connection (its h2 would fail a connection that went
    over): 30 at once all succeed, on more connections or after waiting for a slot."""
    app = H2App(max_concurrent_streams=10)
    await app.start()
    proxy = await launch_proxy(app.port, tmp_path, {"upstream": {"protocol": "h2c"}})
    try:
        client = await H2TestClient.connect(proxy.port)
        http1 = [await RawClient.connect(proxy.port) for _ in range(5)]
        streams = [client.request(b"/wait") for _ in range(25)]
        pending = [asyncio.ensure_future(c.request(target=b"/wait")) for c in http1]
        await app.wait_for(lambda: len(app.requests) >= 10)
        app.release.set()
        for stream in streams:
            response = await client.response(stream)
            assert (response.status, bytes(response.body)) == (200, b"waited")
        for answer in await asyncio.gather(*pending):
            assert (answer.status, answer.body) == (200, b"waited")
        assert len(app.requests) == 30
        await client.close()
        for one in http1:
            await one.close()
    finally:
        proxy.stop()
        await app.stop()


async def test_h2_over_tls_to_the_app_by_alpn(tmp_path: Path) -> None:
    """``protocol: h2`` with an https:// url: TLS to the app, HTTP/2 agreed by ALPN."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2"])
    app = H2App(ssl_context=server_context)
    await app.start()
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem.bytes())
    upstream = {
        "url": f"https://localhost:{app.port}",
        "protocol": "h2",
        "tls": {"ca_file": str(ca_file)},
    }
    proxy = await launch_proxy(app.port, tmp_path, {"upstream": upstream})
    try:
        client = await H2TestClient.connect(proxy.port)
        response = await client.response(client.request(b"/over-tls"))
        assert (response.status, bytes(response.body)) == (200, b"/over-tls")
        await client.close()
        http1 = await RawClient.connect(proxy.port)
        assert (await http1.request(target=b"/http1-over-tls")).body == b"/http1-over-tls"
        await http1.close()
        request = next(r for r in app.requests if r.header(b":path") == b"/over-tls")
        assert request.header(b":scheme") == b"https"
    finally:
        proxy.stop()
        await app.stop()


async def test_app_without_h2_alpn_is_a_502(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.set_alpn_protocols(["http/1.1"])
    app = H2App(ssl_context=server_context)
    await app.start()
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem.bytes())
    upstream = {
        "url": f"https://localhost:{app.port}",
        "protocol": "h2",
        "tls": {"ca_file": str(ca_file)},
    }
    proxy = await launch_proxy(app.port, tmp_path, {"upstream": upstream})
    try:
        client = await H2TestClient.connect(proxy.port)
        response = await client.response(client.request(b"/no-alpn"))
        assert response.status == 502
        assert b"ALPN" in response.body
        await client.close()
    finally:
        proxy.stop()
        await app.stop()


async def test_app_reset_reaches_an_http2_client_as_a_reset(proxy: ProxyProcess) -> None:
    client = await H2TestClient.connect(proxy.port)
    response = await client.response(client.request(b"/reset"))
    assert response.reset_code == 2  # INTERNAL_ERROR, as the app sent it
    assert (await client.response(client.request(b"/after-reset"))).status == 200
    await client.close()
