"""Connection lifetimes against the timing patterns of real balancers and app servers (issue 12):
the listener's backlog at the drain, connections a balancer opens ahead of use, and the app's own
keep-alive timeout. Real proxy process, real app, raw clients; each failing input of the issue is
kept with 0 as the expected count."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme

from tests.conftest import StartProxy
from tests.proxy_support import RawApp, RawClient, exchange, parse_responses, response_bytes

POST = (
    b"POST /order HTTP/1.1\r\nHost: shop\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 11\r\n\r\nhello world"
)


# --- 1. the listener's backlog -----------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served = 0
        self.refused = 0
        #: The handshake completed, then the connection broke without an answer: a client may
        #: have sent its request, and a balancer cannot retry a POST in that state.
        self.lost: list[str] = []
        self.enough = threading.Event()

    def note(self, *, served: bool = False, refused: bool = False, lost: str = "") -> None:
        with self.lock:
            self.served += served
            self.refused += refused
            if lost:
                self.lost.append(lost)
            if self.served >= 200:
                self.enough.set()


def post_per_connection(port: int, tally: Tally) -> None:
    """One client (a thread, blocking sockets, to keep the proxy's queue full): a new connection
    for every POST, until the proxy refuses to connect."""
    while True:
        sock = socket.socket()
        sock.settimeout(20)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            sock.close()
            tally.note(refused=True)
            return
        except ConnectionError as exc:
            sock.close()
            tally.note(lost=f"{type(exc).__name__} at connect")
            continue
        try:
            sock.sendall(POST)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionError as exc:
            tally.note(lost=type(exc).__name__)
            continue
        finally:
            sock.close()
        responses = parse_responses(raw, [b"POST"]) if raw else []
        if len(responses) == 1 and responses[0].status == 200:
            tally.note(served=True)
        else:
            tally.note(lost=repr(raw[:60]))


@pytest.mark.parametrize("round_number", range(5))
async def test_every_connection_the_kernel_completed_is_served_or_refused(
    raw_app: RawApp, start_proxy: StartProxy, round_number: int
) -> None:
    """32 clients each opening a connection per POST, SIGTERM under that load, `propagation:
    1s`: connections completed by the kernel but not yet accepted when the listener closes must
    not be reset after their clients sent a request (the issue saw 1-29 per round)."""
    proxy = await start_proxy(raw_app.port, {"drain": {"propagation": "1s", "timeout": "5s"}})
    tally = Tally()
    clients = [
        threading.Thread(target=post_per_connection, args=(proxy.port, tally), daemon=True)
        for _ in range(32)
    ]
    for client in clients:
        client.start()
    assert await asyncio.to_thread(tally.enough.wait, 30), "the load never got going"
    proxy.send(signal.SIGTERM)
    for client in clients:
        await asyncio.to_thread(client.join, 60)
        assert not client.is_alive()
    assert await proxy.exited() == 0
    assert tally.lost == []
    assert tally.refused == 32
    assert tally.served > 200


# --- 2. connections opened ahead of use ---------------------------------------------------------


async def test_a_connection_that_sent_nothing_is_idle_not_a_slow_head(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """A balancer opens a backend connection and uses it later than `timeouts.request_head`:
    the silence is idle time (`client_idle`), the head timeout starts at the first byte."""
    proxy = await start_proxy(
        raw_app.port, {"timeouts": {"request_head": "300ms", "client_idle": "60s"}}
    )
    pre_opened = await RawClient.connect(proxy.port)
    # A slow head on a connection opened after it: its 408 shows the head timeout has passed
    # for the silent connection too (each sweep checks both; it is the older one).
    slow_head = await exchange(proxy.port, b"GET /slow HTTP/1.1\r\nHost: h\r\n")
    assert parse_responses(slow_head, [b"GET"])[0].status == 408
    response = await pre_opened.request(b"POST", b"/late", body=b"first use")
    assert response.status == 200
    await pre_opened.close()


async def test_a_silent_connection_still_ends_at_client_idle(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """Slowloris stays bounded: silence ends at `client_idle`, a dripping head at
    `request_head` (tests/test_proxy_limits.py), and empty lines do not reset either."""
    proxy = await start_proxy(
        raw_app.port, {"timeouts": {"request_head": "300ms", "client_idle": "500ms"}}
    )
    silent = await RawClient.connect(proxy.port)
    blank_lines = await RawClient.connect(proxy.port)
    for _ in range(3):
        blank_lines.writer.write(b"\r\n")
    assert await silent.closed_by_peer()
    assert await blank_lines.closed_by_peer()
    await silent.close()
    await blank_lines.close()
    assert raw_app.requests == []
    text = await proxy.metrics_text()
    assert re.search(r'^drainproxy_timeouts_total{kind="client_idle"} [2-9]', text, re.M)


# --- 3. the app's keep-alive timeout ------------------------------------------------------------


class AnnouncingApp:
    """An app server that closes a keep-alive connection idle for ``idle`` seconds, as Node and
    uvicorn do, and says so (``announce``: the Keep-Alive field, or None to say nothing)."""

    def __init__(self, idle: float, announce: bytes | None) -> None:
        self.idle = idle
        self.announce = announce
        self.closed_idle = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = [(b"Keep-Alive", self.announce)] if self.announce else []
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle)
                except TimeoutError:
                    self.closed_idle += 1
                    return
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                writer.write(response_bytes(200, b"ok", headers))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def post_bursts(port: int, bursts: int, gap: tuple[float, float]) -> list[int]:
    """Bursts of 32 concurrent POSTs (each on a new client connection, so the proxy needs 32 app
    connections), spaced so that the pooled app connections sit idle for about the app's
    timeout before the next burst takes them; the statuses."""

    async def post() -> int:
        return parse_responses(await exchange(port, POST), [b"POST"])[0].status

    statuses: list[int] = []
    for _ in range(bursts):
        statuses += await asyncio.gather(*(post() for _ in range(32)))
        await asyncio.sleep(random.uniform(*gap))  # load shape, not synchronisation
    return statuses


@pytest.mark.parametrize(
    ("idle", "announce", "proxy_idle_timeout", "bursts"),
    [
        (1.0, b"timeout=1", "30s", 12),  # the issue's app (384 POSTs), a long idle_timeout
        (2.0, b"timeout=2, max=100", "30s", 6),  # reused for at most 1 s
        (1.5, None, None, 6),  # says nothing: the default idle_timeout must be below it
    ],
)
async def test_no_post_is_written_into_a_connection_the_app_is_closing(
    start_proxy: StartProxy,
    idle: float,
    announce: bytes | None,
    proxy_idle_timeout: str | None,
    bursts: int,
) -> None:
    app = AnnouncingApp(idle, announce)
    await app.start()
    try:
        upstream = {"idle_timeout": proxy_idle_timeout} if proxy_idle_timeout else {}
        proxy = await start_proxy(app.port, {"upstream": upstream})
        statuses = await post_bursts(proxy.port, bursts, (idle - 0.03, idle + 0.01))
        assert len(statuses) == 32 * bursts
        assert [s for s in statuses if s != 200] == []
        raw = await exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert parse_responses(raw, [b"GET"])[0].header(b"keep-alive") == [], "hop-by-hop"
    finally:
        await app.stop()


async def test_connections_queued_while_the_proxy_could_not_accept_are_served(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """The same fault made certain: the proxy is stopped (SIGSTOP) across the end of its
    propagation while 32 clients connect and send a POST, so the kernel completes and queues all
    of them; when it resumes, the listener closes with a full queue. Each is served."""
    proxy = await start_proxy(raw_app.port, {"drain": {"propagation": "300ms", "timeout": "5s"}})
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(r"phase serving -> propagating")
    proxy.send(signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)  # the proxy's propagation deadline passes while it is stopped
        streams = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(32)]
        for _, writer in streams:
            writer.write(POST)
            await writer.drain()
    finally:
        proxy.send(signal.SIGCONT)
    lost = []
    for reader, writer in streams:
        try:
            raw = await asyncio.wait_for(reader.read(), 20)
        except ConnectionError as exc:
            lost.append(type(exc).__name__)
            continue
        finally:
            writer.close()
        (response,) = parse_responses(raw, [b"POST"])
        assert (response.status, response.header(b"connection")) == (200, [b"close"])
    assert lost == []
    assert await proxy.exited() == 0
    await proxy.log.wait(r"listener closed; accepted \d+ connection\(s\) left in its queue")


async def test_tls_connections_queued_at_the_drain_are_served(
    raw_app: RawApp, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The same with TLS on the listener: connections taken from the queue get their handshake."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.cert_chain_pems[0].bytes())
    key_file.write_bytes(cert.private_key_pem.bytes())
    proxy = await start_proxy(
        raw_app.port,
        {
            "drain": {"propagation": "300ms", "timeout": "5s"},
            "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
        },
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(r"phase serving -> propagating")
    proxy.send(signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)  # the proxy's propagation deadline passes while it is stopped
        streams = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(8)]
    finally:
        proxy.send(signal.SIGCONT)
    statuses = []
    for reader, writer in streams:
        await writer.start_tls(context, server_hostname="localhost")
        writer.write(POST)
        raw = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        statuses.append(parse_responses(raw, [b"POST"])[0].status)
    assert statuses == [200] * 8
    assert await proxy.exited() == 0
    await proxy.log.wait(r"listener closed; accepted \d+ connection\(s\) left in its queue")
