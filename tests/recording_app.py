"""An app that records every byte drainproxy sends it and reads them two ways: with h11 (strict,
RFC 9112) and with a deliberately lenient reader that behaves like the legacy stacks behind a
sidecar (CGI/WSGI header names, C ``strtol`` numbers, GET bodies ignored). Where the two
disagree about the number or the boundaries of requests, a request can be smuggled (issue 11).

The app answers what the lenient reader finds, as a legacy app would: each answer's body is the
request target, so a client can tell its own answer from another's."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import h11

from tests.proxy_support import LoopbackServer

#: A target whose request is answered, on that connection, by these exact bytes.
Scripts = dict[bytes, bytes]


@dataclass(frozen=True)
class SeenRequest:
    """One request as a reader delimited it: what a smuggling check compares."""

    method: bytes
    target: bytes
    body: bytes
    #: Field names as the reader maps them (lower case; for the lenient reader ``_`` and runs
    #: of ``-`` read as one ``-``), values in order.
    headers: dict[bytes, list[bytes]] = field(default_factory=dict, compare=False)


# --- the lenient reader -----------------------------------------------------------------------


_SEPARATORS = re.compile(rb"[-_]+")


def c_strtol(text: bytes, base: int = 0) -> int:
    """``strtol(text, NULL, base)`` as C stacks parse numbers: leading digits only, and with
    base 0, ``0x`` means hex and a leading ``0`` octal (so ``010`` is 8)."""
    text = text.strip()
    sign = -1 if text[:1] == b"-" else 1
    text = text.lstrip(b"+-")
    if base == 0:
        if text[:2].lower() == b"0x":
            base, text = 16, text[2:]
        elif text[:1] == b"0" and len(text) > 1:
            base = 8
        else:
            base = 10
    elif base == 16 and text[:2].lower() == b"0x":
        text = text[2:]
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"[:base]
    count = 0
    while count < len(text) and chr(text[count]).lower() in digits:
        count += 1
    return sign * int(text[:count], base) if count else 0


def _line(stream: bytes, pos: int) -> tuple[bytes, int] | None:
    end = stream.find(b"\n", pos)
    if end < 0:
        return None
    return stream[pos:end].rstrip(b"\r"), end + 1


def lenient_requests(stream: bytes) -> tuple[list[SeenRequest], int]:
    """Requests in ``stream`` as a lenient legacy stack reads them, and how many bytes they
    took: lines end at LF; names are case-folded with ``_`` and runs of ``-`` as one ``-``;
    Content-Length wins over Transfer-Encoding and is read by ``strtol`` base 0; a body is
    chunked when Transfer-Encoding mentions chunked; GET and HEAD bodies are not read."""
    requests: list[SeenRequest] = []
    pos = 0
    while True:
        while stream.startswith(b"\r\n", pos) or stream.startswith(b"\n", pos):
            pos += 1 if stream[pos : pos + 1] == b"\n" else 2
        start = pos
        got = _line(stream, pos)
        if got is None:
            return requests, start
        request_line, pos = got
        headers: dict[bytes, list[bytes]] = {}
        while True:
            got = _line(stream, pos)
            if got is None:
                return requests, start
            line, pos = got
            if not line:
                break
            name, _, value = line.partition(b":")
            key = _SEPARATORS.sub(b"-", name.strip().lower())
            headers.setdefault(key, []).append(value.strip())
        parts = request_line.split()
        method, target = ([*parts, b"", b""])[:2]
        body = b""
        if method in (b"GET", b"HEAD"):
            pass
        elif b"content-length" in headers:
            length = max(0, c_strtol(headers[b"content-length"][0]))
            if len(stream) < pos + length:
                return requests, start
            body, pos = stream[pos : pos + length], pos + length
        elif b"chunked" in b",".join(headers.get(b"transfer-encoding", [])).lower():
            chunks: list[bytes] = []
            while True:
                got = _line(stream, pos)
                if got is None:
                    return requests, start
                size_line, pos = got
                size = c_strtol(size_line.split(b";", 1)[0], 16)
                if size <= 0:
                    while (got := _line(stream, pos)) is not None and got[0]:
                        pos = got[1]
                    if got is None:
                        return requests, start
                    pos = got[1]
                    break
                if len(stream) < pos + size:
                    return requests, start
                chunks.append(stream[pos : pos + size])
                pos += size
                got = _line(stream, pos)
                if got is None:
                    return requests, start
                pos = got[1]
            body = b"".join(chunks)
        requests.append(SeenRequest(method, target, body, headers))


# --- the strict reader ---------------------------------------------------------------------------


def strict_requests(stream: bytes) -> tuple[list[SeenRequest], str | None]:
    """Complete requests in ``stream`` as h11 (a server) reads them, answering each with an
    empty 200 so the next can be read; and h11's complaint, if it stopped on one."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    requests: list[SeenRequest] = []
    head: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return requests, str(exc)
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return requests, None
        if isinstance(event, h11.Request):
            head, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers: dict[bytes, list[bytes]] = {}
            for name, value in head.headers:
                headers.setdefault(bytes(name), []).append(bytes(value))
            requests.append(SeenRequest(head.method, head.target, bytes(body), headers))
            conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
            conn.send(h11.EndOfMessage())
            if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
                return requests, None
            conn.start_next_cycle()
        else:
            return requests, None


# --- the app -----------------------------------------------------------------------------------


def echo_response(request: SeenRequest) -> bytes:
    """The app's ordinary answer: 200 with the target as the body."""
    body = b"" if request.method == b"HEAD" else request.target
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(request.target), body)


class RecordingApp(LoopbackServer):
    """A raw-socket app: per connection, every byte received (``streams``), answered as the
    lenient reader delimits requests. A request with an Upgrade field is answered 200 and then
    nothing more on that connection is read as HTTP (the app has "switched")."""

    def __init__(self, scripts: Scripts | None = None) -> None:
        self.scripts: Scripts = scripts if scripts is not None else {}
        self.streams: list[bytearray] = []
        self.open: set[asyncio.StreamWriter] = set()
        self.changed = asyncio.Condition()

    async def end_connections(self) -> None:
        """Half-close every connection and wait until drainproxy has closed each (so none of
        them is in its pool any more): the next requests start on fresh connections."""
        for writer in self.open:
            if not writer.is_closing():
                writer.write_eof()
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: not self.open), 10)

    def lenient_view(self, first: int = 0) -> list[list[SeenRequest]]:
        return [lenient_requests(bytes(stream))[0] for stream in self.streams[first:]]

    def strict_view(self, first: int = 0) -> list[tuple[list[SeenRequest], str | None]]:
        return [strict_requests(bytes(stream)) for stream in self.streams[first:]]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = bytearray()
        self.streams.append(stream)
        self.open.add(writer)
        answered = 0
        switched = False
        try:
            while data := await reader.read(65536):
                stream += data
                if switched:
                    continue
                requests, _ = lenient_requests(bytes(stream))
                for request in requests[answered:]:
                    answered += 1
                    writer.write(self.scripts.get(request.target) or echo_response(request))
                    if b"upgrade" in request.headers:
                        switched = True
                        break
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.open.discard(writer)
            async with self.changed:
                self.changed.notify_all()
