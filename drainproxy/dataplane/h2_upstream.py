"""HTTP/2 to the app (RFC 9113; ``upstream.protocol: h2c``, prior knowledge without TLS, or
``h2``, over TLS by ALPN), for HTTP/2 clients' streams (gRPC end to end, with trailers, resets and
flow control carried through) and for HTTP/1.1 clients' requests (``Http1ViaH2``).

Streams share a few multiplexed connections: while every open one is full (the app's
SETTINGS_MAX_CONCURRENT_STREAMS) or going away (the app sent GOAWAY), new streams wait for a slot
and one more connection is opened.

Back-pressure: request bytes wait here until the app's window takes them, and only then are they
acknowledged to the client; response bytes are acknowledged to the app only once the client's
window has taken them (while a client stream is blocked, the app's stream window closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import Protocol, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httptools

from drainproxy.config.schema import UpstreamConfig
from drainproxy.core.stats import Stats
from drainproxy.dataplane.access import AccessRecord
from drainproxy.dataplane.context import ProxyContext
from drainproxy.dataplane.h2_client import H2Stream, h2_connection, response_fields
from drainproxy.dataplane.http1 import HOP_BY_HOP, Headers
from drainproxy.dataplane.upstream import ExchangeSink, UpstreamConnection, UpstreamPool
from drainproxy.system.tls import upstream_context

log = logging.getLogger("drainproxy.h2_upstream")

#: Request fields not sent on: hop-by-hop ones (RFC 9113 §8.2.2), except ``te: trailers``.
_DROPPED = (HOP_BY_HOP - {b"te"}) | {b"host"}
_WINDOW = 1024 * 1024
#: Streams opened on a new connection before the app's SETTINGS say how many it allows (RFC 9113
#: §6.5.2 recommends allowing at least 100).
_ASSUMED_STREAM_LIMIT = 100


class H2UpstreamPool:
    """The HTTP/2 connections to the app, and the streams waiting for room on one."""

    def __init__(self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop, stats: Stats):
        self.config = config
        self.loop = loop
        self.stats = stats
        self.connections: list[H2UpstreamConnection] = []
        #: Exchanges waiting for a stream slot (every connection full, or none yet).
        self.waiting: deque[H2UpstreamExchange] = deque()
        self._connecting: asyncio.Task[BaseException | None] | None = None
        #: ``protocol: h2``: TLS, with HTTP/2 agreed by ALPN.
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        self.scheme = b"http"
        if config.tls is not None:
            self.ssl = upstream_context(config.tls)
            self.ssl.set_alpn_protocols(["h2"])
            self.server_hostname = config.tls.server_name or config.host
            self.scheme = b"https"

    def open(self, side: StreamSide, headers: Headers) -> H2UpstreamExchange:
        """Start a stream to the app with ``headers`` (pseudo-header fields first)."""
        exchange = H2UpstreamExchange(side, self, headers)
        self.place(exchange)
        return exchange

    def place(self, exchange: H2UpstreamExchange) -> None:
        """Start the exchange's stream on a connection with room, or queue it for the next free
        slot; while any wait, one more connection is being opened."""
        conn = self.usable()
        if conn is not None:
            exchange.attach(conn)
            return
        self.waiting.append(exchange)
        self._ensure_connecting()

    def slot_freed(self) -> None:
        """A stream ended, or the app raised its stream limit: start waiting exchanges."""
        while self.waiting:
            conn = self.usable()
            if conn is None:
                return
            exchange = self.waiting.popleft()
            if not exchange.done:
                exchange.attach(conn)

    def usable(self) -> H2UpstreamConnection | None:
        for conn in self.connections:
            if conn.usable():
                return conn
        return None

    def live(self) -> bool:
        return any(not conn.closed and not conn.going_away for conn in self.connections)

    async def connected(self) -> None:
        """Until a connection is open; raises OSError or TimeoutError as connecting does."""
        if self.live():
            return
        self._ensure_connecting()
        assert self._connecting is not None
        error = await asyncio.shield(self._connecting)
        if error is not None:
            raise error

    def _ensure_connecting(self) -> None:
        if self._connecting is None:
            self._connecting = self.loop.create_task(self._connect_for_waiting())

    async def _connect_for_waiting(self) -> BaseException | None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: H2UpstreamConnection(self),
                    self.config.host,
                    self.config.port,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname,
                ),
                self.config.connect_timeout or None,
            )
            if conn.closed:
                raise ConnectionRefusedError(0, "the app did not agree to HTTP/2 (ALPN h2)")
        except (OSError, TimeoutError) as exc:
            waiting, self.waiting = self.waiting, deque()
            for exchange in waiting:
                exchange.connect_failed(exc)
            return exc
        finally:
            self._connecting = None
        self.slot_freed()
        if self.waiting:
            self._ensure_connecting()
        return None

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()


_OPEN = h2.connection.ConnectionState.CLIENT_OPEN


class _StateMachineOpenAfterGoaway(h2.connection.H2ConnectionStateMachine):
    """h2 closes its connection state machine on the app's GOAWAY, after which it refuses the
    frames the streams still in progress need (their DATA, WINDOW_UPDATEs, even the rest of the
    read that carried the GOAWAY). A graceful GOAWAY lets those streams finish (RFC 9113 §6.8),
    so it leaves the connection open here; ``H2UpstreamConnection.going_away`` keeps new
    streams off it."""

    def __init__(self) -> None:
        super().__init__()
        self._transitions = {
            **self._transitions,
            (_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (None, _OPEN),
        }


class H2UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.h2 = h2_connection(client_side=True)
        self.h2.state_machine = _StateMachineOpenAfterGoaway()
        self.exchanges: dict[int, H2UpstreamExchange] = {}
        self.going_away = False
        self.closed = False
        self.flush_scheduled = False
        self.write_paused = False
        self.idle_since = pool.loop.time()
        self.settings_received = False

    def usable(self) -> bool:
        if self.going_away or self.closed:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        if not self.settings_received:
            limit = min(limit, _ASSUMED_STREAM_LIMIT)
        # Our own count: h2's ``open_outbound_streams`` walks every stream (a tenth of the
        # time per request at 128 streams). If h2 still holds a stream we are done with,
        # ``send_headers`` refuses and the exchange waits for a slot (``attach``).
        return len(self.exchanges) < limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            log.error(
                "the app did not agree to HTTP/2 over TLS (ALPN h2); set upstream.protocol: http1",
                extra={"event": "upstream_alpn"},
            )
            self.abort()
            return
        self.pool.connections.append(self)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_WINDOW)
        self.write_now()

    def flush(self) -> None:
        """Write what h2 has prepared once per pass of the event loop (see
        ``H2ClientConnection.flush``)."""
        if not self.flush_scheduled and not self.closed:
            self.flush_scheduled = True
            self.pool.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close an idle connection politely: GOAWAY, then the close."""
        if self.closed or self.transport is None:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self.write_now()
        self.closed = True
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from the app: %s", exc)
            self.write_now()
            self._fail_all("invalid", f"invalid HTTP/2 from the app: {exc}")
            self.abort()
            return
        for event in events:
            exchange = self.exchanges.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived):
                if exchange is not None:
                    exchange.response_head(event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.InformationalResponseReceived):
                if exchange is not None:
                    exchange.informational(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event, exchange)
            elif isinstance(event, h2.events.TrailersReceived):
                if exchange is not None:
                    exchange.response_end(response_fields(event.headers))
            elif isinstance(event, h2.events.StreamEnded):
                if exchange is not None:
                    exchange.response_end(None)
            elif isinstance(event, h2.events.StreamReset):
                if exchange is not None:
                    exchange.reset_by_app(event.error_code)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_updated(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings_received = True
                self._window_updated(0)
                self.pool.slot_freed()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0)
        self.write_now()

    def _data(self, event: h2.events.DataReceived, exchange: H2UpstreamExchange | None) -> None:
        flow_length = event.flow_controlled_length or 0
        if exchange is None:
            if flow_length:
                self.h2.increment_flow_control_window(flow_length)
            return
        exchange.response_data(event.data, flow_length)

    def _window_updated(self, stream_id: int) -> None:
        if stream_id:
            exchange = self.exchanges.get(stream_id)
            if exchange is not None:
                exchange.pump()
            return
        for exchange in list(self.exchanges.values()):
            exchange.pump()

    def _goaway(self, last_stream_id: int) -> None:
        """The app is going away (a graceful shutdown, or an nginx-style request limit): no new
        stream goes here; streams it never processed are refused, which an HTTP/2 client may
        retry elsewhere (RFC 9113 §6.8); the others finish."""
        self.going_away = True
        for stream_id, exchange in list(self.exchanges.items()):
            if stream_id > last_stream_id:
                exchange.refused()
        if not self.exchanges and self.transport is not None:
            self.write_now()
            self.transport.close()

    def forget(self, stream_id: int) -> None:
        """The exchange on ``stream_id`` is over; a connection going away closes after its last."""
        self.exchanges.pop(stream_id, None)
        if not self.exchanges:
            self.idle_since = self.pool.loop.time()
        if self.pool.waiting:
            self.pool.slot_freed()
        if self.going_away and not self.exchanges and self.transport is not None:
            self.write_now()
            self.transport.close()

    def _fail_all(self, kind: str, message: str) -> None:
        for exchange in list(self.exchanges.values()):
            exchange.fail(502, kind, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self.pool.connections:
            self.pool.connections.remove(self)
        kind = "reset" if exc is not None else "closed"
        self._fail_all(kind, f"the app {kind} the HTTP/2 connection")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for exchange in list(self.exchanges.values()):
            exchange.release_acknowledgements()


class StreamSide(Protocol):
    """The client side of a stream to the app: an HTTP/2 client stream (``H2Stream``), or an
    HTTP/1.1 exchange (``Http1ViaH2``)."""

    request_complete: bool
    access: AccessRecord | None

    def data_forwarded(self, flow_length: int) -> None: ...

    def respond_informational(self, status: int, headers: Headers) -> None: ...

    def respond_head(self, status: int, headers: Headers, *, end: bool = False) -> None: ...

    def respond_data(self, data: bytes) -> None: ...

    def respond_end(self, trailers: Headers | None = None) -> None: ...

    def fail(self, status: int, kind: str, message: str) -> None: ...

    def reset(self, error_code: int, outcome: str) -> None: ...

    def refused(self, message: str) -> None:
        """The app did not process the request: the client may safely send it again."""


def request_headers(stream: H2Stream, ctx: ProxyContext) -> Headers:
    """An HTTP/2 client's request as sent on to the app: hop-by-hop fields dropped (but
    ``te: trailers``, which gRPC needs), X-Forwarded-* as configured in ``forwarded``."""
    forwarding = ctx.forwarding
    authority = stream.authority or forwarding.default_host_line[6:-2]
    headers: Headers = [
        (b":method", stream.method),
        (b":scheme", pool_scheme(ctx)),
        (b":authority", authority),
        (b":path", stream.path or b"/"),
    ]
    prior_for: list[bytes] = []
    has_proto = False
    for name, value in stream.headers:
        if name in _DROPPED:
            continue
        if name == b"te" and value.lower() != b"trailers":
            continue
        if name == b"x-forwarded-for":
            prior_for.append(value)
            if forwarding.xff_append:
                continue
        elif name == b"x-forwarded-proto":
            has_proto = True
            if forwarding.overwrite_xfp:
                continue
        headers.append((name, value))
    if forwarding.xff_append:
        peer = stream.conn.peer_bytes
        headers.append((b"x-forwarded-for", b", ".join([*prior_for, peer])))
    if forwarding.set_xfp and (forwarding.overwrite_xfp or not has_proto):
        headers.append((b"x-forwarded-proto", ctx.scheme))
    return headers


def pool_scheme(ctx: ProxyContext) -> bytes:
    pool = ctx.pool
    assert isinstance(pool, H2BridgePool)
    return pool.h2.scheme


class H2UpstreamExchange:
    """One stream to the app, for one client exchange."""

    def __init__(self, stream: StreamSide, pool: H2UpstreamPool, headers: Headers) -> None:
        self.stream = stream
        self.pool = pool
        self.headers = headers
        self.conn: H2UpstreamConnection | None = None
        self.stream_id = 0
        #: Request body chunks, with their flow-controlled lengths, waiting for the app's window.
        self.pending: deque[tuple[bytes, int]] = deque()
        self.request_trailers: Headers | None = None
        self.request_ended = False
        self.end_sent = False
        #: Client bytes sent on while the app's socket was backed up: acknowledged when it drains.
        self.unacknowledged = 0
        #: Response bytes held by the client stream: acknowledged to the app once it catches up.
        self.response_paused = False
        self.response_unacknowledged = 0
        self.done = False

    def connect_failed(self, exc: BaseException) -> None:
        if self.done:
            return
        if isinstance(exc, TimeoutError):
            stats = self.pool.stats
            stats.count(stats.timeouts, "connect")
            seconds = self.pool.config.connect_timeout
            self.fail(504, "timeout", f"no connection to the app within {seconds:g}s")
        else:
            why = getattr(exc, "strerror", None) or exc
            self.fail(502, "refused", f"cannot connect to the app: {why}")

    def attach(self, conn: H2UpstreamConnection) -> None:
        stream = self.stream
        self.conn = conn
        self.stream_id = conn.h2.get_next_available_stream_id()
        conn.exchanges[self.stream_id] = self
        end = stream.request_complete and not self.pending
        try:
            conn.h2.send_headers(self.stream_id, self.headers, end_stream=end)
        except h2.exceptions.TooManyStreamsError:
            # The app lowered its limit since the connection was picked: wait for a slot.
            conn.exchanges.pop(self.stream_id, None)
            self.conn = None
            self.pool.place(self)
            return
        except h2.exceptions.ProtocolError as exc:
            self.fail(502, "invalid", f"cannot send the request to the app: {exc}")
            return
        self.end_sent = end
        if stream.access is not None:
            stream.access.upstream_sent = self.pool.loop.time()
        self.pump()
        conn.flush()

    # --- Backend (called by the client stream) -----------------------------------------------

    def send_data(self, data: bytes, flow_length: int) -> None:
        self.pending.append((data, flow_length))
        if self.conn is not None:
            self.pump()
            self.conn.flush()

    def send_trailers(self, headers: Headers) -> None:
        self.request_trailers = [(name, value) for name, value in headers if name not in HOP_BY_HOP]
        self.end_request()

    def end_request(self) -> None:
        self.request_ended = True
        if self.conn is not None:
            self.pump()
            self.conn.flush()

    def cancel(self) -> None:
        """The client reset the stream (a gRPC cancellation or deadline): reset the app's."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        if conn is None:
            return
        if not conn.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                conn.h2.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
            conn.flush()
        conn.forget(self.stream_id)

    def pause_response(self) -> None:
        self.response_paused = True

    def resume_response(self) -> None:
        self.response_paused = False
        flow, self.response_unacknowledged = self.response_unacknowledged, 0
        conn = self.conn
        if flow and conn is not None and not conn.closed:
            self._acknowledge_app(flow)
            conn.flush()

    # --- request bytes toward the app ---------------------------------------------------------

    def pump(self) -> None:
        """Send what the app's window allows of the waiting request bytes, then the end."""
        conn = self.conn
        if conn is None or self.done or conn.closed or self.end_sent:
            return
        h2conn = conn.h2
        pending = self.pending
        try:
            while pending:
                window = h2conn.local_flow_control_window(self.stream_id)
                if window <= 0:
                    return
                size = min(window, h2conn.max_outbound_frame_size)
                data, flow_length = pending[0]
                if len(data) > size:
                    pending[0] = (data[size:], flow_length - size)
                    h2conn.send_data(self.stream_id, data[:size])
                    self._forwarded(size)
                    continue
                pending.popleft()
                h2conn.send_data(self.stream_id, data)
                self._forwarded(flow_length)
            if self.request_ended:
                if self.request_trailers:
                    h2conn.send_headers(self.stream_id, self.request_trailers, end_stream=True)
                else:
                    h2conn.end_stream(self.stream_id)
                self.end_sent = True
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            log.debug("request stream %d to the app ended under us: %s", self.stream_id, exc)
            pending.clear()

    def _forwarded(self, flow_length: int) -> None:
        conn = self.conn
        if conn is not None and conn.write_paused:
            self.unacknowledged += flow_length
        else:
            self.stream.data_forwarded(flow_length)

    def release_acknowledgements(self) -> None:
        flow, self.unacknowledged = self.unacknowledged, 0
        if flow:
            self.stream.data_forwarded(flow)

    # --- response events from the app ---------------------------------------------------------

    def informational(self, headers: Headers) -> None:
        status, fields = _status_and_fields(headers)
        self.stream.respond_informational(status, fields)

    def response_head(self, headers: Headers, ended: bool) -> None:
        status, fields = _status_and_fields(headers)
        if ended:
            # A trailers-only response (a gRPC error): its grpc-status is in these fields.
            self.done = True
            self._forget()
        self.stream.respond_head(status, fields, end=ended)

    def response_data(self, data: bytes, flow_length: int) -> None:
        self.stream.respond_data(data)
        if self.response_paused:
            self.response_unacknowledged += flow_length
        else:
            self._acknowledge_app(flow_length)

    def _acknowledge_app(self, flow_length: int) -> None:
        conn = self.conn
        if conn is None or not flow_length:
            return
        try:
            conn.h2.acknowledge_received_data(flow_length, self.stream_id)
        except h2.exceptions.StreamClosedError:
            conn.h2.increment_flow_control_window(flow_length)

    def response_end(self, trailers: Headers | None) -> None:
        if self.done:
            return
        self.done = True
        self._forget()
        self.stream.respond_end(trailers)

    def reset_by_app(self, error_code: int) -> None:
        if self.done:
            return
        self.done = True
        self._forget()
        stats = self.pool.stats
        stats.count(stats.upstream_errors, "reset")
        self.stream.reset(error_code, "app_reset")

    def fail(self, status: int, kind: str, message: str) -> None:
        if self.done:
            return
        self.done = True
        self._forget()
        self.stream.fail(status, kind, message)

    def refused(self) -> None:
        """The app went away without processing this stream."""
        if self.done:
            return
        self.done = True
        self._forget()
        self.stream.refused("the app refused the stream (GOAWAY)")

    def _forget(self) -> None:
        conn = self.conn
        if conn is not None:
            # Response bytes the client has not taken yet: the connection window needs them.
            flow, self.response_unacknowledged = self.response_unacknowledged, 0
            if flow and not conn.closed:
                conn.h2.increment_flow_control_window(flow)
            conn.forget(self.stream_id)


def _status_and_fields(headers: Headers) -> tuple[int, Headers]:
    status = 502
    fields: Headers = []
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":" and name not in HOP_BY_HOP:
            fields.append((name, value))
    return status, fields


# --- HTTP/1.1 clients to an HTTP/2 app ------------------------------------------------------------

#: Request body bytes an HTTP/1.1 client may have written that the app's window has not taken,
#: before reading from that client pauses.
_BUFFER_LIMIT = 256 * 1024
#: Request fields of the HTTP/1.1 head that HTTP/2 does not carry (Host becomes :authority).
_NOT_FOR_H2 = _DROPPED | {b"te"}


class H2BridgePool(UpstreamPool):
    """``ProxyContext.pool`` when the app speaks HTTP/2: an HTTP/1.1 exchange gets an
    ``Http1ViaH2`` (one stream on the shared connections) where it would get a pooled
    connection, so ``ClientConnection`` runs unchanged."""

    def __init__(
        self,
        config: UpstreamConfig,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        max_head_bytes: int,
    ) -> None:
        """``max_head_bytes``: ``limits.max_response_header_bytes``, the app's header lists."""
        super().__init__(config, loop, max_head_bytes)
        self.h2 = H2UpstreamPool(config, loop, stats)

    def open_stream(self, stream: H2Stream) -> H2UpstreamExchange:
        """An HTTP/2 client's stream, carried on as a stream to the app
        (``h2_client.StreamPool``)."""
        return self.h2.open(stream, request_headers(stream, stream.conn.ctx))

    def take_idle(self) -> UpstreamConnection | None:
        return cast(UpstreamConnection, Http1ViaH2(self.h2)) if self.h2.live() else None

    async def connect(self) -> UpstreamConnection:
        """Once a connection to the app is open (its errors answer 502 and 504 as usual)."""
        await self.h2.connected()
        return cast(UpstreamConnection, Http1ViaH2(self.h2))

    def release(self, conn: UpstreamConnection) -> None:
        """Nothing to keep: the stream is over, its connection is shared."""

    def expire_idle(self, now: float) -> int:
        """Close connections with no stream for ``upstream.idle_timeout``."""
        timeout = self.config.idle_timeout
        expired = 0
        if timeout <= 0:
            return expired
        for conn in list(self.h2.connections):
            if not conn.exchanges and now - conn.idle_since >= timeout:
                conn.close()
                expired += 1
        return expired

    def close_all(self) -> None:
        self.h2.close_all()


class Http1ViaH2:
    """One HTTP/1.1 exchange of a ``ClientConnection`` carried as a stream to an HTTP/2 app. It
    stands in for an ``UpstreamConnection``: the client writes the request as the HTTP/1.1 bytes
    drainproxy forwards (head, framed body), which llhttp parses back into the stream's fields and
    DATA; the response goes back through the client's usual callbacks (trailers are dropped, as
    HTTP/1.1 responses from drainproxy carry none)."""

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.client: ExchangeSink | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.exchange: H2UpstreamExchange | None = None
        # What ``ClientConnection`` reads of an ``UpstreamConnection``.
        self.keep_alive = True
        self.closed = False
        self.reused = False
        self.got_response_bytes = False
        self.body_left = 0
        self.close_delimited = False
        self.tunnel = False
        # ``StreamSide``.
        self.request_complete = False
        self.access: AccessRecord | None = None
        self.target = b""
        self.fields: Headers = []
        self.upgrade = False
        #: Body bytes written by the client that the app's window has not taken yet.
        self.buffered = 0
        self.client_paused = False

    def bind(self, client: ExchangeSink) -> None:
        self.client = client

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgrade = True
        except httptools.HttpParserError as exc:
            self._upstream_failed("invalid", f"cannot carry the request over HTTP/2: {exc}")
            return
        if self.upgrade:
            self._upstream_failed("invalid", "the app speaks HTTP/2, which has no Upgrade")

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        for part in parts:
            self.write(part)

    def pause_reading(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_response()

    def resume_reading(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_response()

    def abort(self) -> None:
        self.client = None
        self.closed = True
        if self.exchange is not None:
            self.exchange.cancel()

    close_tunnel = abort

    # --- llhttp callbacks on the request as forwarded -----------------------------------------

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # refused once the feed returns
        authority = b""
        headers: Headers = []
        for name, value in self.fields:
            if name == b"host":
                authority = value
            elif name not in _NOT_FOR_H2:
                headers.append((name, value))
        method = self.parser.get_method()
        pseudo = [(b":method", method), (b":scheme", self.pool.scheme), (b":authority", authority)]
        pseudo.append((b":path", self.target))
        self.exchange = H2UpstreamExchange(self, self.pool, pseudo + headers)
        self.pool.place(self.exchange)

    def on_body(self, body: bytes) -> None:
        if self.exchange is None:
            return
        self.buffered += len(body)
        self.exchange.send_data(body, len(body))
        if self.buffered > _BUFFER_LIMIT and not self.client_paused and self.client is not None:
            self.client_paused = True
            self.client.pause_reading_for_upstream()

    def on_message_complete(self) -> None:
        self.request_complete = True
        if self.exchange is not None:
            self.exchange.end_request()

    # --- StreamSide -----------------------------------------------------------------------------

    def data_forwarded(self, flow_length: int) -> None:
        self.buffered -= flow_length
        if self.client_paused and self.buffered <= _BUFFER_LIMIT // 2 and self.client is not None:
            self.client_paused = False
            self.client.resume_reading_for_upstream()

    def respond_informational(self, status: int, headers: Headers) -> None:
        if self.client is not None:
            self.client.response_interim(status, b"", headers)

    def respond_head(self, status: int, headers: Headers, *, end: bool = False) -> None:
        client = self.client
        if client is None:
            return
        self.got_response_bytes = True
        me = cast(UpstreamConnection, self)
        client.start_batch()
        try:
            client.response_head(me, status, b"", headers)
            if end:
                client.response_complete(me)
        finally:
            client.flush()

    def respond_data(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        client.start_batch()
        try:
            client.response_body(data)
        finally:
            client.flush()

    def respond_end(self, trailers: Headers | None = None) -> None:
        client = self.client
        if client is None:
            return
        client.start_batch()
        try:
            client.response_complete(cast(UpstreamConnection, self))
        finally:
            client.flush()

    def fail(self, status: int, kind: str, message: str) -> None:
        self._upstream_failed(kind, message)

    def reset(self, error_code: int, outcome: str) -> None:
        self._upstream_failed("reset", f"the app reset the stream (error code {error_code})")

    def refused(self, message: str) -> None:
        self._upstream_failed("closed", message)

    def _upstream_failed(self, kind: str, message: str) -> None:
        client = self.client
        if client is not None:
            client.upstream_failed(kind, message)
