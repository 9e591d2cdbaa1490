"""HTTP/2 clients on the listener (prior knowledge beside HTTP/1.1 on the same port, and TLS
ALPN), translated to HTTP/1.1 for the app: framing, flow control both ways with bounded memory,
resets both ways, protocol errors and the rapid-reset bound (docs/http2.md)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h2.errors
import pytest
import pytest_asyncio
import trustme
from h2.events import InformationalResponseReceived, SettingsAcknowledged
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

from tests.conftest import StartProxy
from tests.h2_support import INITIAL_WINDOW_SIZE, H2TestClient
from tests.proxy_support import (
    AppRequest,
    RawApp,
    RawClient,
    add_streaming_routes,
    parse_responses,
    proc_status_kib,
    response_bytes,
)
from tests.support import ProxyProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

Writer = asyncio.StreamWriter
MiB = 1 << 20
BIG = 64 * MiB
BLOCK = b"x" * MiB
MEMORY_GROWTH_LIMIT_KIB = 48 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[RawApp]:
    raw_app = RawApp()

    add_streaming_routes(raw_app)

    @raw_app.route(b"/hold")
    async def hold(request: AppRequest, writer: Writer) -> bool:
        await request.reader.read()  # until the proxy closes the connection
        return False

    @raw_app.route(b"/vanish")
    async def vanish(request: AppRequest, writer: Writer) -> bool:
        return False

    await raw_app.start()
    yield raw_app
    await raw_app.stop()


@pytest.fixture(scope="module")
def proxy_overrides() -> dict[str, Any]:
    return {"upstream": {"max_idle_connections": 0}}


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, check=False
    )


async def test_curl_with_prior_knowledge_reaches_an_http1_app(
    app: RawApp, proxy: ProxyProcess
) -> None:
    result = await asyncio.to_thread(
        curl,
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        "-H",
        "Cookie: a=1",
        "-H",
        "X-Trace: t1",
        proxy.url + "/curl?q=1",
    )
    body, _, version = result.stdout.rpartition("\n")
    assert (version, body) == ("2", "/curl?q=1"), result.stderr
    request = next(r for r in app.requests if r.path == b"/curl")
    assert request.version == b"HTTP/1.1"
    assert request.header(b"host") == [f"127.0.0.1:{proxy.port}".encode()]
    assert request.header(b"x-trace") == [b"t1"]
    assert request.header(b"cookie") == [b"a=1"]
    assert request.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert request.header(b"x-forwarded-proto") == [b"http"]


async def test_http1_still_served_on_the_same_port(app: RawApp, proxy: ProxyProcess) -> None:
    client = await RawClient.connect(proxy.port)
    response = await client.request(target=b"/one")
    assert (response.status, response.body) == (200, b"/one")
    await client.close()


async def test_cookie_crumbs_are_joined_for_http1(app: RawApp, proxy: ProxyProcess) -> None:
    """RFC 9113 §8.2.3: an HTTP/2 client may split Cookie; HTTP/1.1 allows one field."""
    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/crumbs", headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    response = await client.response(stream)
    assert response.status == 200
    request = next(r for r in app.requests if r.path == b"/crumbs")
    assert request.header(b"cookie") == [b"a=1; b=2"]
    await client.close()


async def test_interim_responses_of_an_http1_app_reach_http2_clients(
    app: RawApp, proxy: ProxyProcess
) -> None:
    """A 103 from the app goes on as an informational HEADERS frame, then the response."""

    @app.route(b"/early-hints")
    async def hints(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        writer.write(response_bytes(200, b"final"))
        return True

    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/early-hints")
    response = await client.response(stream)
    assert (response.status, bytes(response.body)) == (200, b"final")
    informational = [
        event
        for event in client.events
        if isinstance(event, InformationalResponseReceived) and event.stream_id == stream
    ]
    assert [dict(event.headers)[b":status"] for event in informational] == [b"103"]
    assert dict(informational[0].headers)[b"link"] == b"</s.css>; rel=preload"
    await client.close()


async def test_a_1xx_with_framing_fields_is_a_502_for_http2_clients(
    app: RawApp, proxy: ProxyProcess
) -> None:
    """RFC 9110 §8.6: a 1xx has no content, so Content-Length on one is a broken app's; the
    HTTP/2 client gets 502, as an HTTP/1.1 client does, and nothing of that response."""

    @app.route(b"/framed-hints")
    async def hints(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n")
        writer.write(response_bytes(200, b"final"))
        return False

    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/framed-hints")
    response = await client.response(stream)
    assert response.status == 502
    assert b"final" not in bytes(response.body)
    assert not [
        event
        for event in client.events
        if isinstance(event, InformationalResponseReceived) and event.stream_id == stream
    ]
    await client.close()


async def test_concurrent_streams_on_one_connection(app: RawApp, proxy: ProxyProcess) -> None:
    client = await H2TestClient.connect(proxy.port)
    streams = [client.request(b"/many/%d" % n) for n in range(20)]
    for n, stream in enumerate(streams):
        response = await client.response(stream)
        assert (response.status, bytes(response.body)) == (200, b"/many/%d" % n)
    await client.close()


async def test_upload_without_length_is_chunked_and_flow_controlled(
    app: RawApp, proxy: ProxyProcess
) -> None:
    """3 MiB is beyond the proxy's stream and connection windows: the client can send it only
    as the proxy acknowledges what it has forwarded."""
    client = await H2TestClient.connect(proxy.port)
    size = 3 * MiB
    stream = client.request(b"/upload", method=b"POST", end=False)
    await client.send_all(stream, b"u" * size)
    response = await client.response(stream, timeout=30)
    assert (response.status, bytes(response.body)) == (200, b"%d" % size)
    request = next(r for r in app.requests if r.path == b"/upload")
    assert request.header(b"transfer-encoding") == [b"chunked"]
    await client.close()


async def test_large_bodies_both_ways_in_bounded_memory(app: RawApp, proxy: ProxyProcess) -> None:
    pid = proxy.proc.pid
    client = await H2TestClient.connect(proxy.port)
    warm = await client.response(client.request(b"/warm"))
    assert warm.status == 200
    baseline = proc_status_kib(pid, "VmRSS")

    stream = client.request(
        b"/upload", method=b"POST", headers=[(b"content-length", b"%d" % BIG)], end=False
    )
    await client.send_all(stream, b"u" * BIG)
    response = await client.response(stream, timeout=60)
    assert bytes(response.body) == b"%d" % BIG

    stream = client.request(b"/download?%d" % BIG)
    response = await client.response(stream, timeout=60)
    assert response.header(b"content-length") == b"%d" % BIG
    assert len(response.body) == BIG
    await client.close()
    growth = proc_status_kib(pid, "VmHWM") - baseline
    assert growth < MEMORY_GROWTH_LIMIT_KIB, f"peak RSS grew {growth} KiB moving {BIG} bytes"


async def test_a_client_that_does_not_open_its_window_holds_the_app_back(
    app: RawApp, proxy: ProxyProcess
) -> None:
    written = 0
    stalled = asyncio.Event()

    @app.route(b"/firehose")
    async def firehose(request: AppRequest, writer: Writer) -> bool:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * BIG))
        for _ in range(4 * BIG // MiB):
            writer.write(BLOCK)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                stalled.set()
                await writer.drain()
            written += MiB
        return True

    client = await H2TestClient.connect(proxy.port, auto_ack=False)
    stream = client.request(b"/firehose")
    await asyncio.wait_for(stalled.wait(), 30)
    assert written < 64 * MiB  # kernel buffers and one window, not the body
    assert len(client.streams[stream].body) <= 65535
    await client.close()


async def test_client_reset_aborts_the_app_request(app: RawApp, proxy: ProxyProcess) -> None:
    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/hold")
    await app.received(b"/hold")
    disconnects = app.disconnects
    client.reset(stream, h2.errors.ErrorCodes.CANCEL)
    await app.wait_for(lambda: app.disconnects > disconnects)
    # The connection lives on.
    response = await client.response(client.request(b"/after-reset"))
    assert response.status == 200
    await client.close()


async def test_app_closing_before_responding_is_a_502_on_that_stream_only(
    app: RawApp, proxy: ProxyProcess
) -> None:
    client = await H2TestClient.connect(proxy.port)
    bad = client.request(b"/vanish")
    good = client.request(b"/fine")
    assert (await client.response(bad)).status == 502
    assert (await client.response(good)).status == 200
    await client.close()


async def test_protocol_error_gets_goaway_and_others_are_served(
    app: RawApp, proxy: ProxyProcess
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    # The preface, then a DATA frame on stream 0, which RFC 9113 §6.1 makes a connection error.
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    received = await asyncio.wait_for(reader.read(), 10)
    goaway = received.find(b"\x07\x00\x00\x00\x00\x00")  # type GOAWAY, no flags, stream 0
    assert goaway >= 0
    error_code = int.from_bytes(received[goaway + 10 : goaway + 14], "big")
    assert error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    writer.close()
    client = await H2TestClient.connect(proxy.port)
    assert (await client.response(client.request(b"/still"))).status == 200
    await client.close()


async def test_rapid_reset_is_told_to_calm_down(app: RawApp, proxy: ProxyProcess) -> None:
    """CVE-2023-44487: streams opened and reset at once, before any response."""
    client = await H2TestClient.connect(proxy.port)
    for _ in range(150):
        stream = client.request(b"/hold")
        client.reset(stream, h2.errors.ErrorCodes.CANCEL)
    await client.wait_for(lambda: bool(client.goaways()) or client.closed)
    goaways = client.goaways()
    assert goaways and goaways[-1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await client.close()
    metrics = await proxy.metrics_text()
    assert "drainproxy_http2_abusive_connections_total 1.0" in metrics


async def test_streams_are_counted_like_requests(app: RawApp, proxy: ProxyProcess) -> None:
    before = (await proxy.status())["requests_total"]
    client = await H2TestClient.connect(proxy.port)
    for n in range(3):
        assert (await client.response(client.request(b"/count/%d" % n))).status == 200
    await client.close()
    assert (await proxy.status())["requests_total"] == before + 3
    metrics = await proxy.metrics_text()
    assert "drainproxy_http2_connections_total" in metrics


async def test_request_body_limit_answers_413(start_proxy: StartProxy, app: RawApp) -> None:
    proxy = await start_proxy(app.port, {"limits": {"max_body_bytes": "64KiB"}})
    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/upload", method=b"POST", end=False)
    await client.send_all(stream, b"u" * (128 * 1024), end=False)
    response = await client.response(stream)
    assert response.status == 413
    assert (await client.response(client.request(b"/next"))).status == 200
    await client.close()


async def test_small_client_window_still_gets_the_whole_response(
    app: RawApp, proxy: ProxyProcess
) -> None:
    client = await H2TestClient.connect(proxy.port, settings={INITIAL_WINDOW_SIZE: 1024})
    response = await client.response(client.request(b"/download?%d" % (2 * MiB)), timeout=30)
    assert len(response.body) == 2 * MiB
    await client.close()


async def test_h2_by_alpn_on_the_tls_listener(
    start_proxy: StartProxy, app: RawApp, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file, ca_file = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    cert_file.write_bytes(cert.cert_chain_pems[0].bytes())
    key_file.write_bytes(cert.private_key_pem.bytes())
    ca_file.write_bytes(ca.cert_pem.bytes())
    proxy = await start_proxy(
        app.port, {"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}}
    )
    url = f"https://localhost:{proxy.port}/alpn"
    resolve = f"localhost:{proxy.port}:127.0.0.1"
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        args = (flag, "--cacert", str(ca_file), "--resolve", resolve, "-w", "\n%{http_version}")
        result = await asyncio.to_thread(curl, *args, url)
        body, _, got = result.stdout.rpartition("\n")
        assert (got, body) == (version, "/alpn"), result.stderr
    request = next(r for r in app.requests if r.path == b"/alpn")
    assert request.header(b"x-forwarded-proto") == [b"https"]


async def test_continuation_flood_is_cut_off(app: RawApp, proxy: ProxyProcess) -> None:
    """A header block that never ends (CVE-2024-27316 and kin): h2 refuses more than 64
    CONTINUATION frames, so the proxy holds at most 64 frames of one block, then GOAWAY."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    writer.write(HeadersFrame(1, data=b"\x82", flags=["END_STREAM"]).serialize())
    for _ in range(200):
        writer.write(ContinuationFrame(1, data=b"\x40\x01a\x01b" * 200).serialize())
    received = await asyncio.wait_for(reader.read(), 10)  # until the proxy closes
    goaway = received.find(b"\x07\x00\x00\x00\x00\x00")
    assert goaway >= 0
    writer.close()
    client = await H2TestClient.connect(proxy.port)
    assert (await client.response(client.request(b"/after-flood"))).status == 200
    await client.close()


