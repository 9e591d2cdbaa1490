"""Connections to the app: an asyncio Protocol per connection with an llhttp response parser, and
a bounded LIFO pool of idle keep-alive connections."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections import deque
from typing import Protocol, cast

import httptools

from drainproxy.config.schema import LimitsConfig, UpstreamConfig
from drainproxy.dataplane.http1 import (
    CHUNK_OVERHEAD_ALLOWANCE,
    GATHER_BYTES,
    Headers,
    gather_more,
    gather_start,
    keep_alive_timeout,
)
from drainproxy.system.tls import upstream_context

log = logging.getLogger("drainproxy.upstream")

_FRAMING_TOO_LARGE = (
    "chunk extensions or trailer fields larger than limits.max_response_header_bytes"
)


class ExchangeSink(Protocol):
    """The client side of the exchange an ``UpstreamConnection`` is bound to, told what the app
    answers: an HTTP/1.1 client connection (``proxy.ClientConnection``) or an HTTP/2 client's
    stream carried over HTTP/1.1 (``h2_client.Http1Exchange``). The upstream calls these; it
    never imports the client side (issue 13)."""

    def start_batch(self) -> None:
        """One read from the app is about to be parsed: hold writes to the client until
        ``flush``, so a head and its body leave in one system call."""

    def flush(self) -> None: ...

    def pause_reading_for_upstream(self) -> None:
        """The app's socket buffer is full: stop reading the request body from the client."""

    def resume_reading_for_upstream(self) -> None: ...

    def response_interim(self, status: int, reason: bytes, headers: Headers) -> bool:
        """A 1xx (but 101); False when it is invalid: the exchange failed, stop parsing."""

    def response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: Headers
    ) -> None:
        """The final response's head. The sink sets ``conn.body_left`` for a Content-Length
        body, ``conn.close_delimited`` for a body the app ends by closing, and
        ``conn.response_done`` for a response with no body that llhttp cannot know of (HEAD)."""

    def response_body(self, body: bytes) -> None: ...

    def response_complete(self, conn: UpstreamConnection) -> None: ...

    def upstream_lost(self, conn: UpstreamConnection, kind: str) -> None:
        """The app closed (``kind`` "closed") or reset ("reset") before the response ended."""

    def upstream_failed(self, kind: str, message: str) -> None:
        """The app's response broke the protocol or a limit; the connection is dropped."""

    def tunnel_data_from_upstream(self, data: bytes) -> None: ...

    def tunnel_closed_by_upstream(self) -> None: ...


