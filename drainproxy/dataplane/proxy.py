"""The client side of the data path: one asyncio Protocol per client connection, an llhttp request
parser, and the relay of each exchange to an upstream connection.

A connection is in one ``ConnectionState``: what it does with the bytes it reads (parse them as
requests, hold them for an Upgrade, relay them through a tunnel, discard them while a close
lingers), changed only along the moves in ``TRANSITIONS``. Each request and its response are one
``Exchange``, dropped when the response ends: the connection holds the one being read
(``current``), the one being answered (``active``; the same object while its body is still
read) and those parsed ahead of their turn (``queue``). A connection holding none is idle.

Per connection, one exchange is active at a time; pipelined requests queue behind it with
reading paused, so responses go out in order. Bodies stream both ways; a full write buffer on one
side pauses reading on the other (back-pressure), so memory does not grow with the body. What
each head becomes is decided by pure functions (``http1.request_for_app``,
``http1.response_for_client``); this module does the I/O around them.

Timeouts cost a request no timer: each connection keeps the time of its last progress (``mark``)
and one periodic sweep per process compares it with the limit of the state the connection is in.

Connection code never looks at drain phases: it asks ``lifecycle.should_close_connection()``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import struct
from collections import deque
from typing import cast

import httptools

from drainproxy.core.lifecycle import Phase
from drainproxy.dataplane.access import AccessRecord
from drainproxy.dataplane.context import ProxyContext
from drainproxy.dataplane.http1 import (
    BODY_CHUNKED,
    BODY_NONE,
    CHUNK_OVERHEAD_ALLOWANCE,
    CRLF,
    FRAME_CHUNKED,
    FRAME_NONE,
    FRAME_RAW,
    GATHER_BYTES,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    FramingError,
    Headers,
    chunk_size_line,
    gather_more,
    gather_start,
    interim_for_client,
    plain_response,
    request_for_app,
    response_for_client,
    switch_offered,
    upgrade_offered,
)
from drainproxy.dataplane.upstream import UpstreamConnection

log = logging.getLogger("drainproxy.proxy")

#: The start of the HTTP/2 connection preface (RFC 9113 §3.4); no HTTP/1 method is ``PRI``.
_H2_PREFACE_START = b"PRI"

# Why reading from the client is paused; reading resumes when no reason is left.
_PAUSE_PIPELINE = 1  # a request is queued behind the active one
_PAUSE_UPSTREAM = 2  # the app's socket buffer is full
_PAUSE_BUFFER = 4  # body bytes are buffered while no upstream connection is attached

#: Request body bytes held while connecting to the app, before reading pauses.
_BUFFER_LIMIT = 64 * 1024
#: Requests parsed ahead of the one being answered; more are refused (503) after those.
_MAX_PIPELINED = 64
#: How long a staged close keeps reading (and discarding) input without progress before it
#: closes: closing with unread input makes the kernel reset the connection, which can destroy
#: our answer before the client reads it (RFC 9112 §9.6). Progress is the client reading what
#: is still buffered for it, so a slow reader still gets the whole answer.
_LINGER_SECONDS = 2.0
#: The same for a connection refused at ``limits.max_connections``: short, as it holds a file.
_REFUSAL_LINGER_SECONDS = 0.5
#: The close reason of a connection refused at ``limits.max_connections``.
_REFUSED = "refused"

_FRAMING_TOO_LARGE = "chunk extensions or trailer fields larger than limits.max_header_bytes"
#: Up to this many response bytes from one read of the app are joined into one ``write``;
#: larger bodies go by ``writelines`` (writev) rather than be copied.
_JOIN_LIMIT = 16 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)
_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_CONNECTION_UPGRADE = b"Connection: upgrade\r\n"
_SERVING = Phase.SERVING


class ConnectionState(enum.Enum):
    """What a client connection does with the bytes it reads (RFC 9112 §9), named as h11 names
    its states where it has the same. Whether a connection is idle is not a state: it is
    whether it holds an exchange (``ClientConnection.is_idle``)."""

    #: Accepted, nothing read yet: the first bytes may be the HTTP/2 preface (RFC 9113 §3.4).
    NEW = "new"
    #: Persistent (RFC 9112 §9.3): requests are read, and answered in order.
    OPEN = "open"
    #: A request was refused: no further one is read; those parsed before it are answered, then
    #: the refusal, then the connection closes.
    MUST_CLOSE = "must_close"
    #: The client shut its side while its answer was on the way: nothing more can be read; the
    #: answer is finished, then the connection closes (at once: no input to wait out).
    INPUT_ENDED = "input_ended"
    #: An Upgrade request was parsed (llhttp stops there): what the client sends next is held
    #: until the app answers it, for the tunnel.
    MIGHT_SWITCH_PROTOCOL = "might_switch_protocol"
    #: The app answered 101 (RFC 9110 §15.2.2): bytes are relayed both ways as they come.
    SWITCHED_PROTOCOL = "switched_protocol"
    #: A staged close (RFC 9112 §9.6): our side shuts once written out, and input is read and
    #: discarded until the client closes too, or the linger ends.
    LINGERING = "lingering"
    #: Closed or closing at once, or handed over to HTTP/2: nothing more is read or written.
    CLOSED = "closed"

    def __init__(self, value: str) -> None:
        #: Nothing more is written to the client, nor read from it as a request.
        self.closing = value in ("lingering", "closed")


_NEW = ConnectionState.NEW
_OPEN = ConnectionState.OPEN
_MUST_CLOSE = ConnectionState.MUST_CLOSE
_INPUT_ENDED = ConnectionState.INPUT_ENDED
_MIGHT_SWITCH_PROTOCOL = ConnectionState.MIGHT_SWITCH_PROTOCOL
_SWITCHED_PROTOCOL = ConnectionState.SWITCHED_PROTOCOL
_LINGERING = ConnectionState.LINGERING
_CLOSED = ConnectionState.CLOSED

#: The legal moves: any other raises ``IllegalTransition``, leaving the state as it was.
#: (Every state may be cut to CLOSED: ``drain.timeout``, a reset, the client's going away.)
TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    # The first read decides HTTP/1 (OPEN) or HTTP/2 (CLOSED: handed over); a connection that
    # sent nothing closes idle, or is refused at once.
    _NEW: frozenset({_OPEN, _LINGERING, _CLOSED}),
    _OPEN: frozenset({_MUST_CLOSE, _INPUT_ENDED, _MIGHT_SWITCH_PROTOCOL, _LINGERING, _CLOSED}),
    _MUST_CLOSE: frozenset({_INPUT_ENDED, _LINGERING, _CLOSED}),
    _INPUT_ENDED: frozenset({_CLOSED}),
    # The app answers the Upgrade with 101 (a tunnel), or with another response that closes.
    _MIGHT_SWITCH_PROTOCOL: frozenset({_SWITCHED_PROTOCOL, _INPUT_ENDED, _LINGERING, _CLOSED}),
    _SWITCHED_PROTOCOL: frozenset({_LINGERING, _CLOSED}),
    _LINGERING: frozenset({_CLOSED}),
    _CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move ``TRANSITIONS`` does not have: a bug in this module, never the peer's doing."""

    def __init__(self, current: ConnectionState, wanted: ConnectionState) -> None:
        super().__init__(f"client connection: no move from {current.name} to {wanted.name}")
        self.current = current
        self.wanted = wanted


