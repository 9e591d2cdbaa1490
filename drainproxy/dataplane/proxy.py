"""The client side of the data path: one asyncio Protocol per client connection, an llhttp request
parser, and the relay of each exchange to an upstream connection.

Per connection, one exchange is active at a time; pipelined requests queue behind it with reading
paused, so responses go out in order. Bodies stream both ways; a full write buffer on one side
pauses reading on the other (back-pressure), so memory does not grow with the body.

Timeouts cost a request no timer: each connection keeps the time of its last progress (``mark``)
and one periodic sweep per process compares it with the limit of the state the connection is in.

Connection code never looks at drain phases: it asks ``lifecycle.should_close_connection()``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import socket
import ssl
import struct
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from drainproxy.config.schema import Config, LimitsConfig
from drainproxy.core.lifecycle import DrainLifecycle, Phase
from drainproxy.core.probers import ArrivalPace
from drainproxy.core.stats import Stats
from drainproxy.dataplane.access import AccessRecord
from drainproxy.dataplane.http1 import (
    BODYLESS_STATUSES,
    CHUNK_OVERHEAD_ALLOWANCE,
    CRLF,
    FORWARDED_FOR,
    FORWARDED_HOST,
    FORWARDED_PROTO,
    FRAME_CHUNKED,
    FRAME_NONE,
    FRAME_RAW,
    GATHER_BYTES,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    FramingError,
    Headers,
    HeadInfo,
    check_interim_head,
    check_request_body,
    chunk_size_line,
    drop_fields,
    forward_head,
    gather_more,
    gather_start,
    plain_response,
    reason_phrase,
    response_framing,
    status_line,
    target_authority,
)
from drainproxy.dataplane.upstream import UpstreamConnection, UpstreamPool
from drainproxy.system.tls import ListenerTLS

if TYPE_CHECKING:
    from drainproxy.dataplane.h2_client import Backend, H2Stream

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

_BODY_NONE, _BODY_LENGTH, _BODY_CHUNKED = 0, 1, 2
_FRAMING_TOO_LARGE = "chunk extensions or trailer fields larger than limits.max_header_bytes"
#: Up to this many response bytes from one read of the app are joined into one ``write``;
#: larger bodies go by ``writelines`` (writev) rather than be copied.
_JOIN_LIMIT = 16 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)
_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")

_TRANSFER_ENCODING_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CONTENT_LENGTH_NAME = frozenset({b"content-length"})
_CONNECTION_CLOSE = b"Connection: close\r\n"
_CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CONNECTION_UPGRADE = b"Connection: upgrade\r\n"


class ClientSide(Protocol):
    """What the driver and the sweep ask of a client connection, HTTP/1.1 or HTTP/2."""

    closing: bool

    def is_idle(self) -> bool: ...

    def in_flight(self) -> int: ...

    def check_timeouts(self, now: float) -> None: ...

    def close_when_idle(self, grace: float) -> None: ...

    def force_close(self) -> None: ...

    def announce_drain(self) -> None: ...


class Rejection(Exception):
    """A request drainproxy refuses itself (raised inside parser callbacks)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class ProxyContext:
    """What every client connection shares."""

    config: Config
    pool: UpstreamPool
    lifecycle: DrainLifecycle
    stats: Stats
    loop: asyncio.AbstractEventLoop
    #: Called whenever a client connection closes, so the driver can notice quiescence.
    on_connection_closed: Callable[[], None]
    scheme: bytes = b"http"
    connections: set[ClientSide] = field(default_factory=set)
    #: Requests timed per client, in evidence mode (``probers.ArrivalPace``); else None.
    arrivals: ArrivalPace | None = None
    #: ``log.access_log``, read once: when off, an exchange pays one test of this flag.
    access_log: bool = field(init=False, default=False)
    #: TLS on the listener (``tls:``): its reloading context, and what the listener is given.
    tls: ListenerTLS | None = field(init=False, default=None)
    listener_ssl: ssl.SSLContext | None = field(init=False, default=None)
    #: TLS connections accepted whose handshake is not done: not yet in ``connections``, but the
    #: drain must not end under them. Weak: a failed handshake just drops its protocol.
    handshaking: weakref.WeakSet[ClientConnection] = field(
        init=False, default_factory=weakref.WeakSet
    )
    max_connections: int = field(init=False, default=0)
    limits: LimitsConfig = field(init=False, default_factory=LimitsConfig)
    #: Seconds between sweeps for timeouts, idle app connections and certificate files.
    tick: float = field(init=False, default=1.0)
    # Forwarded headers, decided once from ``forwarded:``: the kinds of X-Forwarded fields
    # (http1.FORWARDED_*) replaced rather than passed on, and the constant lines.
    request_drop: frozenset[int] = field(init=False, default=frozenset())
    #: ``limits.get_head_body`` is ``forward``.
    get_head_body: bool = field(init=False, default=False)
    default_host_line: bytes = field(init=False, default=b"")
    forwarded_proto_line: bytes = field(init=False, default=b"")
    xff_append: bool = field(init=False, default=True)
    set_xfp: bool = field(init=False, default=True)
    overwrite_xfp: bool = field(init=False, default=False)
    set_xfh: bool = field(init=False, default=True)
    overwrite_xfh: bool = field(init=False, default=False)
    _refused_unlogged: int = field(init=False, default=0)
    _refusals_logged_at: float = field(init=False, default=float("-inf"))
    _next_tls_check: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        config = self.config
        self.access_log = config.log.access_log
        if config.tls is not None:
            self.tls = ListenerTLS(config.tls)
            self.listener_ssl = self.tls.context
            self.scheme = b"https"
        self.limits = config.limits
        self.get_head_body = config.limits.get_head_body == "forward"
        self.max_connections = config.limits.max_connections or _auto_connection_limit()
        forwarded = config.forwarded
        self.xff_append = forwarded.x_forwarded_for == "append"
        self.set_xfp = forwarded.x_forwarded_proto != "off"
        self.overwrite_xfp = forwarded.x_forwarded_proto == "overwrite"
        self.set_xfh = forwarded.x_forwarded_host != "off"
        self.overwrite_xfh = forwarded.x_forwarded_host == "overwrite"
        drop = {FORWARDED_FOR} if self.xff_append else set()
        if self.overwrite_xfp:
            drop.add(FORWARDED_PROTO)
        if self.overwrite_xfh:
            drop.add(FORWARDED_HOST)
        self.request_drop = frozenset(drop)
        upstream = config.upstream
        self.default_host_line = f"Host: {upstream.host}:{upstream.port}\r\n".encode()
        self.forwarded_proto_line = b"X-Forwarded-Proto: " + self.scheme + CRLF
        timeouts = config.timeouts
        limits = [
            timeouts.request_head,
            timeouts.client_idle,
            timeouts.client_body,
            config.upstream.response_timeout,
        ]
        shortest = min((seconds for seconds in limits if seconds > 0), default=1.0)
        self.tick = min(1.0, max(0.02, shortest / 10))
        _keep_freed_memory_for_reuse()
        self.loop.call_soon(self._sweep)

    def _sweep(self) -> None:
        """Expire what has waited too long; runs every ``tick`` for the life of the process."""
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        if self.listener_ssl is not None and not self.connections:
            # A failed TLS handshake ends without a callback: let the driver look again.
            self.on_connection_closed()
        expired = self.pool.expire_idle(now)
        if expired:
            log.debug("closed %d app connection(s) at the end of their reuse window", expired)
            self.stats.timeouts["upstream_idle"] = (
                self.stats.timeouts.get("upstream_idle", 0) + expired
            )
        if self._refused_unlogged and now - self._refusals_logged_at >= 10.0:
            log.warning(
                "refused %d connection(s) over limits.max_connections (%d) with 503",
                self._refused_unlogged,
                self.max_connections,
                extra={"event": "connections_refused"},
            )
            self._refused_unlogged = 0
            self._refusals_logged_at = now
        if self.tls is not None and now >= self._next_tls_check:
            self._next_tls_check = now + self.tls.config.reload_interval
            self.tls.check_files()
        self.loop.call_later(self.tick, self._sweep)

    def announce_drain(self) -> None:
        """Responses now close their connections: HTTP/2 connections are told at once."""
        for conn in list(self.connections):
            conn.announce_drain()

    def open_backend(self, stream: H2Stream) -> Backend:
        """Where an HTTP/2 client stream goes: the app over HTTP/2, or over the HTTP/1.1 pool."""
        if self.config.upstream.protocol != "http1":
            from drainproxy.dataplane.h2_upstream import open_h2_backend

            return open_h2_backend(self, stream)
        from drainproxy.dataplane.h2_client import open_http1_backend

        return open_http1_backend(stream)

    def add_forwarding_fields(
        self, head: list[bytes], info: HeadInfo, peer_line: bytes, peer: str
    ) -> None:
        """Append the X-Forwarded-* fields this hop adds, as ``forwarded:`` configures them, to
        a request head for the app (HTTP/1.1 and HTTP/2 clients alike)."""
        if self.xff_append:
            prior = info.forwarded_for
            if prior is None:
                head.append(peer_line)
            else:
                head += (b"X-Forwarded-For: ", b", ".join([*prior, peer.encode()]), CRLF)
        if self.set_xfp and (self.overwrite_xfp or not info.has_forwarded_proto):
            head.append(self.forwarded_proto_line)
        if (
            self.set_xfh
            and info.host is not None
            and (self.overwrite_xfh or not info.has_forwarded_host)
        ):
            head += (b"X-Forwarded-Host: ", info.host, CRLF)

    def note_refused(self) -> None:
        self.stats.connections_refused += 1
        self._refused_unlogged += 1


# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _keep_freed_memory_for_reuse() -> None:
    """Streaming allocates a new ``bytes`` of up to 256 KiB per read (uvloop's read size). With
    glibc's defaults each one is mmapped, or the heap top is trimmed and regrown, so every read
    is copied into fresh pages that fault in: 1 MiB responses ran at half speed or less,
    depending on the process's history. Keep such blocks on the heap and the heap untrimmed
    below 64 MiB (RSS idle is unchanged; after heavy streaming freed pages stay resident)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    mallopt(_M_TOP_PAD, 1 << 20)


def _auto_connection_limit() -> int:
    """Half the open-file limit: each client connection may hold one to the app as well."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - 32) // 2)


class Request:
    __slots__ = (
        "access",
        "body_mode",
        "body_size",
        "complete",
        "head",
        "head_done",
        "head_sent",
        "headers",
        "keep_alive",
        "method",
        "pending",
        "pending_size",
        "retried",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: Headers = []
        #: The head as forwarded to the app, built once the head is parsed.
        self.head = b""
        self.keep_alive = True
        self.upgrade = False
        self.body_mode = _BODY_NONE
        self.body_size = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.head_done = False
        self.complete = False
        self.head_sent = False
        self.retried = False
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
        "close_after",
        "close_delimited_to_client",
        "close_reason",
        "closing",
        "connect_task",
        "ctx",
        "current",
        "feeding",
        "first_read",
        "framing_credit",
        "gathered",
        "head_bytes",
        "header_bytes",
        "idle_since",
        "idle_timer",
        "input_ended",
        "linger_timer",
        "lingering",
        "mark",
        "must_close",
        "parser",
        "paused",
        "peer",
        "peer_line",
        "pending_reject",
        "queue",
        "refused",
        "response_close_delimited",
        "response_frame",
        "response_started",
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
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        #: ``X-Forwarded-For: <peer>`` and its CRLF, for requests that carry no prior value.
        self.peer_line = b""
        self.parser = httptools.HttpRequestParser(self)
        self.current: Request | None = None  # being parsed
        self.active: Request | None = None  # being exchanged with the app
        self.queue: deque[Request] | None = None  # parsed, waiting for the active one
        self.upstream: UpstreamConnection | None = None
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_buffer: list[bytes] | None = None
        #: Writes held while one read from the app is parsed (see ``start_batch``).
        self.batch: list[bytes] | None = None
        self.batch_body_bytes = 0
        #: A read from the client is being parsed: the request head for the app waits for the
        #: end of it, so the head and the body bytes of the same read leave in one write.
        self.feeding = False
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.refused = False
        #: A staged close is under way (see ``_staged_close``).
        self.lingering = False
        #: The client half-closed while its answer was on the way: no input can follow.
        self.input_ended = False
        self.linger_timer: asyncio.TimerHandle | None = None
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
        #: Nothing read yet: the first bytes may be the HTTP/2 preface.
        self.first_read = True
        self.idle_since: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.response_started = False
        self.response_frame = FRAME_NONE
        self.response_close_delimited = False
        self.close_delimited_to_client = False
        self.close_after = False
        #: Read no further requests: answer those already parsed, then close.
        self.must_close = False
        #: An error to answer, in order, once the requests parsed before it are answered.
        self.pending_reject: tuple[int, str] | None = None

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
        self.peer_line = b"X-Forwarded-For: " + self.peer.encode() + CRLF
        self.idle_since = self.mark = ctx.loop.time()
        ctx.connections.add(self)
        if ctx.listener_ssl is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._become_http2(b"")
                return
        lifecycle = ctx.lifecycle
        if lifecycle.phase is not Phase.SERVING and not lifecycle.accepts_connections():
            # Accepted from the queue of a listener being closed: silent, it is idle.
            self.close_when_idle(ctx.config.drain.idle_grace)

    def _become_http2(self, data: bytes) -> None:
        from drainproxy.dataplane.h2_client import take_over

        take_over(self, data)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.closing:
            return  # a staged close discards input
        if self.upgrade_buffer is not None:
            self.upgrade_buffer.append(data)
            self._pause(_PAUSE_BUFFER)
            return
        if self.must_close:
            return  # nothing more is parsed
        if self.first_read:
            self.first_read = False
            if data[:3] == _H2_PREFACE_START:
                self._become_http2(data)
                return
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
            self.upgrade_buffer = [data[upgrade.args[0] :]]
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
        if not in_head and current is after and after.body_mode == _BODY_CHUNKED:
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
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.close_tunnel()
            return False
        transport = self.transport
        if (
            self.lingering
            or self.active is None
            or not self.response_started
            or transport is None
            or not transport.can_write_eof()
        ):
            return False
        self.must_close = self.input_ended = True
        self.current = self.queue = None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        ctx = self.ctx
        ctx.stats.count(ctx.stats.connections_closed, self.close_reason)
        if self.refused:
            return
        ctx.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.upstream is not None:
            self.upstream.abort()
        if self.tunnel is not None:
            self.tunnel.close_tunnel()
        self.upstream = self.tunnel = None
        req = self.active
        if req is not None:
            if req.access is not None:
                req.access.emit(req.method, req.target, ctx.loop.time(), self.close_reason)
            if self.close_reason == "client":
                log.info(
                    "client %s closed the connection during %s; upstream request aborted",
                    self.peer,
                    req.describe(),
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
        self.current = Request()
        self.idle_since = None
        self.head_bytes = self.header_bytes = 0
        if self.active is None:
            ctx = self.ctx
            self.mark = now = ctx.loop.time()
            if ctx.arrivals is not None:
                ctx.arrivals.note(self.peer, now)

    def on_url(self, url: bytes) -> None:
        req = self.current
        assert req is not None
        req.target += url
        self.header_bytes += len(url)
        if len(req.target) > self.ctx.limits.max_request_line:
            raise Rejection(414, "request target longer than limits.max_request_line")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        limits = self.ctx.limits
        if req.head_done:
            # A trailer field: dropped, but counted with the head's (name, ": ", value, CRLF).
            self.header_bytes += len(name) + len(value) + 4
            if self.header_bytes > limits.max_header_bytes:
                raise Rejection(400, _FRAMING_TOO_LARGE)
            return
        req.headers.append((name, value))
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > limits.max_header_bytes:
            raise Rejection(431, "request head larger than limits.max_header_bytes")
        if len(req.headers) > limits.max_headers:
            raise Rejection(431, "more header fields than limits.max_headers")

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        parser = self.parser
        req.head_done = True
        req.method = parser.get_method()
        req.version = version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Rejection(505, f"HTTP/{version} is not supported")
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        ctx = self.ctx
        target = req.target
        head = [req.method, b" ", target, b" HTTP/1.1\r\n"]
        try:
            # Not origin-form (``/...``): absolute-form, or CONNECT's authority-form (answered
            # 405 in ``_start``), or asterisk-form.
            authority = None
            if target[0] != 0x2F and req.method != b"CONNECT":
                authority = target_authority(target)
            info = forward_head(
                head, req.headers, request=True, drop=ctx.request_drop, authority=authority
            )
            if info.content_length is not None or info.chunked:
                check_request_body(
                    req.method, info, upgrade=req.upgrade, get_head_body=ctx.get_head_body
                )
        except FramingError as exc:
            raise Rejection(exc.status, f"malformed request: {exc}") from None
        if version == "1.1" and (info.host is None or info.host_from_target):
            # RFC 9112 §3.2: 400 for any HTTP/1.1 request without Host, absolute-form included.
            raise Rejection(400, "malformed request: HTTP/1.1 without Host")
        if target == b"*" and req.method != b"OPTIONS":
            # RFC 9112 §3.2.4: the asterisk-form is only for a server-wide OPTIONS.
            raise Rejection(400, "malformed request: asterisk-form target without OPTIONS")
        if req.upgrade and info.upgrade is not None and info.upgrade.lower() == b"h2c":
            # RFC 9113 §3.1 deprecates the h2c Upgrade: served as HTTP/1.1, then the connection
            # closes (llhttp stops at an upgrade request); see docs/http2.md.
            info.upgrade = None
        max_body = ctx.limits.max_body_bytes
        if info.chunked:
            if version == "1.0":
                raise Rejection(400, "malformed request: Transfer-Encoding in HTTP/1.0")
            req.body_mode = _BODY_CHUNKED
        elif info.content_length is not None:
            length = int(info.content_length)
            if max_body is not None and length > max_body:
                raise Rejection(413, "request body larger than limits.max_body_bytes")
            if length:
                req.body_mode = _BODY_LENGTH
        req.head = self._upstream_head(req, head, info)
        if self.active is None:
            self._start(req)
            return
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        elif len(queue) >= _MAX_PIPELINED:
            raise Rejection(503, "too many pipelined requests; send the rest on a new connection")
        queue.append(req)
        self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self.current
        assert req is not None
        if req.body_mode == _BODY_CHUNKED:
            # The data's own bytes are in the read too: three times, to pay twice as much.
            self.framing_credit += 3 * len(body) + CHUNK_OVERHEAD_ALLOWANCE
        max_body = self.ctx.limits.max_body_bytes
        if max_body is not None:
            req.body_size += len(body)
            if req.body_size > max_body:
                raise Rejection(413, "request body larger than limits.max_body_bytes")
        if req is self.active:
            self.mark = self.ctx.loop.time()
            conn = self.upstream
            if req.head_sent and conn is not None:
                if req.body_mode == _BODY_CHUNKED:
                    conn.writelines((chunk_size_line(len(body)), body, CRLF))
                else:
                    conn.write(body)
                return
        req.pending.append(body)
        req.pending_size += len(body)
        if req.pending_size > _BUFFER_LIMIT:
            self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        req.complete = True
        self.current = None
        conn = self.upstream
        if req is self.active and req.head_sent and conn is not None:
            if req.body_mode == _BODY_CHUNKED:
                conn.write(LAST_CHUNK)
            self._request_sent()

    # --- the exchange with the app -----------------------------------------------------------

    def _start(self, req: Request) -> None:
        ctx = self.ctx
        self.active = req
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
            req.access = AccessRecord(self.mark, phase)
        if req.method == b"CONNECT":
            self._fail(405, "method", "CONNECT is not supported by a reverse proxy", logging.INFO)
            return
        conn = ctx.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self.connect_task = ctx.loop.create_task(self._connect_and_attach(req))

    async def _connect_and_attach(self, req: Request) -> None:
        ctx = self.ctx
        upstream = ctx.config.upstream
        try:
            conn = await ctx.pool.connect()
        except TimeoutError:
            if self.active is req and not self.closing:
                ctx.stats.count(ctx.stats.timeouts, "connect")
                self._fail(
                    504, "timeout", f"no connection to the app within {upstream.connect_timeout:g}s"
                )
            return
        except OSError as exc:
            if self.active is req and not self.closing:
                self._fail(502, "refused", f"cannot connect to the app: {exc.strerror or exc}")
            return
        finally:
            self.connect_task = None
        if self.active is not req or self.closing:
            ctx.pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        req = self.active
        assert req is not None
        self.upstream = conn
        conn.bind(self)
        if self.write_paused:
            conn.pause_reading()
        if not self.feeding:
            self._send_head(req, conn)
        # else: ``data_received`` sends it once the read is parsed (``_send_deferred_head``).

    def _send_deferred_head(self) -> None:
        req = self.active
        conn = self.upstream
        if req is not None and conn is not None and not req.head_sent and not self.closing:
            self._send_head(req, conn)

    def _send_head(self, req: Request, conn: UpstreamConnection) -> None:
        """Send the request head with the body bytes buffered so far, in one write."""
        head = req.head
        if not req.pending and not (req.complete and req.body_mode == _BODY_CHUNKED):
            conn.write(head)
        else:
            parts = [head]
            if req.body_mode == _BODY_CHUNKED:
                for part in req.pending:
                    parts += (chunk_size_line(len(part)), part, CRLF)
                if req.complete:
                    parts.append(LAST_CHUNK)
            else:
                parts += req.pending
            if req.pending_size <= _JOIN_LIMIT:
                conn.write(b"".join(parts))
            else:
                conn.writelines(tuple(parts))
            req.pending = []
            req.pending_size = 0
        req.head_sent = True
        if req.access is not None:
            req.access.upstream_sent = self.ctx.loop.time()
        self._resume(_PAUSE_BUFFER)
        if req.complete:
            self._request_sent()

    def _upstream_head(self, req: Request, head: list[bytes], info: HeadInfo) -> bytes:
        """The request head for the app: ``head`` (request line and end-to-end fields) plus the
        fields this hop adds, joined once."""
        ctx = self.ctx
        if info.host is None:
            head.append(ctx.default_host_line)
        if req.body_mode == _BODY_CHUNKED:
            head.append(_TRANSFER_ENCODING_CHUNKED)
        if req.upgrade and info.upgrade is not None:
            head += (_CONNECTION_UPGRADE, b"Upgrade: ", info.upgrade, CRLF)
        ctx.add_forwarding_fields(head, info, self.peer_line, self.peer)
        head.append(CRLF)
        return b"".join(head)

    def _request_sent(self) -> None:
        if not self.response_started:
            self.mark = self.ctx.loop.time()  # the response head timeout runs from here

    # --- called by the UpstreamConnection -----------------------------------------------------

    def response_interim(self, status: int, reason: bytes, headers: Headers) -> bool:
        """Pass a 1xx on to an HTTP/1.1 client; False when it is invalid (the exchange failed)."""
        req = self.active
        if req is None:
            return False
        out: list[bytes] = []
        try:
            out.append(status_line(status, reason))
            check_interim_head(forward_head(out, headers, request=False))
        except FramingError as exc:
            self.upstream_failed("invalid", f"invalid response from the app: {exc}")
            return False
        if req.version == "1.1":
            out.append(CRLF)
            self._write_pieces(out)
        return True

    def response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: Headers
    ) -> None:
        req = self.active
        assert req is not None
        if req.access is not None:
            req.access.response_head(status, self.ctx.loop.time())
        try:
            out = [status_line(status, reason or reason_phrase(status))]
            info = forward_head(out, headers, request=False)
        except FramingError as exc:
            self.upstream_failed("invalid", f"invalid response from the app: {exc}")
            return
        if status == 204 and info.content_length is not None:
            # 204 has no content, so a Content-Length on it can only mislead (RFC 9110 §8.6).
            drop_fields(out, 1, _CONTENT_LENGTH_NAME)
        conn.keep_alive_field = info.keep_alive
        if status == 101:
            if req.upgrade and info.upgrade is not None:
                self._start_tunnel(conn, out, info.upgrade)
            else:
                self.upstream_failed("invalid", "101 response to a request that asked no upgrade")
            return
        bodyless = req.method == b"HEAD" or status in BODYLESS_STATUSES
        close = (
            not req.keep_alive
            or not req.complete
            or req.upgrade
            or self._last_exchange()
            or self._phase_closes_connections()
        )
        content_length = info.content_length
        if bodyless or content_length is not None:
            # ``response_framing``'s first two cases, without a call on the common path.
            frame = FRAME_NONE if bodyless else FRAME_RAW
            self.response_close_delimited = self.close_delimited_to_client = False
            if content_length is not None and not bodyless:
                conn.body_left = int(content_length)
        else:
            try:
                framing = response_framing(info, bodyless, req.version == "1.0")
            except FramingError as exc:
                self.upstream_failed("invalid", f"invalid response from the app: {exc}")
                return
            frame, transfer_encoding, self.response_close_delimited, to_close = framing
            self.close_delimited_to_client = to_close
            out.append(transfer_encoding)
            close = close or to_close
        if close:
            out.append(_CONNECTION_CLOSE)
        elif req.version == "1.0":
            out.append(_CONNECTION_KEEP_ALIVE)
        out.append(CRLF)
        self.response_frame = frame
        self.close_after = close
        self.response_started = True
        by_class = self.ctx.stats.responses_by_class
        status_class = _STATUS_CLASSES[status // 100]
        by_class[status_class] = by_class.get(status_class, 0) + 1
        self._write_pieces(out)
        if req.method == b"HEAD":
            # llhttp cannot know this response has no body; the exchange ends with its head.
            conn.response_done = True

    def response_body(self, body: bytes) -> None:
        req = self.active
        if req is not None and req.access is not None:
            req.access.body_bytes += len(body)
        if self.closing:
            return
        batch = self.batch
        assert batch is not None  # only called while the app's bytes are parsed
        self.batch_body_bytes += len(body)
        if self.response_frame == FRAME_CHUNKED:
            batch += (chunk_size_line(len(body)), body, CRLF)
        elif self.response_frame == FRAME_RAW:
            batch.append(body)

    def response_complete(self, conn: UpstreamConnection) -> None:
        req = self.active
        if req is None or conn is not self.upstream:
            return
        if self.response_frame == FRAME_CHUNKED:
            self._write(LAST_CHUNK)
        self.upstream = None
        # Reused only when both messages ended where both sides agree they did: not after an
        # Upgrade request (the app may have switched protocols, or stopped reading HTTP), a
        # request not sent whole, a close-delimited response or one with bytes after it.
        if (
            conn.keep_alive
            and req.complete
            and not req.upgrade
            and not conn.closed
            and not self.response_close_delimited
        ):
            self.ctx.pool.release(conn)
        else:
            conn.abort()
        self._finish_exchange()

    def upstream_lost(self, conn: UpstreamConnection, kind: str) -> None:
        """The app closed the connection before the response was complete."""
        req = self.active
        if req is None or conn is not self.upstream:
            return
        self.upstream = None
        if not self.response_started:
            if (
                conn.reused
                and not conn.read_size
                and not req.retried
                and req.method in IDEMPOTENT_METHODS
                and req.body_mode == _BODY_NONE
            ):
                # The keep-alive race: the app closed an idle pooled connection as we sent.
                req.retried = True
                self.ctx.stats.count(self.ctx.stats.upstream_errors, "retried")
                self.connect_task = self.ctx.loop.create_task(self._connect_and_attach(req))
                return
            self._fail(502, kind, f"the app {kind} the connection before responding")
            return
        self._cut(kind, f"the app {kind} the connection mid-response")

    def upstream_failed(self, kind: str, message: str) -> None:
        """The app's response broke the protocol."""
        if self.active is None:
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        if self.response_started:
            self._cut(kind, message)
        else:
            self._fail(502, kind, message)

    # --- tunnels (Upgrade) --------------------------------------------------------------------

    def _start_tunnel(self, conn: UpstreamConnection, out: list[bytes], upgrade: bytes) -> None:
        """``out``: the 101 status line and the response's end-to-end fields."""
        out += (_CONNECTION_UPGRADE, b"Upgrade: ", upgrade, CRLF, CRLF)
        self._write_pieces(out)
        self.upstream = None
        self.tunnel = conn
        conn.tunnel = True
        self.response_started = True
        self.ctx.stats.tunnels_opened += 1
        self.ctx.stats.count(self.ctx.stats.responses_by_class, "1xx")
        buffered, self.upgrade_buffer = self.upgrade_buffer or [], None
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
        if self.closing or self.tunnel is not None:
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
            and not self.response_started
            and elapsed >= response
        ):
            self._timed_out("response_head")
            self._fail(504, "timeout", f"no response head from the app within {response:g}s")

    def _timed_out(self, kind: str) -> None:
        stats = self.ctx.stats
        stats.count(stats.timeouts, kind)

    # --- drain --------------------------------------------------------------------------------

    def is_idle(self) -> bool:
        return self.active is None and self.current is None and self.tunnel is None

    def in_flight(self) -> int:
        return 0 if self.is_idle() else 1

    def announce_drain(self) -> None:
        """HTTP/1.1 learns of the drain from ``Connection: close`` on its next response."""

    def close_when_idle(self, grace: float) -> None:
        """Close now if idle past ``grace``; else check again when it would be. A busy connection
        closes after its response, which carries ``Connection: close``."""
        if self.closing or not self.is_idle() or self.idle_since is None:
            return
        idle_for = self.ctx.loop.time() - self.idle_since
        if idle_for >= grace:
            self.close("idle")
        elif self.idle_timer is None:
            self.idle_timer = self.ctx.loop.call_later(grace - idle_for, self._idle_check, grace)

    def _idle_check(self, grace: float) -> None:
        self.idle_timer = None
        self.close_when_idle(grace)

    def force_close(self) -> None:
        """End the connection now (``drain.timeout``, shutdown), a staged close included. Where
        the client can tell the end of a body only by the close, and that body has not all been
        handed to the kernel, the end is a reset: a cut must never look complete (issue 11)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.lingering:
            self.close_reason = "forced"
        self.closing = True
        if self.close_delimited_to_client and (
            self.active is not None or transport.get_write_buffer_size()
        ):
            self._reset(self.close_reason)
        else:
            transport.abort()

    def _reset(self, reason: str = "cut") -> None:
        """Close with a TCP reset (a plain close could look like the end of the body); what is
        still buffered for the client is dropped."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closing = True
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
        if self.closing or transport is None:
            return
        self.flush()
        self.closing = self.must_close = True
        self.close_reason = reason
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if not linger or self.input_ended or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
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
            transport.close()
        elif buffered < buffered_before:
            self.linger_timer = self.ctx.loop.call_later(
                linger, self._linger_expired, linger, buffered
            )
        else:
            self.force_close()

    def start_batch(self) -> None:
        """Collect what is written to the client while one read from the app is parsed, so a
        response head and its body leave in one system call."""
        self.batch = []
        self.batch_body_bytes = 0

    def flush(self) -> None:
        batch, self.batch = self.batch, None
        if batch and not self.closing:
            transport = self.transport
            assert transport is not None
            if len(batch) == 1:
                transport.write(batch[0])
            elif self.batch_body_bytes <= _JOIN_LIMIT:
                transport.write(b"".join(batch))  # one small copy beats writev's iovec walk
            else:
                transport.writelines(batch)

    # --- internals ----------------------------------------------------------------------------

    def _finish_exchange(self) -> None:
        req = self.active
        ctx = self.ctx
        if req is not None and req.access is not None:
            req.access.emit(req.method, req.target, ctx.loop.time())
        self.active = None
        self.response_started = False
        self.response_frame = FRAME_NONE
        if self.paused:
            self._resume(_PAUSE_UPSTREAM)
        if self.close_after:
            # A client that asked to close after a request it sent whole sends nothing more
            # (RFC 9112 §9.6); any other may: a pipelined request, the rest of a body.
            client_done = (
                req is not None
                and req.complete
                and not req.keep_alive
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
        if self.must_close:
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
        if lifecycle.phase is not Phase.SERVING and not lifecycle.accepts_connections():
            self.close_when_idle(ctx.config.drain.idle_grace)

    def _fail(self, status: int, kind: str, message: str, log_level: int = logging.WARNING) -> None:
        """Answer the active request with an error of drainproxy's own (no response began)."""
        req = self.active
        assert req is not None
        ctx = self.ctx
        if status >= 500:
            ctx.stats.count(ctx.stats.upstream_errors, kind)
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        log.log(log_level, "%d for %s from %s: %s", status, req.describe(), self.peer, message)
        self.close_after = (
            not req.complete
            or not req.keep_alive
            or req.upgrade
            or self._last_exchange()
            or ctx.lifecycle.should_close_connection()
        )
        ctx.stats.count(ctx.stats.responses_by_class, _STATUS_CLASSES[status // 100])
        if req.access is not None:
            req.access.response_head(status, ctx.loop.time())
            req.access.body_bytes = len(message.encode()) + 1
        self._write(plain_response(status, message, close=self.close_after))
        self._finish_exchange()

    def _cut(self, kind: str, message: str) -> None:
        """A response already begun cannot be answered with an error: end the connection so the
        client sees a truncated message, never a complete-looking one. A body the client can
        only delimit by the close (HTTP/1.0, no length) is cut with a reset."""
        req = self.active
        assert req is not None
        ctx = self.ctx
        if kind != "client":
            ctx.stats.count(ctx.stats.upstream_errors, kind)
        log.warning("response to %s from %s cut: %s", req.describe(), self.peer, message)
        if req.access is not None:
            req.access.emit(req.method, req.target, ctx.loop.time(), "cut")
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
        self.must_close = True
        current, active = self.current, self.active
        self.current = None
        if active is not None and current is active:
            # The active request itself broke mid-body.
            if self.response_started:
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
        self.refused = True
        self.ctx.note_refused()
        self._write(plain_response(503, "too many connections", close=True))
        self._staged_close("refused", _REFUSAL_LINGER_SECONDS)

    def _last_exchange(self) -> bool:
        """No more requests will be read, and none is waiting: the answer ends the connection."""
        return self.must_close and not self.queue and self.pending_reject is None

    def _write_pieces(self, pieces: list[bytes]) -> None:
        """Write a head built as pieces: into the batch as they are, else joined."""
        if self.closing:
            return
        if self.batch is not None:
            self.batch += pieces
        else:
            assert self.transport is not None
            self.transport.write(b"".join(pieces))

    def _phase_closes_connections(self) -> bool:
        """``lifecycle.should_close_connection()``, without hashing an Enum member (a Python
        call) on the common path: while SERVING, no response closes its connection."""
        lifecycle = self.ctx.lifecycle
        return lifecycle.phase is not Phase.SERVING and lifecycle.should_close_connection()

    def _write(self, data: bytes) -> None:
        if self.closing:
            return
        if self.batch is not None:
            self.batch.append(data)
        else:
            assert self.transport is not None
            self.transport.write(data)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()
            active = self.active
            if active is not None and not active.complete:
                self.mark = self.ctx.loop.time()  # a body stall counts only while reading

    def pause_reading_for_upstream(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_reading_for_upstream(self) -> None:
        self._resume(_PAUSE_UPSTREAM)