async def test_header_list_over_the_limit_is_refused(app: RawApp, proxy: ProxyProcess) -> None:
    """SETTINGS_MAX_HEADER_LIST_SIZE is limits.max_header_bytes (32 KiB by default)."""
    client = await H2TestClient.connect(proxy.port)
    await client.wait_for(lambda: any(isinstance(e, SettingsAcknowledged) for e in client.events))
    big = [(b"x-big-%d" % n, b"v" * 4000) for n in range(12)]
    stream = client.request(b"/too-big", headers=big)
    await client.wait_for(lambda: client.closed or bool(client.goaways()))
    assert client.streams[stream].status != 200
    assert all(r.path != b"/too-big" for r in app.requests)
    await client.close()


async def test_idle_connection_gets_goaway_and_is_closed(
    start_proxy: StartProxy, app: RawApp
) -> None:
    proxy = await start_proxy(app.port, {"timeouts": {"client_idle": "300ms"}})
    client = await H2TestClient.connect(proxy.port)
    assert (await client.response(client.request(b"/before-idle"))).status == 200
    await client.wait_for(lambda: client.closed)
    assert client.goaways()[-1].error_code == h2.errors.ErrorCodes.NO_ERROR
    await client.close()
    assert 'drainproxy_timeouts_total{kind="client_idle"} 1.0' in await proxy.metrics_text()