class Rejection(Exception):
    """A request drainproxy refuses itself (raised inside parser callbacks)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Exchange:
    """One request and its response: made at the request's first byte, dropped when the
    response ends (or fails). While its request is read it is the connection's ``current``,
    while answered its ``active``, and in between it may wait in the ``queue``."""

    __slots__ = (
        "access",
        "body",
        "body_size",
        "close_after",
        "complete",
        "frame",
        "head",
        "head_done",
        "head_sent",
        "headers",
        "keep_alive",
        "method",
        "pending",
        "pending_size",
        "response_started",
        "retried",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        # The request, as read.
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: Headers = []
        self.keep_alive = True
        self.upgrade = False
        self.head_done = False
        self.complete = False
        #: The head as forwarded to the app, and how its body follows (``http1.BODY_*``): both
        #: from ``http1.request_for_app`` once the head is parsed.
        self.head = b""
        self.body = BODY_NONE
        self.body_size = 0
        #: Body bytes read before the head went to the app.
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.head_sent = False
        self.retried = False
        # The response.
        self.response_started = False
        #: How its body goes to the client (``http1.FRAME_*``).
        self.frame = FRAME_NONE
        #: The connection closes after it.
        self.close_after = False
        #: The access log's record of it, only when ``log.access_log`` is on.
        self.access: AccessRecord | None = None

    def describe(self) -> str:
        if not self.head_done:
            return "a request"
        return f"{self.method.decode('latin-1')} {self.target.decode('latin-1')}"


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "__weakref__",
        "active",
        "batch",
        "batch_body_bytes",
        "close_delimited_to_client",
        "close_reason",
        "connect_task",
        "ctx",
        "current",
        "feeding",
        "framing_credit",
        "gathered",
        "head_bytes",
        "header_bytes",
        "idle_since",
        "idle_timer",
        "linger_timer",
        "mark",
        "parser",
        "paused",
        "peer",
        "peer_bytes",
        "pending_reject",
        "queue",
        "state",
        "transport",
        "tunnel",
        "upgrade_buffer",
        "upstream",
        "write_paused",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        if ctx.listener_ssl is not None:
            ctx.handshaking.add(self)
        self.state = _NEW
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        #: The peer's address as X-Forwarded-For carries it.
        self.peer_bytes = b""
        self.parser = httptools.HttpRequestParser(self)
        self.current: Exchange | None = None  # its request being read
        self.active: Exchange | None = None  # being answered
        self.queue: deque[Exchange] | None = None  # parsed, waiting for the active one
        self.upstream: UpstreamConnection | None = None
        #: SWITCHED_PROTOCOL: the app's end of the tunnel.
        self.tunnel: UpstreamConnection | None = None
        #: MIGHT_SWITCH_PROTOCOL: what the client sent after its Upgrade request.
        self.upgrade_buffer: list[bytes] | None = None
        #: Writes held while one read from the app is parsed (see ``start_batch``).
        self.batch: list[bytes] | None = None
        self.batch_body_bytes = 0
        #: A read from the client is being parsed: the request head for the app waits for the
        #: end of it, so the head and the body bytes of the same read leave in one write.
        self.feeding = False
        #: Why reading is paused (``_PAUSE_*`` bits; 0: reading).
        self.paused = 0
        #: The client's socket buffer is full (``pause_writing``): the app is not read.
        self.write_paused = False
        #: The client can tell the end of the last response's body only by the close, so a cut
        #: must be a reset (issue 11). That response closes the connection: never unset.
        self.close_delimited_to_client = False
        self.linger_timer: asyncio.TimerHandle | None = None
        #: The ``connections_closed`` label it will be counted under.
        self.close_reason = "client"
        #: When the connection last made progress in its current state (see ``check_timeouts``).
        self.mark = 0.0
        #: Bytes of the request being parsed that are not body data, held to
        #: ``limits.max_header_bytes`` (issue 11): reads that ended inside its head, and chunk
        #: framing beyond what the data of the same read pays for (``framing_credit``; see
        #: ``_count_chunked_framing``).
        self.head_bytes = 0
        self.framing_credit = 0
        #: Its target and fields, trailer fields included (as in Node), as llhttp delivers
        #: them, against the same limit.
        self.header_bytes = 0
        #: The reads of an unfinished head not yet fed to the parser (``http1.gather_more``).
        self.gathered: bytearray | None = None
        self.idle_since: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        #: MUST_CLOSE: the refusal to answer, in order, once the requests before it are.
        self.pending_reject: tuple[int, str] | None = None

    @property
    def closing(self) -> bool:
        """A close is under way (lingering) or done: nothing more is read or written."""
        return self.state.closing

    def _enter(self, state: ConnectionState) -> None:
        """Move to ``state``; IllegalTransition, with the state unchanged, for a move that
        ``TRANSITIONS`` does not have."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.state, state)
        self.state = state

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        if ctx.listener_ssl is not None:
            ctx.handshaking.discard(self)
        ctx.stats.connections_accepted += 1
        ctx.stats.last_connection_at = ctx.loop.time()
        if len(ctx.connections) >= ctx.max_connections:
            self._refuse()
            return
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "-"
        self.peer_bytes = self.peer.encode()
        self.idle_since = self.mark = ctx.loop.time()
        ctx.connections.add(self)
        if ctx.listener_ssl is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._become_http2(b"")
                return
        lifecycle = ctx.lifecycle
        if lifecycle.phase is not _SERVING and not lifecycle.accepts_connections():
            # Accepted from the queue of a listener being closed: silent, it is idle.
            self.close_when_idle(ctx.config.drain.idle_grace)

    def _become_http2(self, data: bytes) -> None:
        """Hand the connection to HTTP/2 (its first bytes, ``data``, included); this object
        is done, and its ``connection_lost`` never comes."""
        from drainproxy.dataplane.h2_client import take_over

        transport = self.transport
        assert transport is not None
        self._enter(_CLOSED)
        self.ctx.connections.discard(self)
        take_over(self.ctx, transport, self.peer, data)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is not _OPEN:
            if state is _NEW:
                if data[:3] == _H2_PREFACE_START:
                    self._become_http2(data)
                    return
                self._enter(_OPEN)
            elif state is _SWITCHED_PROTOCOL:
                tunnel = self.tunnel
                assert tunnel is not None
                tunnel.write(data)
                return
            elif state is _MIGHT_SWITCH_PROTOCOL:
                buffer = self.upgrade_buffer
                assert buffer is not None
                buffer.append(data)
                self._pause(_PAUSE_BUFFER)
                return
            else:
                return  # no further request is parsed; a staged close discards input
        if self.gathered is not None:
            held = gather_more(self.gathered, data)
            if held is None:
                return  # the head cannot have ended yet
            self.gathered = None
            data = held
        current = self.current
        if current is None:
            in_head = False
        else:
            in_head = not current.head_done
            if not in_head:
                self.framing_credit = 0  # what this read's data pays
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.state is _OPEN:  # else the request was answered (CONNECT), and closes
                self.upgrade_buffer = [data[upgrade.args[0] :]]
                self._enter(_MIGHT_SWITCH_PROTOCOL)
                self._pause(_PAUSE_BUFFER)
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Rejection):
                self._reject(cause.status, cause.reason)
            else:
                log.error("internal error on a request from %s", self.peer, exc_info=cause)
                self._reject(500, "internal error")
            return
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")
            return
        finally:
            self.feeding = False
            self._send_deferred_head()
        after = self.current
        if after is None:
            return  # the read ended between requests
        if not after.head_done:
            # The read ended inside a head, which llhttp holds: count it, and gather the
            # next reads rather than feed them one by one.
            if in_head and after is current:
                self.head_bytes += len(data)
                if self.head_bytes > self.ctx.limits.max_header_bytes:
                    self._reject(431, "request head larger than limits.max_header_bytes")
                    return
            if len(data) < GATHER_BYTES:
                self.gathered = gather_start(data)
            return
        if not in_head and current is after and after.body == BODY_CHUNKED:
            self._count_chunked_framing(len(data))

    def _count_chunked_framing(self, size: int) -> None:
        """Bound the bytes of a chunked body that carry no data: chunk extensions (llhttp skips
        them), trailer fields (httptools holds a field until it ends) and CRLFs. Each read's
        data pays for its own framing (``http1.CHUNK_OVERHEAD_ALLOWANCE``); the rest adds up,
        and past ``limits.max_header_bytes`` the request is refused, so an endless extension or
        trailer field costs one socket read of memory beyond the limit, not the heap (issue 11)."""
        excess = self.head_bytes + size - self.framing_credit
        self.head_bytes = excess if excess > 0 else 0
        if excess > self.ctx.limits.max_header_bytes:
            self._reject(400, _FRAMING_TOO_LARGE)

    def eof_received(self) -> bool | None:
        """The client closed its side. TCP cannot tell a half-close from a disconnect, so, as
        nginx does, an exchange still waiting for the app is aborted (the app should not work
        for nobody). A response already on its way is finished; nothing more is read."""
        state = self.state
        if state is _SWITCHED_PROTOCOL:
            tunnel, self.tunnel = self.tunnel, None
            self._enter(_CLOSED)
            if tunnel is not None:
                tunnel.close_tunnel()
            return False
        transport = self.transport
        active = self.active
        if (
            state.closing
            or active is None
            or not active.response_started
            or transport is None
            or not transport.can_write_eof()
        ):
            return False
        self._enter(_INPUT_ENDED)
        self.current = self.queue = self.upgrade_buffer = None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not _CLOSED:
            self._enter(_CLOSED)
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        ctx = self.ctx
        ctx.stats.count(ctx.stats.connections_closed, self.close_reason)
        if self.close_reason == _REFUSED:
            return  # never among the connections
        ctx.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.upstream is not None:
            self.upstream.abort()
        if self.tunnel is not None:
            self.tunnel.close_tunnel()
        self.upstream = self.tunnel = None
        exchange = self.active
        if exchange is not None:
            if exchange.access is not None:
                exchange.access.emit(
                    exchange.method, exchange.target, ctx.loop.time(), self.close_reason
                )
            if self.close_reason == "client":
                log.info(
                    "client %s closed the connection during %s; upstream request aborted",
                    self.peer,
                    exchange.describe(),
                )
        ctx.on_connection_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        conn = self.upstream or self.tunnel
        if conn is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        conn = self.upstream or self.tunnel
        if conn is not None:
            conn.resume_reading()

    # --- llhttp request callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Exchange()
        self.idle_since = None
        self.head_bytes = self.header_bytes = 0
        if self.active is None:
            ctx = self.ctx
            self.mark = now = ctx.loop.time()
            if ctx.arrivals is not None:
                ctx.arrivals.note(self.peer, now)

    def on_url(self, url: bytes) -> None:
        exchange = self.current
        assert exchange is not None
        exchange.target += url
        self.header_bytes += len(url)
        if len(exchange.target) > self.ctx.limits.max_request_line:
            raise Rejection(414, "request target longer than limits.max_request_line")

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.current
        assert exchange is not None
        limits = self.ctx.limits
        if exchange.head_done:
            # A trailer field: dropped, but counted with the head's (name, ": ", value, CRLF).
            self.header_bytes += len(name) + len(value) + 4
            if self.header_bytes > limits.max_header_bytes:
                raise Rejection(400, _FRAMING_TOO_LARGE)
            return
        exchange.headers.append((name, value))
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > limits.max_header_bytes:
            raise Rejection(431, "request head larger than limits.max_header_bytes")
        if len(exchange.headers) > limits.max_headers:
            raise Rejection(431, "more header fields than limits.max_headers")

    def on_headers_complete(self) -> None:
        exchange = self.current
        assert exchange is not None
        parser = self.parser
        exchange.head_done = True
        exchange.method = method = parser.get_method()
        exchange.version = version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.upgrade = upgrade = parser.should_upgrade()
        try:
            exchange.head, exchange.body = request_for_app(
                method,
                exchange.target,
                version,
                exchange.headers,
                upgrade,
                self.ctx.forwarding,
                self.peer_bytes,
            )
        except FramingError as exc:
            raise Rejection(exc.status, str(exc)) from None
        if self.active is None:
            self._start(exchange)
            return
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        elif len(queue) >= _MAX_PIPELINED:
            raise Rejection(503, "too many pipelined requests; send the rest on a new connection")
        queue.append(exchange)
        self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        exchange = self.current
        assert exchange is not None
        if exchange.body == BODY_CHUNKED:
            # The data's own bytes are in the read too: three times, to pay twice as much.
            self.framing_credit += 3 * len(body) + CHUNK_OVERHEAD_ALLOWANCE
        max_body = self.ctx.limits.max_body_bytes
        if max_body is not None:
            exchange.body_size += len(body)
            if exchange.body_size > max_body:
                raise Rejection(413, "request body larger than limits.max_body_bytes")
        if exchange is self.active:
            self.mark = self.ctx.loop.time()
            conn = self.upstream
            if exchange.head_sent and conn is not None:
                if exchange.body == BODY_CHUNKED:
                    conn.writelines((chunk_size_line(len(body)), body, CRLF))
                else:
                    conn.write(body)
                return
        exchange.pending.append(body)
        exchange.pending_size += len(body)
        if exchange.pending_size > _BUFFER_LIMIT:
            self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        exchange = self.current
        assert exchange is not None
        exchange.complete = True
        self.current = None
        conn = self.upstream
        if exchange is self.active and exchange.head_sent and conn is not None:
            if exchange.body == BODY_CHUNKED:
                conn.write(LAST_CHUNK)
            if not exchange.response_started:
                self.mark = self.ctx.loop.time()  # the response head timeout runs from here

    # --- the exchange with the app -----------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        ctx = self.ctx
        self.active = exchange
        self.idle_since = None
        self.mark = ctx.loop.time()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        stats = ctx.stats
        stats.requests_total += 1
        # ``_value_`` is what the ``value`` property (a Python-level call) returns.
        phase: str = ctx.lifecycle.phase._value_
        by_phase = stats.requests_by_phase
        by_phase[phase] = by_phase.get(phase, 0) + 1
        if ctx.access_log:
            exchange.access = AccessRecord(self.mark, phase)
        if exchange.method == b"CONNECT":
            self._fail(405, "method", "CONNECT is not supported by a reverse proxy", logging.INFO)
            return
        conn = ctx.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self.connect_task = ctx.loop.create_task(self._connect_and_attach(exchange))

    async def _connect_and_attach(self, exchange: Exchange) -> None:
        ctx = self.ctx
        upstream = ctx.config.upstream
        try:
            conn = await ctx.pool.connect()
        except TimeoutError:
            if self.active is exchange and not self.state.closing:
                ctx.stats.count(ctx.stats.timeouts, "connect")
                self._fail(
                    504, "timeout", f"no connection to the app within {upstream.connect_timeout:g}s"
                )
            return
        except OSError as exc:
            if self.active is exchange and not self.state.closing:
                self._fail(502, "refused", f"cannot connect to the app: {exc.strerror or exc}")
            return
        finally:
            self.connect_task = None
        if self.active is not exchange or self.state.closing:
            ctx.pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        exchange = self.active
        assert exchange is not None
        self.upstream = conn
        conn.bind(self)
        if self.write_paused:
            conn.pause_reading()
        if not self.feeding:
            self._send_head(exchange, conn)
        # else: ``data_received`` sends it once the read is parsed (``_send_deferred_head``).

    def _send_deferred_head(self) -> None:
        exchange = self.active
        conn = self.upstream
        if (
            exchange is not None
            and conn is not None
            and not exchange.head_sent
            and not self.state.closing
        ):
            self._send_head(exchange, conn)

    def _send_head(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        """Send the request head with the body bytes buffered so far, in one write."""
        head = exchange.head
        chunked = exchange.body == BODY_CHUNKED
        if not exchange.pending and not (exchange.complete and chunked):
            conn.write(head)
        else:
            parts = [head]
            if chunked:
                for part in exchange.pending:
                    parts += (chunk_size_line(len(part)), part, CRLF)
                if exchange.complete:
                    parts.append(LAST_CHUNK)
            else:
                parts += exchange.pending
            if exchange.pending_size <= _JOIN_LIMIT:
                conn.write(b"".join(parts))
            else:
                conn.writelines(tuple(parts))
            exchange.pending = []
            exchange.pending_size = 0
        exchange.head_sent = True
        if exchange.access is not None:
            exchange.access.upstream_sent = self.ctx.loop.time()
        self._resume(_PAUSE_BUFFER)
        if exchange.complete and not exchange.response_started:
            self.mark = self.ctx.loop.time()  # the response head timeout runs from here

    # --- the upstream.ExchangeSink the UpstreamConnection reports to ---------------------------

    def response_interim(self, status: int, reason: bytes, headers: Headers) -> bool:
        """Pass a 1xx on to an HTTP/1.1 client; False when it is invalid (the exchange failed)."""
        exchange = self.active
        if exchange is None:
            return False
        try:
            out = interim_for_client(status, reason, headers, exchange.version == "1.0")
        except FramingError as exc:
            self.upstream_failed("invalid", f"invalid response from the app: {exc}")
            return False
        if out is not None:
            self._write_pieces(out)
        return True

    def response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: Headers
    ) -> None:
        exchange = self.active
        assert exchange is not None
        ctx = self.ctx
        if exchange.access is not None:
            exchange.access.response_head(status, ctx.loop.time())
        lifecycle = ctx.lifecycle
        close = (
            not exchange.keep_alive
            or not exchange.complete
            or exchange.upgrade
            or (self.state is not _OPEN and self._last_exchange())
            # While SERVING (the common case) the Enum-hashing query is skipped.
            or (lifecycle.phase is not _SERVING and lifecycle.should_close_connection())
        )
        try:
            out, info, framing, close = response_for_client(
                status,
                reason,
                headers,
                exchange.method == b"HEAD",
                exchange.version == "1.0",
                close,
            )
        except FramingError as exc:
            self.upstream_failed("invalid", f"invalid response from the app: {exc}")
            return
        conn.keep_alive_field = info.keep_alive
        if framing is None:  # 101 Switching Protocols
            if exchange.upgrade and switch_offered(upgrade_offered(exchange.headers), info.upgrade):
                assert info.upgrade is not None
                self._start_tunnel(conn, out, info.upgrade)
            else:
                self.upstream_failed(
                    "invalid", "101 response switching to a protocol the request did not offer"
                )
            return
        if framing.frame:
            length = info.content_length
            if length is not None:
                conn.body_left = int(length)
            elif framing.until_app_close:
                conn.close_delimited = True
        if framing.until_client_close:
            self.close_delimited_to_client = True
        exchange.frame = framing.frame
        exchange.close_after = close
        exchange.response_started = True
        by_class = ctx.stats.responses_by_class
        status_class = _STATUS_CLASSES[status // 100]
        by_class[status_class] = by_class.get(status_class, 0) + 1
        self._write_pieces(out)
        if exchange.method == b"HEAD":
            # llhttp cannot know this response has no body; the exchange ends with its head.
            conn.response_done = True

    def response_body(self, body: bytes) -> None:
        exchange = self.active
        if exchange is None:
            return
        if exchange.access is not None:
            exchange.access.body_bytes += len(body)
        if self.state.closing:
            return
        batch = self.batch
        assert batch is not None  # only called while the app's bytes are parsed
        self.batch_body_bytes += len(body)
        frame = exchange.frame
        if frame == FRAME_CHUNKED:
            batch += (chunk_size_line(len(body)), body, CRLF)
        elif frame == FRAME_RAW:
            batch.append(body)

    def response_complete(self, conn: UpstreamConnection) -> None:
        exchange = self.active
        if exchange is None or conn is not self.upstream:
            return
        if exchange.frame == FRAME_CHUNKED:
            self._write(LAST_CHUNK)
        self.upstream = None
        # Reused only when both messages ended where both sides agree they did: not after an
        # Upgrade request (the app may have switched protocols, or stopped reading HTTP), a
        # request not sent whole, a close-delimited response or one with bytes after it.
        if (
            conn.keep_alive
            and exchange.complete
            and not exchange.upgrade
            and not conn.closed
            and not conn.close_delimited
        ):
            self.ctx.pool.release(conn)
        else:
            conn.abort()
        self._finish_exchange(exchange)

    def upstream_lost(self, conn: UpstreamConnection, kind: str) -> None:
        """The app closed the connection before the response was complete."""
        exchange = self.active
        if exchange is None or conn is not self.upstream:
            return
        self.upstream = None
        if not exchange.response_started:
            if (
                conn.reused
                and not conn.read_size
                and not exchange.retried
                and exchange.method in IDEMPOTENT_METHODS
                and exchange.body == BODY_NONE
            ):
                # The keep-alive race: the app closed an idle pooled connection as we sent.
                exchange.retried = True
                self.ctx.stats.count(self.ctx.stats.upstream_errors, "retried")
                self.connect_task = self.ctx.loop.create_task(self._connect_and_attach(exchange))
                return
            self._fail(502, kind, f"the app {kind} the connection before responding")
            return
        self._cut(kind, f"the app {kind} the connection mid-response")

    def upstream_failed(self, kind: str, message: str) -> None:
        """The app's response broke the protocol."""
        exchange = self.active
        if exchange is None:
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        if exchange.response_started:
            self._cut(kind, message)
        else:
            self._fail(502, kind, message)

    def start_batch(self) -> None:
        """Collect what is written to the client while one read from the app is parsed, so a
        response head and its body leave in one system call."""
        self.batch = []
        self.batch_body_bytes = 0

    def flush(self) -> None:
        batch, self.batch = self.batch, None
        if batch and not self.state.closing:
            transport = self.transport
            assert transport is not None
            if len(batch) == 1:
                transport.write(batch[0])
            elif self.batch_body_bytes <= _JOIN_LIMIT:
                transport.write(b"".join(batch))  # one small copy beats writev's iovec walk
            else:
                transport.writelines(batch)

    def pause_reading_for_upstream(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_reading_for_upstream(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    # --- tunnels (Upgrade) --------------------------------------------------------------------

    def _start_tunnel(self, conn: UpstreamConnection, out: list[bytes], upgrade: bytes) -> None:
        """``out``: the 101 status line and the response's end-to-end fields. The Upgrade
        request's exchange stays active for as long as the tunnel lasts."""
        self.upstream = None
        if self.state is not _MIGHT_SWITCH_PROTOCOL:
            conn.abort()  # the connection was cut under the exchange: nothing to relay into
            return
        out += (_CONNECTION_UPGRADE, b"Upgrade: ", upgrade, CRLF, CRLF)
        self._write_pieces(out)
        self.tunnel = conn
        conn.tunnel = True
        exchange = self.active
        assert exchange is not None
        exchange.response_started = True
        self.ctx.stats.tunnels_opened += 1
        self.ctx.stats.count(self.ctx.stats.responses_by_class, "1xx")
        buffered, self.upgrade_buffer = self.upgrade_buffer or [], None
        self._enter(_SWITCHED_PROTOCOL)
        for data in buffered:
            if data:
                conn.write(data)
        self._resume(_PAUSE_BUFFER)

    def tunnel_data_from_upstream(self, data: bytes) -> None:
        self._write(data)

    def tunnel_closed_by_upstream(self) -> None:
        self.tunnel = None
        self.close("after_response")  # staged: the client may still be sending into the tunnel

    # --- timeouts -----------------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        """Called by the sweep: act on the one timeout that applies to the current state."""
        state = self.state
        if state.closing or state is _SWITCHED_PROTOCOL:
            return
        elapsed = now - self.mark
        config = self.ctx.config
        timeouts = config.timeouts
        active = self.active
        if active is None:
            head = timeouts.request_head
            if self.current is not None:
                if head and elapsed >= head:
                    self._timed_out("request_head")
                    self._reject(408, f"request head not received within {head:g}s")
            elif timeouts.client_idle and elapsed >= timeouts.client_idle:
                # A connection that has sent nothing yet is idle too: balancers open backend
                # connections ahead of use (issue 12); the head timeout starts at a first byte.
                self._timed_out("client_idle")
                log.debug("closing a keep-alive connection from %s idle too long", self.peer)
                self.close("idle")
            return
        if not active.complete:
            body = timeouts.client_body
            if body and not self.paused and elapsed >= body:
                self._timed_out("client_body")
                self._reject(408, f"no request body bytes for {body:g}s")
            return
        response = config.upstream.response_timeout
        if (
            response
            and self.upstream is not None
            and not active.response_started
            and elapsed >= response
        ):
            self._timed_out("response_head")
            self._fail(504, "timeout", f"no response head from the app within {response:g}s")

    def _timed_out(self, kind: str) -> None:
        stats = self.ctx.stats
        stats.count(stats.timeouts, kind)

    # --- drain --------------------------------------------------------------------------------

    def is_idle(self) -> bool:
        """No exchange: none being read, none answered (a tunnel's stays active)."""
        return self.active is None and self.current is None

    def in_flight(self) -> int:
        return 0 if self.is_idle() else 1

    def announce_drain(self) -> None:
        """HTTP/1.1 learns of the drain from ``Connection: close`` on its next response."""

    def close_when_idle(self, grace: float) -> None:
        """Close now if idle past ``grace``; else check again when it would be. A busy connection
        closes after its response, which carries ``Connection: close``."""
        if self.state.closing or not self.is_idle() or self.idle_since is None:
            return
        idle_for = self.ctx.loop.time() - self.idle_since
        if idle_for >= grace:
            self.close("idle")
        elif self.idle_timer is None:
            self.idle_timer = self.ctx.loop.call_later(grace - idle_for, self._idle_check, grace)

    def _idle_check(self, grace: float) -> None:
        self.idle_timer = None
        self.close_when_idle(grace)

    # --- closing ------------------------------------------------------------------------------

    def force_close(self) -> None:
        """End the connection now (``drain.timeout``, shutdown), a staged close included. Where
        the client can tell the end of a body only by the close, and that body has not all been
        handed to the kernel, the end is a reset: a cut must never look complete (issue 11)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.state is _CLOSED:
            return
        reason = self.close_reason if self.state is _LINGERING else "forced"
        if self.close_delimited_to_client and (
            self.active is not None or transport.get_write_buffer_size()
        ):
            self._reset(reason)
            return
        self._enter(_CLOSED)
        self.close_reason = reason
        transport.abort()

    def _reset(self, reason: str = "cut") -> None:
        """Close with a TCP reset (a plain close could look like the end of the body); what is
        still buffered for the client is dropped."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.state is _CLOSED:
            return
        self._enter(_CLOSED)
        self.close_reason = reason
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    def close(self, reason: str, *, input_expected: bool = True) -> None:
        """End the connection after what is written so far: a staged close. ``input_expected``
        False: the client said it would send nothing more, so the close follows at once."""
        self._staged_close(reason, _LINGER_SECONDS if input_expected else 0.0)

    def _staged_close(self, reason: str, linger: float) -> None:
        """The one way this proxy closes a client connection gracefully (RFC 9112 §9.6): shut
        our side once what is written has gone out (the client reads it all, then a FIN), read
        and discard input until the client closes too, then close. The discarding lasts at most
        ``linger`` seconds without progress: a client that keeps reading what is buffered for
        it extends it. Closing at once with unread input (a pipelined request, a body we will
        not read) would make the kernel send a reset, which can destroy the answer unread.
        ``linger`` 0, input ended, or TLS (asyncio's TLS transports have no half-close): close
        at once."""
        transport = self.transport
        if self.state.closing or transport is None:
            return
        self.flush()
        self.close_reason = reason
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if not linger or self.state is _INPUT_ENDED or not transport.can_write_eof():
            self._enter(_CLOSED)
            transport.close()
            return
        self._enter(_LINGERING)
        transport.write_eof()
        if self.paused:
            self.paused = 0
            transport.resume_reading()
        self.linger_timer = self.ctx.loop.call_later(
            linger, self._linger_expired, linger, transport.get_write_buffer_size()
        )

    def _linger_expired(self, linger: float, buffered_before: int) -> None:
        """Close; but a client still reading what is buffered for it gets another ``linger``
        seconds, and one that stopped reading it is cut (``force_close``)."""
        self.linger_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        buffered = transport.get_write_buffer_size()
        if not buffered:
            self._enter(_CLOSED)
            transport.close()
        elif buffered < buffered_before:
            self.linger_timer = self.ctx.loop.call_later(
                linger, self._linger_expired, linger, buffered
            )
        else:
            self.force_close()

    # --- internals ----------------------------------------------------------------------------

    def _finish_exchange(self, exchange: Exchange) -> None:
        """The active exchange ended: drop it, then close, start the next one, or wait."""
        ctx = self.ctx
        if exchange.access is not None:
            exchange.access.emit(exchange.method, exchange.target, ctx.loop.time())
        self.active = None
        if self.paused:
            self._resume(_PAUSE_UPSTREAM)
        if exchange.close_after:
            # A client that asked to close after a request it sent whole sends nothing more
            # (RFC 9112 §9.6); any other may: a pipelined request, the rest of a body.
            client_done = (
                exchange.complete
                and not exchange.keep_alive
                and not self.queue
                and self.current is None
            )
            self.close("after_response", input_expected=not client_done)
            return
        queue = self.queue
        if queue:
            following = queue.popleft()
            if not queue:
                self._resume(_PAUSE_PIPELINE)
            self._start(following)
            return
        state = self.state
        if state is _MUST_CLOSE or state is _INPUT_ENDED:
            if self.pending_reject is not None:
                status, reason = self.pending_reject
                self._write(plain_response(status, reason, close=True))
                ctx.stats.count(ctx.stats.responses_by_class, _STATUS_CLASSES[status // 100])
            self.close("after_response")
            return
        self.idle_since = self.mark = ctx.loop.time()
        if self.paused:
            self._resume(_PAUSE_PIPELINE)
        lifecycle = ctx.lifecycle
        # While SERVING (the common case) the Enum-hashing query is skipped.
        if lifecycle.phase is not _SERVING and not lifecycle.accepts_connections():
            self.close_when_idle(ctx.config.drain.idle_grace)

    def _fail(self, status: int, kind: str, message: str, log_level: int = logging.WARNING) -> None:
        """Answer the active request with an error of drainproxy's own (no response began)."""
        exchange = self.active
        assert exchange is not None
        ctx = self.ctx
        if status >= 500:
            ctx.stats.count(ctx.stats.upstream_errors, kind)
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        log.log(log_level, "%d for %s from %s: %s", status, exchange.describe(), self.peer, message)
        close = exchange.close_after = (
            not exchange.complete
            or not exchange.keep_alive
            or exchange.upgrade
            or self._last_exchange()
            or ctx.lifecycle.should_close_connection()
        )
        ctx.stats.count(ctx.stats.responses_by_class, _STATUS_CLASSES[status // 100])
        if exchange.access is not None:
            exchange.access.response_head(status, ctx.loop.time())
            exchange.access.body_bytes = len(message.encode()) + 1
        self._write(plain_response(status, message, close=close))
        self._finish_exchange(exchange)

    def _cut(self, kind: str, message: str) -> None:
        """A response already begun cannot be answered with an error: end the connection so the
        client sees a truncated message, never a complete-looking one. A body the client can
        only delimit by the close (HTTP/1.0, no length) is cut with a reset."""
        exchange = self.active
        assert exchange is not None
        ctx = self.ctx
        if kind != "client":
            ctx.stats.count(ctx.stats.upstream_errors, kind)
        log.warning("response to %s from %s cut: %s", exchange.describe(), self.peer, message)
        if exchange.access is not None:
            exchange.access.emit(exchange.method, exchange.target, ctx.loop.time(), "cut")
        self.active = None
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        if self.close_delimited_to_client:
            self._reset()
        else:
            self.close("cut")

    def _reject(self, status: int, reason: str) -> None:
        """Refuse the request being parsed: nothing from it or after it reaches the app. Requests
        parsed before it are still answered, in order, then the error, then the close."""
        ctx = self.ctx
        stats = ctx.stats
        if status == 400:
            stats.bad_requests += 1
        stats.count(stats.requests_rejected, str(status))
        if self.state is _OPEN:
            self._enter(_MUST_CLOSE)
        current, active = self.current, self.active
        self.current = None
        if active is not None and current is active:
            # The active request itself broke mid-body.
            if active.response_started:
                self._cut("client", f"{status} {reason}")
            else:
                self._fail(status, "client", reason, logging.INFO)
            return
        if current is not None and self.queue is not None and current in self.queue:
            self.queue.remove(current)
        desc = current.describe() if current is not None else "a request"
        log.info("%d for %s from %s: %s", status, desc, self.peer, reason)
        if active is None:
            stats.count(stats.responses_by_class, _STATUS_CLASSES[status // 100])
            self._write(plain_response(status, reason, close=True))
            self.close("after_response")
        else:
            self.pending_reject = (status, reason)

    def _refuse(self) -> None:
        """Over ``limits.max_connections``: a 503 and a staged close (short: it holds a file),
        before reading anything."""
        self.ctx.note_refused()
        self._write(plain_response(503, "too many connections", close=True))
        self._staged_close(_REFUSED, _REFUSAL_LINGER_SECONDS)

    def _last_exchange(self) -> bool:
        """No more requests will be read, and none is waiting: the answer ends the connection."""
        state = self.state
        return (
            (state is _MUST_CLOSE or state is _INPUT_ENDED)
            and not self.queue
            and self.pending_reject is None
        )

    def _write_pieces(self, pieces: list[bytes]) -> None:
        """Write a head built as pieces: into the batch as they are, else joined."""
        if self.state.closing:
            return
        if self.batch is not None:
            self.batch += pieces
        else:
            assert self.transport is not None
            self.transport.write(b"".join(pieces))

    def _write(self, data: bytes) -> None:
        if self.state.closing:
            return
        if self.batch is not None:
            self.batch.append(data)
        else:
            assert self.transport is not None
            self.transport.write(data)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.state.closing:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.state.closing:
            self.transport.resume_reading()
            active = self.active
            if active is not None and not active.complete:
                self.mark = self.ctx.loop.time()  # a body stall counts only while reading
