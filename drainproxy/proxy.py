"""The client side of the data path: one asyncio Protocol per client connection, an llhttp request
parser, and the relay of each exchange to an upstream connection.

Per connection, one exchange is active at a time; pipelined requests queue behind it with reading
paused, so responses go out in order. Bodies stream both ways; a full write buffer on one side
pauses reading on the other (back-pressure), so memory does not grow with the body.

Connection code never looks at drain phases: it asks ``lifecycle.should_close_connection()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from drainproxy.config import Config
from drainproxy.http1 import (
    BODYLESS_STATUSES,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    HeadInfo,
    Headers,
    chunk,
    end_to_end,
    inspect_head,
    plain_response,
    reason_phrase,
    serialize_head,
    status_line,
)
from drainproxy.lifecycle import DrainLifecycle
from drainproxy.logs import AccessRecord
from drainproxy.stats import Stats
from drainproxy.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger("drainproxy.proxy")

# Why reading from the client is paused; reading resumes when no reason is left.
_PAUSE_PIPELINE = 1  # a request is queued behind the active one
_PAUSE_UPSTREAM = 2  # the app's socket buffer is full
_PAUSE_BUFFER = 4  # body bytes are buffered while no upstream connection is attached

#: Request body bytes held while connecting to the app, before reading pauses.
_BUFFER_LIMIT = 64 * 1024

_BODY_NONE, _BODY_LENGTH, _BODY_CHUNKED = 0, 1, 2
_FRAME_NONE, _FRAME_RAW, _FRAME_CHUNKED = 0, 1, 2

_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"


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
    connections: set[ClientConnection] = field(default_factory=set)
    #: ``log.access_log``, read once: when off, an exchange pays one test of this flag.
    access_log: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.access_log = self.config.log.access_log


class Request:
    __slots__ = (
        "access",
        "body_mode",
        "complete",
        "head_sent",
        "headers",
        "info",
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
        self.info = HeadInfo()
        self.keep_alive = True
        self.upgrade = False
        self.body_mode = _BODY_NONE
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.complete = False
        self.head_sent = False
        self.retried = False
        self.access: AccessRecord | None = None

    def describe(self) -> str:
        return f"{self.method.decode('latin-1')} {self.target.decode('latin-1')}"


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.parser = httptools.HttpRequestParser(self)
        self.current: Request | None = None  # being parsed
        self.active: Request | None = None  # being exchanged with the app
        self.queue: deque[Request] = deque()
        self.upstream: UpstreamConnection | None = None
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_buffer: list[bytes] | None = None
        self.paused = 0
        self.closing = False
        self.close_reason = "client"
        self.idle_since: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.response_timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.response_started = False
        self.response_frame = _FRAME_NONE
        self.response_close_delimited = False
        self.close_after = False
        self.must_close = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "-"
        self.idle_since = self.ctx.loop.time()
        self.ctx.connections.add(self)
        self.ctx.stats.connections_accepted += 1

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.upgrade_buffer is not None:
            self.upgrade_buffer.append(data)
            self._pause(_PAUSE_BUFFER)
            return
        if self.closing or self.must_close:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade_buffer = [data[upgrade.args[0] :]]
        except httptools.HttpParserError as exc:
            self._bad_request(str(exc))

    def eof_received(self) -> bool | None:
        # A half-close from the client: let the active exchange finish, then close.
        if self.active is None and self.tunnel is None:
            return False
        self.must_close = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.connections.discard(self)
        self.ctx.stats.count(self.ctx.stats.connections_closed, self.close_reason)
        self._cancel_timers()
        if self.connect_task is not None:
            self.connect_task.cancel()
        for conn in (self.upstream, self.tunnel):
            if conn is not None:
                conn.abort()
        req = self.active
        if req is not None and req.access is not None:
            req.access.emit(req.method, req.target, self.ctx.loop.time(), self.close_reason)
        if self.active is not None and self.close_reason == "client":
            log.info(
                "client %s closed the connection during %s; upstream request aborted",
                self.peer,
                self.active.describe(),
            )
        self.upstream = self.tunnel = None
        self.ctx.on_connection_closed()

    def pause_writing(self) -> None:
        conn = self.upstream or self.tunnel
        if conn is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        conn = self.upstream or self.tunnel
        if conn is not None:
            conn.resume_reading()

    # --- llhttp request callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request()
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        if not req.head_sent and req.method == b"":  # later calls are trailer fields: dropped
            req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        req.info = info = inspect_head(req.headers)
        if info.chunked:
            req.body_mode = _BODY_CHUNKED
        elif info.content_length not in (None, b"0"):
            req.body_mode = _BODY_LENGTH
        if self.active is None:
            self._start(req)
        else:
            self.queue.append(req)
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self.current
        assert req is not None
        if req is self.active and req.head_sent and self.upstream is not None:
            self.upstream.write(chunk(body) if req.body_mode == _BODY_CHUNKED else body)
        else:
            req.pending.append(body)
            req.pending_size += len(body)
            if req.pending_size > _BUFFER_LIMIT:
                self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        req.complete = True
        self.current = None
        if req is self.active and req.head_sent and self.upstream is not None:
            if req.body_mode == _BODY_CHUNKED:
                self.upstream.write(LAST_CHUNK)
            self._request_sent()

    # --- the exchange with the app -----------------------------------------------------------

    def _start(self, req: Request) -> None:
        self.active = req
        self.idle_since = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        stats = self.ctx.stats
        stats.requests_total += 1
        stats.count(stats.requests_by_phase, self.ctx.lifecycle.phase.value)
        if self.ctx.access_log:
            req.access = AccessRecord(self.ctx.loop.time(), self.ctx.lifecycle.phase.value)
        if req.method == b"CONNECT":
            self._fail(405, "method", "CONNECT is not supported by a reverse proxy", log_level=logging.INFO)
            return
        conn = self.ctx.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self.connect_task = self.ctx.loop.create_task(self._connect_and_attach(req))

    async def _connect_and_attach(self, req: Request) -> None:
        upstream = self.ctx.config.upstream
        try:
            conn = await self.ctx.pool.connect()
        except TimeoutError:
            self._fail(504, "timeout", f"no connection to the app within {upstream.connect_timeout:g}s")
            return
        except OSError as exc:
            self._fail(502, "refused", f"cannot connect to the app: {exc.strerror or exc}")
            return
        finally:
            self.connect_task = None
        if self.active is not req or self.closing:
            self.ctx.pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        req = self.active
        assert req is not None
        self.upstream = conn
        conn.bind(self)
        body = req.pending
        req.pending = []
        req.pending_size = 0
        if req.body_mode == _BODY_CHUNKED:
            body = [chunk(part) for part in body]
            if req.complete:
                body.append(LAST_CHUNK)
        conn.write(b"".join([self._upstream_head(req), *body]))
        req.head_sent = True
        if req.access is not None:
            req.access.upstream_sent = self.ctx.loop.time()
        self._resume(_PAUSE_BUFFER)
        if req.complete:
            self._request_sent()

    def _upstream_head(self, req: Request) -> bytes:
        forwarded = self.ctx.config.forwarded
        info = req.info
        drop: set[bytes] = set()
        headers: Headers
        if forwarded.x_forwarded_for == "append":
            drop.add(_XFF)
        if forwarded.x_forwarded_proto == "overwrite":
            drop.add(_XFP)
        if forwarded.x_forwarded_host == "overwrite":
            drop.add(_XFH)
        headers = end_to_end(req.headers, info, frozenset(drop))
        if info.host is None:
            upstream = self.ctx.config.upstream
            headers.append((b"Host", f"{upstream.host}:{upstream.port}".encode()))
        if req.body_mode == _BODY_CHUNKED:
            headers.append((b"Transfer-Encoding", b"chunked"))
        if req.upgrade and info.upgrade is not None:
            headers.append((b"Connection", b"upgrade"))
            headers.append((b"Upgrade", info.upgrade))
        if forwarded.x_forwarded_for == "append":
            previous = [value for name, value in req.headers if name.lower() == _XFF]
            headers.append((b"X-Forwarded-For", b", ".join([*previous, self.peer.encode()])))
        present = {name.lower() for name, _ in headers}
        if forwarded.x_forwarded_proto != "off" and _XFP not in present:
            headers.append((b"X-Forwarded-Proto", self.ctx.scheme))
        if forwarded.x_forwarded_host != "off" and _XFH not in present and info.host:
            headers.append((b"X-Forwarded-Host", info.host))
        return serialize_head(req.method + b" " + req.target + b" HTTP/1.1", headers)

    def _request_sent(self) -> None:
        if self.response_started:
            return
        timeout = self.ctx.config.upstream.response_timeout
        if timeout > 0:
            self.response_timer = self.ctx.loop.call_later(timeout, self._response_timed_out)

    def _response_timed_out(self) -> None:
        self.response_timer = None
        timeout = self.ctx.config.upstream.response_timeout
        self._fail(504, "timeout", f"no response head from the app within {timeout:g}s")

    # --- called by the UpstreamConnection -----------------------------------------------------

    def response_interim(self, status: int, reason: bytes, headers: Headers) -> None:
        req = self.active
        if req is not None and req.version == "1.1":
            info = inspect_head(headers)
            self._write(serialize_head(status_line(status, reason), end_to_end(headers, info)))

    def response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: Headers, version: str
    ) -> None:
        req = self.active
        assert req is not None
        if self.response_timer is not None:
            self.response_timer.cancel()
            self.response_timer = None
        if req.access is not None:
            req.access.response_head(status, self.ctx.loop.time())
        info = inspect_head(headers)
        if status == 101:
            if req.upgrade and info.upgrade is not None:
                self._start_tunnel(conn, reason, headers, info)
            else:
                self.upstream_failed("invalid", "101 response to a request that asked no upgrade")
            return
        out = end_to_end(headers, info)
        bodyless = req.method == b"HEAD" or status in BODYLESS_STATUSES
        close = (
            not req.keep_alive
            or not req.complete
            or req.upgrade
            or self.must_close
            or self.ctx.lifecycle.should_close_connection()
        )
        self.response_close_delimited = False
        if bodyless:
            frame = _FRAME_NONE
        elif info.content_length is not None and not info.chunked:
            frame = _FRAME_RAW
        else:
            self.response_close_delimited = not info.chunked
            if req.version == "1.1":
                frame = _FRAME_CHUNKED
                out.append((b"Transfer-Encoding", b"chunked"))
            else:
                frame = _FRAME_RAW
                close = True
        if close:
            out.append((b"Connection", b"close"))
        elif req.version == "1.0":
            out.append((b"Connection", b"keep-alive"))
        self.response_frame = frame
        self.close_after = close
        self.response_started = True
        self.ctx.stats.count(self.ctx.stats.responses_by_class, _status_class(status))
        self._write(serialize_head(status_line(status, reason or reason_phrase(status)), out))
        if req.method == b"HEAD":
            # llhttp cannot know this response has no body; the exchange ends with its head.
            self.response_complete(conn)

    def response_body(self, body: bytes) -> None:
        req = self.active
        if req is not None and req.access is not None:
            req.access.body_bytes += len(body)
        if self.response_frame == _FRAME_CHUNKED:
            self._write(chunk(body))
        elif self.response_frame == _FRAME_RAW:
            self._write(body)

    def response_complete(self, conn: UpstreamConnection) -> None:
        req = self.active
        if req is None or conn is not self.upstream:
            return
        if self.response_frame == _FRAME_CHUNKED:
            self._write(LAST_CHUNK)
        self.upstream = None
        if conn.keep_alive and req.complete and not conn.closed and not self.response_close_delimited:
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
                and not conn.got_response_bytes
                and not req.retried
                and req.method in IDEMPOTENT_METHODS
                and req.body_mode == _BODY_NONE
            ):
                # The keep-alive race: the app closed an idle pooled connection as we sent.
                req.retried = True
                self.ctx.stats.count(self.ctx.stats.upstream_errors, "retried")
                self._cancel_response_timer()
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

    def _start_tunnel(
        self, conn: UpstreamConnection, reason: bytes, headers: Headers, info: HeadInfo
    ) -> None:
        assert info.upgrade is not None
        out = end_to_end(headers, info)
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", info.upgrade))
        self._write(serialize_head(status_line(101, reason or b"Switching Protocols"), out))
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
        self.close("after_response")

    # --- drain --------------------------------------------------------------------------------

    def is_idle(self) -> bool:
        return self.active is None and self.current is None and self.tunnel is None

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
        if self.closing:
            return
        self.close_reason = "forced"
        self.closing = True
        assert self.transport is not None
        self.transport.abort()

    def close(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        assert self.transport is not None
        self.transport.close()

    # --- internals ----------------------------------------------------------------------------

    def _finish_exchange(self) -> None:
        req = self.active
        if req is not None and req.access is not None:
            req.access.emit(req.method, req.target, self.ctx.loop.time())
        self.active = None
        self.response_started = False
        self.response_frame = _FRAME_NONE
        self._cancel_response_timer()
        if self.close_after or self.must_close:
            self.close("after_response")
            return
        if self.queue:
            following = self.queue.popleft()
            if not self.queue:
                self._resume(_PAUSE_PIPELINE)
            self._start(following)
            return
        self.idle_since = self.ctx.loop.time()
        self._resume(_PAUSE_PIPELINE)
        if not self.ctx.lifecycle.accepts_connections():
            self.close_when_idle(self.ctx.config.drain.idle_grace)

    def _fail(self, status: int, kind: str, message: str, log_level: int = logging.WARNING) -> None:
        req = self.active
        assert req is not None
        if status >= 500:
            self.ctx.stats.count(self.ctx.stats.upstream_errors, kind)
        self._cancel_response_timer()
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        log.log(log_level, "%d for %s from %s: %s", status, req.describe(), self.peer, message)
        self.close_after = (
            not req.complete
            or not req.keep_alive
            or req.upgrade
            or self.ctx.lifecycle.should_close_connection()
        )
        self.ctx.stats.count(self.ctx.stats.responses_by_class, _status_class(status))
        if req.access is not None:
            req.access.response_head(status, self.ctx.loop.time())
            req.access.body_bytes = len(message.encode()) + 1
        self._write(plain_response(status, message, close=self.close_after))
        self._finish_exchange()

    def _cut(self, kind: str, message: str) -> None:
        """A response already begun cannot be answered with an error: close so the client sees
        a truncated message, never a complete-looking one."""
        req = self.active
        assert req is not None
        self.ctx.stats.count(self.ctx.stats.upstream_errors, kind)
        log.warning("response to %s from %s cut: %s", req.describe(), self.peer, message)
        if req.access is not None:
            req.access.emit(req.method, req.target, self.ctx.loop.time(), "cut")
        self.active = None
        self._cancel_response_timer()
        self.close("after_response")

    def _bad_request(self, reason: str) -> None:
        self.ctx.stats.bad_requests += 1
        log.info("400 for a malformed request from %s: %s", self.peer, reason)
        if self.active is None:
            self.ctx.stats.count(self.ctx.stats.responses_by_class, "4xx")
            self._write(plain_response(400, f"bad request: {reason}", close=True))
            self.close("after_response")
        else:
            # The active exchange finishes; nothing after the malformed bytes is forwarded.
            self.must_close = True

    def _write(self, data: bytes) -> None:
        if not self.closing:
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

    def pause_reading_for_upstream(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_reading_for_upstream(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def _cancel_response_timer(self) -> None:
        if self.response_timer is not None:
            self.response_timer.cancel()
            self.response_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_response_timer()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None


def _status_class(status: int) -> str:
    return f"{status // 100}xx"
