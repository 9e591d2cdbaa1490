"""Peers for data-path tests: a raw-socket app that can answer with any bytes, and clients that
send raw bytes and read the answers back through h11, a strict, independent HTTP/1.1 parser."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from tests.support import ProxyProcess, base_config, deep_merge

Headers = list[tuple[bytes, bytes]]


# --- an app made of raw sockets ------------------------------------------------------------------


@dataclass
class AppRequest:
    """A request as the app received it: the exact head bytes, parsed loosely on purpose (the
    proxy's output is what is under test, so nothing here normalises it)."""

    raw_head: bytes
    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    reader: asyncio.StreamReader
    #: Which connection (numbered from 1) and which request on it (from 1).
    connection: int = 0
    sequence: int = 0
    body: bytes = b""
    body_read: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    async def read_body(self, keep: bool = True) -> int:
        """Read the body framed by Content-Length or chunked; keep it or only count it."""
        kept: list[bytes] = []

        async def take(size: int) -> int:
            """Read ``size`` body bytes in pieces of at most 1 MiB (big bodies stay unheld)."""
            remaining = size
            while remaining:
                data = await self.reader.read(min(remaining, 1 << 20))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                if keep:
                    kept.append(data)
            return size

        total = 0
        if self.header(b"transfer-encoding"):
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                total += await take(size)
                assert await self.reader.readexactly(2) == b"\r\n"
        elif lengths := self.header(b"content-length"):
            total = await take(int(lengths[0]))
        self.body = b"".join(kept)
        self.body_read = True
        return total


#: Answers one request; returns False to end the connection after it.
Handler = Callable[[AppRequest, asyncio.StreamWriter], Awaitable[bool]]


class LoopbackServer:
    """A test server on 127.0.0.1 and a free port; subclasses answer in ``_serve``."""

    server: asyncio.Server | None = None
    port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


class RawApp(LoopbackServer):
    """An upstream on raw sockets. Every request is recorded; the handler routed by path (else
    ``default``) writes any bytes it likes."""

    def __init__(self, default: Handler | None = None) -> None:
        self.default = default or ok
        self.routes: dict[bytes, Handler] = {}
        self.requests: list[AppRequest] = []
        self.raw = bytearray()
        self.connections_total = 0
        self.open_connections = 0
        self.disconnects = 0
        self.changed = asyncio.Condition()

    def route(self, path: bytes) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes[path] = handler
            return handler

        return register

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    async def received(self, path: bytes) -> None:
        """Until a request for ``path`` has arrived."""
        await self.wait_for(lambda: any(r.path == path for r in self.requests))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        connection = self.connections_total
        self.open_connections += 1
        await self._notify()
        sequence = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self.raw += head
                request = parse_request_head(head, reader)
                sequence += 1
                request.connection, request.sequence = connection, sequence
                self.requests.append(request)
                await self._notify()
                handler = self.routes.get(request.path, self.default)
                keep = await handler(request, writer)
                if not keep or writer.is_closing():
                    break
                if not request.body_read:
                    await request.read_body()
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            self.disconnects += 1
            writer.close()
            await self._notify()


def parse_request_head(head: bytes, reader: asyncio.StreamReader) -> AppRequest:
    lines = head[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ", 2)
    headers: Headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return AppRequest(head, method, target, version, headers, reader)


def response_bytes(
    status: int = 200,
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    length: bool = True,
) -> bytes:
    lines = [b"HTTP/1.1 %d X" % status]
    lines += [name + b": " + value for name, value in headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def ok(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
    """Echo the path; the default handler."""
    await request.read_body()
    writer.write(response_bytes(200, request.target))
    return True


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes
    http_version: bytes
    interim: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class IncompleteResponse(Exception):
    """The bytes ended before a response was complete: the client saw a truncation."""


#: What h11 hands back: an event, or a sentinel saying it needs more data (or is paused).
H11Event = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


def next_event(conn: h11.Connection) -> H11Event:
    """The next h11 event; a protocol error is the client seeing a broken response."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise IncompleteResponse(str(exc)) from exc


class ResponseAssembly:
    """One response's h11 events gathered up (interim statuses, head, body) until it ends."""

    def __init__(self) -> None:
        self.head: h11.Response | None = None
        self.interim: list[int] = []
        self.body = bytearray()

    def add(self, event: H11Event) -> Response | None:
        """Take one event; returns the response once its end has been seen."""
        if isinstance(event, h11.InformationalResponse):
            self.interim.append(event.status_code)
        elif isinstance(event, h11.Response):
            self.head = event
        elif isinstance(event, h11.Data):
            self.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert self.head is not None
            return Response(
                self.head.status_code,
                list(self.head.headers.raw_items()),
                bytes(self.body),
                self.head.http_version,
                self.interim,
            )
        return None


def parse_responses(data: bytes, methods: Sequence[bytes], *, eof: bool = True) -> list[Response]:
    """Parse responses to ``methods`` (in order) from ``data`` with h11, strictly. Raises
    IncompleteResponse when the data ends inside a response (a cut). h11 only speaks 1.1 as a
    client, which does not matter here: a response's framing is in the response."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    responses: list[Response] = []
    for method in methods:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"test")]))
        conn.send(h11.EndOfMessage())
        assembly = ResponseAssembly()
        while True:
            event = next_event(conn)
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                if assembly.head is None and not responses and not assembly.interim:
                    raise IncompleteResponse("no response at all")
                if assembly.head is None:
                    return responses
                raise IncompleteResponse("connection ended inside a response")
            if response := assembly.add(event):
                responses.append(response)
                break
        if conn.their_state is h11.MUST_CLOSE or conn.their_state is h11.CLOSED:
            break
    return responses


async def exchange(
    port: int, data: bytes, *, timeout: float = 10.0, half_close: bool = False
) -> bytes:
    """Send raw bytes, read until the proxy closes; returns everything it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


async def request_once(
    port: int, data: bytes, method: bytes = b"GET", *, timeout: float = 10.0
) -> Response:
    """Send one raw request with Connection: close semantics and parse the one response."""
    raw = await exchange(port, data, timeout=timeout)
    responses = parse_responses(raw, [method])
    assert len(responses) == 1, raw
    return responses[0]


class RawClient:
    """A keep-alive connection that reads responses one at a time through h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(
        self,
        method: bytes = b"GET",
        target: bytes = b"/",
        headers: Headers | None = None,
        body: bytes = b"",
    ) -> Response:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [(b"Host", b"test"), *(headers or [])]
        if body:
            all_headers.append((b"Content-Length", b"%d" % len(body)))
        self.writer.write(
            self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        )
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        return await self.read_response()

    async def read_response(self, timeout: float = 10.0) -> Response:
        assembly = ResponseAssembly()
        while True:
            event = next_event(self.conn)
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise IncompleteResponse("connection closed")
            if response := assembly.add(event):
                return response

    async def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True when the proxy closed this connection (EOF or reset)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except ConnectionError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# --- the proxy process from outside ---------------------------------------------------------------


async def launch_proxy(
    upstream_port: int,
    workdir: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    wait_ready: bool = False,
) -> ProxyProcess:
    """Start drainproxy for fixtures wider than one test (the conftest fixture is per test).
    The data path serves from the start line on; readiness is another module's business."""
    proxy = ProxyProcess(deep_merge(base_config(upstream_port), overrides or {}), workdir)
    try:
        await proxy.started()
        if wait_ready:
            await proxy.ready()
    except BaseException:
        proxy.stop()
        raise
    return proxy


# --- measuring the proxy process ---------------------------------------------------------------


MiB = 1 << 20
_BLOCK = b"x" * MiB


def add_streaming_routes(app: RawApp) -> None:
    """``/upload`` reads a body of any size without keeping it and answers its length;
    ``/download?N`` answers N bytes (a whole number of MiB) written with back-pressure: the
    app side of the tests that a body streams through without being held."""

    @app.route(b"/upload")
    async def upload(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        size = await request.read_body(keep=False)
        writer.write(response_bytes(200, b"%d" % size))
        return True

    @app.route(b"/download")
    async def download(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        size = int(request.target.partition(b"?")[2])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // MiB):
            writer.write(_BLOCK)
            await writer.drain()
        return True


def proc_status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` memory field such as VmHWM, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)