class _StopParsing(Exception):
    """Raised in a parser callback to stop reading the app's bytes: the exchange is over (its
    response complete, or failed), and nothing after it may be read as anything."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the app, bound to at most one client exchange at a time."""

    __slots__ = (
        "body_left",
        "client",
        "close_delimited",
        "closed",
        "framing_credit",
        "gathered",
        "headers",
        "keep_alive",
        "keep_alive_field",
        "max_head_bytes",
        "overhead",
        "parser",
        "parser_at_rest",
        "pool",
        "read_size",
        "reading_paused",
        "reason",
        "response_done",
        "response_head_done",
        "reuse_until",
        "reused",
        "status",
        "trailer_bytes",
        "transport",
        "tunnel",
        "write_paused",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: ExchangeSink | None = None
        self.parser: httptools.HttpResponseParser | None = None
        #: The parser ended its last message itself, so it can read the next one.
        self.parser_at_rest = False
        self.reused = False
        self.closed = False
        self.tunnel = False
        #: The size of this exchange's last read from the app (0: no byte of a response yet).
        self.read_size = 0
        self.response_head_done = False
        #: The final response is complete; the client hears of it once the read is parsed,
        #: so that bytes after it in the same read are seen first (see ``data_received``).
        self.response_done = False
        self.keep_alive = False
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        #: The last response's Keep-Alive field: the app's own idle timeout, if it says.
        self.keep_alive_field: bytes | None = None
        #: While pooled: the time after which the app may have closed it (``UpstreamPool``).
        self.reuse_until = 0.0
        self.reading_paused = False
        self.write_paused = False
        #: Bytes still to come of a body framed by Content-Length (set by the client side,
        #: which knows whether the response has a body at all); see ``_pass_body``.
        self.body_left = 0
        #: The response's body ends when the app closes (no length, not chunked: RFC 9112
        #: §6.3), as the client side decided from its head.
        self.close_delimited = False
        #: Bytes of this exchange's response that are not body data, held to ``max_head_bytes``
        #: (``limits.max_response_header_bytes``; issue 11): reads that ended inside a head (1xx
        #: heads included), and chunk framing (extensions, trailers) beyond what the data of
        #: the same read pays for (``framing_credit``; see ``_count_framing``); and, against
        #: the same limit, its trailer fields as they come.
        self.max_head_bytes = pool.max_head_bytes
        self.overhead = 0
        self.framing_credit = 0
        self.trailer_bytes = 0
        #: Reads of an unfinished head not yet fed to the parser (``http1.gather_more``).
        self.gathered: bytearray | None = None

    # --- binding to a client exchange -------------------------------------------------------

    def bind(self, client: ExchangeSink) -> None:
        """Start a new exchange. The parser is reused only if it ended the last response itself:
        after a HEAD response it still expects a body, so that one gets a fresh parser."""
        self.client = client
        if not self.parser_at_rest or self.parser is None:
            self.parser = httptools.HttpResponseParser(self)
        self.parser_at_rest = False
        self.read_size = self.overhead = self.trailer_bytes = 0
        self.response_head_done = False
        self.response_done = False
        self.headers = []
        self.reason = b""
        self.body_left = 0
        self.close_delimited = False
        if self.write_paused:
            client.pause_reading_for_upstream()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        assert self.transport is not None
        self.transport.writelines(parts)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection now; the app sees a reset, and no callback reaches a client."""
        self.client = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close_tunnel(self) -> None:
        """End a tunnel after writing what the client sent last."""
        self.client = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pool.open_connections += 1

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.tunnel:
            if client is not None:
                client.tunnel_data_from_upstream(data)
            return
        if self.body_left and client is not None:
            self._pass_body(client, data)
            return
        parser = self.parser
        if client is None or parser is None:
            # Bytes from the app while no request is outstanding: the connection is unusable.
            self.abort()
            return
        self.read_size = len(data)
        if self.gathered is not None:
            held = gather_more(self.gathered, data)
            if held is None:
                return  # the head cannot have ended yet
            self.gathered = None
            data = held
            self.read_size = len(data)
        head_done_before = self.response_head_done
        if head_done_before:
            self.framing_credit = 0  # what this read's data pays (``_count_framing``)
        client.start_batch()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            tail = data[upgrade.args[0] :]
            if self.tunnel and tail and self.client is not None:
                self.client.tunnel_data_from_upstream(tail)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopParsing):
                # Bytes the app sent unasked after a complete response: whatever they are
                # (a second response, a body after HEAD or 204), they end this connection.
                # Or the exchange failed (an invalid 1xx): the connection is already dropped.
                self.keep_alive = False
                if not self.response_done:
                    self.abort()
            else:
                if cause is not None:
                    log.error("internal error on a response from the app", exc_info=cause)
                if self.client is not None:
                    self.client.upstream_failed("invalid", f"invalid response from the app: {exc}")
                self.abort()
        else:
            if self.client is None or self.response_done:
                pass  # the exchange ended in this read: nothing is held
            elif self.body_left:
                # The body goes on past this read: the rest bypasses the parser, which is
                # left mid-message, so the next exchange gets a fresh one.
                self.parser = None
            elif not self.response_head_done:
                self._count_head(len(data))
                if len(data) < GATHER_BYTES and not self.closed:
                    self.gathered = gather_start(data)
            elif head_done_before:
                self._count_framing(len(data))
        finally:
            if self.response_done and self.client is not None:
                self.client.response_complete(self)
            client.flush()

    def _count_head(self, size: int) -> None:
        """A read ended inside a response head, which llhttp and httptools hold until it ends:
        past the limit the response is refused (502) rather than held without end."""
        self.overhead += size
        if self.overhead > self.max_head_bytes:
            self._fail("response head larger than limits.max_response_header_bytes")

    def _fail(self, message: str) -> None:
        """The response broke a limit: 502, or a cut if it began; this connection is done."""
        if self.client is not None:
            self.client.upstream_failed("invalid", message)
        self.abort()

    def _count_framing(self, size: int) -> None:
        """A read of the body through the parser (chunked): what its data does not pay for
        (``http1.CHUNK_OVERHEAD_ALLOWANCE``) adds up; past the limit the response is cut."""
        excess = self.overhead + size - self.framing_credit
        self.overhead = excess if excess > 0 else 0
        if excess > self.max_head_bytes:
            self._fail(_FRAMING_TOO_LARGE)

    def _pass_body(self, client: ExchangeSink, data: bytes) -> None:
        """Forward the rest of a Content-Length body as read: no parser call and no copy per
        read (llhttp would copy every body byte into a new ``bytes`` for ``on_body``)."""
        left = self.body_left
        if len(data) > left:
            # Bytes past the end of the response: the app broke framing; do not reuse this.
            data = data[:left]
            self.keep_alive = False
        self.body_left = left - len(data)
        client.start_batch()
        try:
            client.response_body(data)
            if not self.body_left:
                client.response_complete(self)
        finally:
            client.flush()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.open_connections -= 1
        self.pool.forget(self)
        client, self.client = self.client, None
        if client is None:
            return
        if self.tunnel:
            client.tunnel_closed_by_upstream()
        elif self.response_head_done and exc is None and self.close_delimited:
            # The app's close is the end of a body framed by the close.
            client.response_complete(self)
        else:
            client.upstream_lost(self, "reset" if exc is not None else "closed")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.client is not None:
            self.client.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.resume_reading_for_upstream()

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response_done:
            raise _StopParsing

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.response_head_done:
            self.headers.append((name, value))
            return
        # A trailer field: dropped, but counted (name, ": ", value, CRLF).
        self.trailer_bytes += len(name) + len(value) + 4
        if self.trailer_bytes > self.max_head_bytes and self.client is not None:
            self._fail(_FRAMING_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self.parser
        client = self.client
        assert parser is not None
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        if client is None:
            return
        if (
            self.read_size + self.overhead > self.max_head_bytes
            and self._head_size() > self.max_head_bytes
        ):
            # This read may have carried a whole head past the limit: measure that head.
            self._fail("response head larger than limits.max_response_header_bytes")
            return
        if 100 <= self.status < 200 and self.status != 101:
            if not client.response_interim(self.status, self.reason, self.headers):
                raise _StopParsing
            self.headers = []
            self.reason = b""
            return
        self.response_head_done = True
        client.response_head(self, self.status, self.reason, self.headers)

    def _head_size(self) -> int:
        """The head just parsed, as sent: status line, fields, blank line."""
        size = len("HTTP/1.1 200 \r\n\r\n") + len(self.reason)
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        return size

    def on_body(self, body: bytes) -> None:
        if self.response_done:
            raise _StopParsing  # a body after a HEAD response
        if self.body_left:
            self.body_left -= len(body)
        else:  # chunked (or close-delimited): the data pays for the framing
            self.framing_credit += 3 * len(body) + CHUNK_OVERHEAD_ALLOWANCE
        if self.client is not None:
            self.client.response_body(body)

    def on_message_complete(self) -> None:
        if self.response_head_done:
            self.parser_at_rest = True
            self.response_done = True


class UpstreamPool:
    """Idle keep-alive connections to the app, most recently used first (the warmest socket,
    and the least likely to have been closed by the app's own idle timeout).

    The keep-alive race: an app closes a connection it has kept idle for its own timeout; a
    request written into it at that moment is lost (a POST cannot be retried). So a connection
    is reused only while the app surely still keeps it: for ``upstream.idle_timeout`` (which must
    be shorter than the app's), or for the app's announced ``Keep-Alive: timeout=N`` less
    ``upstream.keep_alive_margin`` if that is shorter (as undici does); never when that leaves
    nothing. Expiry is checked when a connection is taken, so a request never gets a stale one,
    and by the proxy's periodic sweep, which frees the sockets."""

    def __init__(
        self,
        config: UpstreamConfig,
        loop: asyncio.AbstractEventLoop,
        max_head_bytes: int = LimitsConfig.max_response_header_bytes,
    ) -> None:
        """``max_head_bytes``: ``limits.max_response_header_bytes``."""
        self.config = config
        self.loop = loop
        self.idle: deque[UpstreamConnection] = deque()
        self.open_connections = 0
        self.max_head_bytes = max_head_bytes
        #: Pooled connections closed because their reuse window ended, since the last sweep.
        self.expired = 0
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        self._idle_timeout = config.idle_timeout or math.inf
        self._margin = config.keep_alive_margin
        if config.tls is not None:
            self.ssl = upstream_context(config.tls)
            self.server_hostname = config.tls.server_name or config.host

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now >= conn.reuse_until:
                conn.abort()
                self.expired += 1
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A fresh connection; raises OSError or TimeoutError."""
        _, protocol = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConnection(self),
                self.config.host,
                self.config.port,
                ssl=self.ssl,
                server_hostname=self.server_hostname,
            ),
            self.config.connect_timeout or None,
        )
        return protocol

    def release(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for reuse, or close it when the pool is full or the app's announced
        idle timeout leaves no safe time to reuse it."""
        conn.client = None
        if conn.closed:
            return
        window = self._idle_timeout
        field = conn.keep_alive_field
        if field is not None:
            conn.keep_alive_field = None
            announced = keep_alive_timeout(field)
            if announced is not None and announced - self._margin < window:
                window = announced - self._margin
        if window <= 0 or len(self.idle) >= self.config.max_idle_connections:
            conn.abort()
            return
        conn.resume_reading()
        conn.reuse_until = self.loop.time() + window
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def expire_idle(self, now: float) -> int:
        """Close pooled connections whose reuse window has ended; returns how many were closed
        since the last call (here or in ``take_idle``)."""
        if any(now >= conn.reuse_until for conn in self.idle):
            kept: deque[UpstreamConnection] = deque()
            for conn in self.idle:
                if now >= conn.reuse_until:
                    conn.abort()
                    self.expired += 1
                else:
                    kept.append(conn)
            self.idle = kept
        expired, self.expired = self.expired, 0
        return expired

    def close_all(self) -> None:
        while self.idle:
            self.idle.pop().abort()