async def test_response_head_timeout_answers_504(start_proxy: StartProxy, app: RawApp) -> None:
    proxy = await start_proxy(app.port, {"upstream": {"response_timeout": "300ms"}})
    client = await H2TestClient.connect(proxy.port)
    disconnects = app.disconnects
    response = await client.response(client.request(b"/hold"))
    assert response.status == 504
    await app.wait_for(lambda: app.disconnects > disconnects)  # the app's request was aborted
    await client.close()


async def test_h2c_upgrade_is_served_as_http1(app: RawApp, proxy: ProxyProcess) -> None:
    """RFC 9113 §3.1 deprecates it: the request is answered over HTTP/1.1, without the upgrade
    reaching the app, and the connection closes after the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /h2c-upgrade HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 10)
    [response] = parse_responses(data, [b"GET"])
    assert (response.status, response.body) == (200, b"/h2c-upgrade")
    assert response.header(b"connection") == [b"close"]
    writer.close()
    request = next(r for r in app.requests if r.path == b"/h2c-upgrade")
    for name in (b"upgrade", b"http2-settings", b"connection"):
        assert request.header(name) == [], name


@pytest.mark.parametrize(
    ("method", "path", "authority"),
    [
        (b"GET", b"/a HTTP/1.1\x09X: y", b"h"),  # a tab would split the HTTP/1.1 request line
        (b"GET", b"/a b", b"h"),
        (b"GET /x", b"/", b"h"),
        (b"GET", b"/", b"h x"),
    ],
)
async def test_request_line_that_http1_would_split_is_refused(
    app: RawApp, proxy: ProxyProcess, method: bytes, path: bytes, authority: bytes
) -> None:
    """HTTP/2 allows spaces in :path and :authority; an HTTP/1.1 request line does not."""
    before = len(app.requests)
    client = await H2TestClient.connect(proxy.port)
    response = await client.response(client.request(path, method=method, authority=authority))
    assert response.status == 400
    assert (await client.response(client.request(b"/fine-after"))).status == 200
    assert [r.path for r in app.requests[before:]] == [b"/fine-after"]
    await client.close()


async def test_connection_that_opens_no_stream_is_idle(
    start_proxy: StartProxy, app: RawApp
) -> None:
    """As a silent HTTP/1.1 connection (balancers open them ahead of use, issue 12): the idle
    timeout applies, GOAWAY then the close."""
    proxy = await start_proxy(app.port, {"timeouts": {"client_idle": "300ms"}})
    client = await H2TestClient.connect(proxy.port)  # the preface and SETTINGS, then nothing
    await client.wait_for(lambda: client.closed)
    assert client.goaways()[-1].error_code == h2.errors.ErrorCodes.NO_ERROR
    await client.close()
    assert 'drainproxy_timeouts_total{kind="client_idle"} 1.0' in await proxy.metrics_text()


async def test_streams_over_the_concurrency_limit_end_the_connection(
    start_proxy: StartProxy, app: RawApp
) -> None:
    """limits.max_concurrent_streams: a client that ignores it is cut off with GOAWAY (h2 makes
    it a connection error), and the proxy keeps serving others."""
    proxy = await start_proxy(app.port, {"limits": {"max_concurrent_streams": 5}})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    await reader.read(9 + 36)  # the proxy's SETTINGS (its limit is in it), at least in part
    writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
    encoder = Encoder()
    for stream_id in range(1, 40, 2):
        block = encoder.encode(
            [(":method", "GET"), (":scheme", "http"), (":authority", "h"), (":path", "/hold")]
        )
        writer.write(
            HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
    received = await asyncio.wait_for(reader.read(), 10)
    goaway = received.find(b"\x07\x00\x00\x00\x00\x00")
    assert goaway >= 0
    assert int.from_bytes(received[goaway + 10 : goaway + 14], "big") != 0
    writer.close()
    other = await H2TestClient.connect(proxy.port)
    assert (await other.response(other.request(b"/others-served"))).status == 200
    await other.close()
