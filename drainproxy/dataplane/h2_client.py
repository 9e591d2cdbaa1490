"""HTTP/2 on the listener (RFC 9113), with the sans-IO ``h2`` library; imported only when the
first HTTP/2 connection arrives, so an HTTP/1-only proxy never pays for it.

A connection becomes HTTP/2 in one of two ways, both decided by ``proxy.ClientConnection``:
the client's first bytes are the connection preface (``PRI * HTTP/2.0...``, "prior knowledge",
the way gRPC clients connect to a plain-text port), or TLS ALPN selected ``h2``. The
``ClientConnection`` then hands its transport to an ``H2ClientConnection`` (``take_over``).

Each stream is one exchange: ``H2Stream`` holds the client's side of it, and a *backend*
carries it to the app, over the HTTP/1.1 pool (``Http1Exchange``: the request is translated, RFC
9113 §8.2.3 / §8.3.1) or over an HTTP/2 connection to the app (``h2_upstream``, through the
pool: ``StreamPool``).

Flow control is back-pressure in both directions, so memory is bounded by the windows:
request DATA is acknowledged to the client (WINDOW_UPDATE) only once written to the app with the
app's socket not backed up; response bytes beyond the client's window wait in the stream, and
while any wait the backend stops reading from the app.

Drain (docs/drain.md, docs/http2.md): when the lifecycle says responses close their connections
(from ``propagating`` on, as HTTP/1.1 gets ``Connection: close``), every connection gets the
two-step GOAWAY: first with last-stream-id 2^31-1 and a PING, then, once the PING is answered
(every stream the client sent before seeing the first GOAWAY has arrived), with the real last
stream id. Streams below it finish; the connection closes when none is left. At
``drain.timeout`` the streams still open are reset (RST_STREAM CANCEL) and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from drainproxy.dataplane.access import AccessRecord
from drainproxy.dataplane.http1 import (
    CRLF,
    HOP_BY_HOP,
    LAST_CHUNK,
    FramingError,
    Headers,
    add_forwarded_fields,
    check_interim_head,
    chunk_size_line,
    forward_head,
)

if TYPE_CHECKING:
    from drainproxy.dataplane.context import ProxyContext
    from drainproxy.dataplane.upstream import UpstreamConnection

log = logging.getLogger("drainproxy.h2")


def h2_connection(*, client_side: bool) -> h2.connection.H2Connection:
    """An h2 connection state machine for either side of the proxy, with bytes for names."""
    return h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            # What is sent was built here from fields already checked on the way in (by h2 or
            # llhttp), lowercased and without connection-specific fields: h2's second pass over
            # them cost a tenth of the time per stream (bench/RESULTS.md).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )


#: RFC 9113 §6.8: "a server that is attempting to gracefully shut down a connection SHOULD send
#: an initial GOAWAY frame with the last stream identifier set to 2^31-1 and a NO_ERROR code".
MAX_STREAM_ID = 2**31 - 1
_DRAIN_PING = b"drainpx\x01"
#: Rapid reset (CVE-2023-44487): once a connection has opened this many streams, it is told to
#: go (GOAWAY ENHANCE_YOUR_CALM) when more than half of them were reset by the client before
#: their response began. Ordinary cancellation (gRPC deadlines) stays far below half.
_RESET_CHECK_AFTER = 100
#: How long a connection closed for an error keeps discarding what the client still sends.
_LINGER_SECONDS = 2.0
_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
#: Response fields that must not appear in HTTP/2 (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC = HOP_BY_HOP | {b"host"}


class H2ConnectionState(enum.Enum):
    """Where an HTTP/2 client connection is in its graceful shutdown (RFC 9113 §6.8): OPEN,
    then GOAWAY_ANNOUNCED, then GOAWAY_FINAL, each state able to end in CLOSED."""

    #: No GOAWAY sent: streams are opened and served.
    OPEN = "open"
    #: The first GOAWAY (last stream 2^31-1) and a PING are sent: streams still open.
    GOAWAY_ANNOUNCED = "goaway_announced"
    #: The PING came back, so every stream the client opened before the first GOAWAY is here:
    #: the final GOAWAY names the last one, and the connection closes when its streams end.
    GOAWAY_FINAL = "goaway_final"
    #: Closed or closing: nothing more is read or written.
    CLOSED = "closed"


_H2_OPEN = H2ConnectionState.OPEN
_GOAWAY_ANNOUNCED = H2ConnectionState.GOAWAY_ANNOUNCED
_GOAWAY_FINAL = H2ConnectionState.GOAWAY_FINAL
_H2_CLOSED = H2ConnectionState.CLOSED


class Backend(Protocol):
    """Where a stream's request goes: the app over HTTP/1.1 or over HTTP/2."""

    def send_data(self, data: bytes, flow_length: int) -> None:
        """Forward request body bytes; call ``stream.data_forwarded(flow_length)`` once they
        have left (that returns the client its flow-control window)."""

    def send_trailers(self, headers: Headers) -> None: ...

    def end_request(self) -> None: ...

    def cancel(self) -> None:
        """The client reset the stream or went away: stop the exchange with the app."""

    def pause_response(self) -> None: ...

    def resume_response(self) -> None: ...


class StreamPool(Protocol):
    """``ProxyContext.pool`` when the app speaks HTTP/2 (``h2_upstream.H2BridgePool``): it
    carries a client's stream on as a stream to the app."""

    def open_stream(self, stream: H2Stream) -> Backend: ...


def open_backend(stream: H2Stream) -> Backend:
    """Where a stream goes: over HTTP/2 to an app that speaks it (``upstream.protocol``),
    else translated to an HTTP/1.1 exchange on the pool."""
    ctx = stream.conn.ctx
    if ctx.config.upstream.protocol != "http1":
        # control.server made the pool an h2_upstream.H2BridgePool for this protocol.
        return cast(StreamPool, ctx.pool).open_stream(stream)
    exchange = Http1Exchange(stream)
    exchange.start()
    return exchange


def take_over(
    ctx: ProxyContext, transport: asyncio.Transport, peer: str, first_bytes: bytes
) -> None:
    """Serve over HTTP/2 a connection that turned out to speak it: an ``H2ClientConnection``
    takes ``transport`` (its HTTP/1 protocol object is done) and is fed the bytes read so far."""
    conn = H2ClientConnection(ctx, transport, peer)
    transport.set_protocol(conn)
    ctx.connections.add(conn)
    conn.start(first_bytes)


class H2Stream:
    """One client stream: the request as received and the response on its way back."""

    __slots__ = (
        "access",
        "authority",
        "backend",
        "body_size",
        "conn",
        "finished",
        "headers",
        "method",
        "out",
        "path",
        "request_complete",
        "response_end",
        "response_started",
        "stream_id",
        "trailers",
    )

    def __init__(self, conn: H2ClientConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.method = b""
        self.path = b""
        self.authority = b""
        self.headers: Headers = []
        self.backend: Backend | None = None
        self.body_size = 0
        self.request_complete = False
        self.response_started = False
        #: Response bytes waiting for the client's flow-control window.
        self.out: deque[bytes] = deque()
        #: The response ended (with these trailers, if any) but bytes still wait in ``out``.
        self.response_end = False
        self.trailers: Headers | None = None
        self.finished = False
        self.access: AccessRecord | None = None

    def describe(self) -> str:
        return f"{self.method.decode('latin-1')} {self.path.decode('latin-1')}"

    # --- called by the backend ---------------------------------------------------------------

    def data_forwarded(self, flow_length: int) -> None:
        self.conn.acknowledge(self, flow_length)

    def respond_informational(self, status: int, headers: Headers) -> None:
        if self.finished or status == 101:
            return
        self.conn.send_headers(self, [(b":status", b"%d" % status), *headers], end=False)

    def respond_head(self, status: int, headers: Headers, *, end: bool = False) -> None:
        if self.finished:
            return
        self.response_started = True
        conn = self.conn
        stats = conn.ctx.stats
        stats.count(stats.responses_by_class, _STATUS_CLASSES[min(status // 100, 5)])
        if self.access is not None:
            self.access.response_head(status, conn.ctx.loop.time())
        conn.send_headers(self, [(b":status", b"%d" % status), *headers], end=end)
        if end:
            conn.complete(self)

    def respond_data(self, data: bytes) -> None:
        if self.finished or not data:
            return
        if self.access is not None:
            self.access.body_bytes += len(data)
        self.out.append(data)
        self.conn.pump_soon(self)

    def respond_end(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self.response_end = True
        self.trailers = trailers
        self.conn.pump_soon(self)

    def fail(self, status: int, kind: str, message: str) -> None:
        """The app could not answer: drainproxy's own error response, or a reset if the response
        already began (the client must not take a truncated response for a whole one)."""
        if self.finished:
            return
        stats = self.conn.ctx.stats
        if kind != "client":
            stats.count(stats.upstream_errors, kind)
        if self.response_started:
            log.warning("response to %s from %s cut: %s", self.describe(), self.conn.peer, message)
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR, "cut")
            return
        log.warning("%d for %s from %s: %s", status, self.describe(), self.conn.peer, message)
        body = (message + "\n").encode()
        self.respond_head(
            status,
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
            ],
        )
        self.respond_data(body)
        self.respond_end()

    def refused(self, message: str) -> None:
        """The app did not process the request: REFUSED_STREAM, which a client may retry at once
        (gRPC does so transparently), or a 502 if the response somehow began."""
        if self.response_started:
            self.fail(502, "closed", message)
            return
        stats = self.conn.ctx.stats
        stats.count(stats.upstream_errors, "closed")
        log.info("%s from %s refused: %s", self.describe(), self.conn.peer, message)
        self.reset(h2.errors.ErrorCodes.REFUSED_STREAM, "refused")

    def reset(self, error_code: int, outcome: str) -> None:
        """End the stream with RST_STREAM (the app reset its side, or the response was cut)."""
        if self.finished:
            return
        self.conn.reset_stream(self, error_code)
        self._finish(outcome)

    # --- internals ----------------------------------------------------------------------------

    def _finish(self, outcome: str = "complete") -> None:
        self.finished = True
        if self.access is not None:
            self.access.emit(self.method, self.path, self.conn.ctx.loop.time(), outcome)
        self.conn.stream_finished(self)


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 client connection: the ``h2`` state machine, its streams, and the drain."""

    def __init__(self, ctx: ProxyContext, transport: asyncio.Transport, peer: str) -> None:
        self.ctx = ctx
        self.transport = transport
        self.peer = peer
        #: The peer's address as X-Forwarded-For carries it.
        self.peer_bytes = peer.encode()
        limits = ctx.limits
        self.h2 = h2_connection(client_side=False)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.http2_stream_window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Until the client acknowledges our settings, h2 holds it to the protocol defaults.
        self.h2.decoder.max_header_list_size = limits.max_header_bytes
        self.streams: dict[int, H2Stream] = {}
        #: Streams with response bytes waiting for the client's window.
        self.blocked: set[H2Stream] = set()
        self.state = _H2_OPEN
        self.flush_scheduled = False
        #: Streams with response bytes or an end to send with the next write.
        self.to_pump: dict[H2Stream, None] = {}
        self.close_reason = "client"
        self.write_paused = False
        #: The last stream the client may open: lowered by the final GOAWAY.
        self.last_stream_id = MAX_STREAM_ID
        self.streams_opened = 0
        self.early_resets = 0
        self.mark = ctx.loop.time()
        ctx.stats.http2_connections += 1
        log.debug("HTTP/2 connection from %s", peer)

    @property
    def closing(self) -> bool:
        return self.state is _H2_CLOSED

    # --- start -------------------------------------------------------------------------------

    def start(self, first_bytes: bytes) -> None:
        self.h2.initiate_connection()
        # The connection window starts at 64 KiB whatever the settings say (RFC 9113 §6.9.2).
        extra = self.ctx.limits.http2_connection_window - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        if first_bytes:
            self.data_received(first_bytes)
        else:
            self.write_now()

    # --- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state is _H2_CLOSED:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request_received(event)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._request_ended(event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self._trailers(event)
            elif isinstance(event, h2.events.StreamReset):
                self._reset_by_client(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_updated(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._window_updated(0)
            elif isinstance(event, h2.events.PingAckReceived):
                if event.ping_data == _DRAIN_PING:
                    self._final_goaway()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._terminated_by_client()
                return
            if self.state is _H2_CLOSED:
                return
        self.write_now()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _H2_CLOSED
        ctx = self.ctx
        ctx.stats.count(ctx.stats.connections_closed, self.close_reason)
        ctx.connections.discard(self)
        for stream in list(self.streams.values()):
            if stream.backend is not None:
                stream.backend.cancel()
            if not stream.finished:
                stream.finished = True
                if stream.access is not None:
                    stream.access.emit(stream.method, stream.path, ctx.loop.time(), "client")
        self.streams.clear()
        self.blocked.clear()
        ctx.on_connection_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            if stream.backend is not None:
                stream.backend.pause_response()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.backend is not None and not stream.out:
                stream.backend.resume_response()
        self._window_updated(0)
        self.flush()

    # --- the connection-level interface of proxy connections (server.py, the sweep) -----------

    def is_idle(self) -> bool:
        return not self.streams

    def in_flight(self) -> int:
        return len(self.streams)

    def check_timeouts(self, now: float) -> None:
        """No stream for ``timeouts.client_idle`` (a connection that never opened one is idle
        too, as a silent HTTP/1.1 connection is): GOAWAY and close."""
        if self.state is _H2_CLOSED:
            return
        if self.streams:
            self._check_response_timeouts(now)
            return
        limit = self.ctx.config.timeouts.client_idle
        if limit and now - self.mark >= limit:
            stats = self.ctx.stats
            stats.count(stats.timeouts, "client_idle")
            self._goaway_and_close(h2.errors.ErrorCodes.NO_ERROR, "idle")

    def _check_response_timeouts(self, now: float) -> None:
        """``upstream.response_timeout`` for streams carried over HTTP/1.1, as for HTTP/1.1
        clients. Streams to an h2c app have none: a gRPC server may send its response head only
        with its first message, any time later (its deadline is the client's grpc-timeout)."""
        limit = self.ctx.config.upstream.response_timeout
        if not limit:
            return
        for stream in list(self.streams.values()):
            backend = stream.backend
            if (
                isinstance(backend, Http1Exchange)
                and not stream.response_started
                and backend.sent_at is not None
                and now - backend.sent_at >= limit
            ):
                stats = self.ctx.stats
                stats.count(stats.timeouts, "response_head")
                backend.cancel()
                stream.fail(504, "timeout", f"no response head from the app within {limit:g}s")

    def close_when_idle(self, grace: float) -> None:
        """The drain closes idle connections: tell the client (GOAWAY) and close once the last
        stream is done (at once if none is open)."""
        if self.state is _H2_CLOSED:
            return
        self.start_goaway()
        if not self.streams and self.state is _GOAWAY_FINAL:
            self._goaway_and_close(h2.errors.ErrorCodes.NO_ERROR, "idle")

    def force_close(self) -> None:
        """``drain.timeout``: reset the streams still open, count them, and close."""
        if self.state is _H2_CLOSED:
            return
        cut = [stream for stream in self.streams.values() if not stream.finished]
        for stream in cut:
            stream.reset(h2.errors.ErrorCodes.CANCEL, "forced")
            if stream.backend is not None:
                stream.backend.cancel()
        self.ctx.stats.streams_cut += len(cut)
        if cut:
            log.warning("drain.timeout: reset %d stream(s) from %s", len(cut), self.peer)
        self._goaway_and_close(h2.errors.ErrorCodes.NO_ERROR, "forced")

    def announce_drain(self) -> None:
        self.start_goaway()

    def start_goaway(self) -> None:
        """Step one of the graceful GOAWAY (RFC 9113 §6.8): no stream is refused yet."""
        if self.state is not _H2_OPEN:
            return
        self.state = _GOAWAY_ANNOUNCED
        self.write_now()
        self._write_goaway(MAX_STREAM_ID, h2.errors.ErrorCodes.NO_ERROR)
        self.h2.ping(_DRAIN_PING)
        self.write_now()

    # --- used by streams and backends ---------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 has prepared once per pass of the event loop, so the frames of many
        events and streams leave in one system call."""
        if not self.flush_scheduled and self.state is not _H2_CLOSED:
            self.flush_scheduled = True
            self.ctx.loop.call_soon(self.write_now)

    def pump_soon(self, stream: H2Stream) -> None:
        """Send the stream's waiting response bytes with this pass's write: the end of a
        response that arrives in the same pass then rides on its last DATA frame."""
        self.to_pump[stream] = None
        self.flush()

    def write_now(self) -> None:
        self.flush_scheduled = False
        while self.to_pump:
            streams = list(self.to_pump)
            self.to_pump.clear()
            for stream in streams:
                if not stream.finished:
                    self.pump(stream)
        data = self.h2.data_to_send()
        if data and self.state is not _H2_CLOSED:
            self.transport.write(data)

    def send_headers(self, stream: H2Stream, headers: Headers, *, end: bool) -> None:
        if self.state is _H2_CLOSED:
            return
        try:
            self.h2.send_headers(stream.stream_id, headers, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            log.debug("cannot send headers on stream %d: %s", stream.stream_id, exc)
        self.flush()

    def acknowledge(self, stream: H2Stream, flow_length: int) -> None:
        if self.state is _H2_CLOSED or not flow_length:
            return
        try:
            self.h2.acknowledge_received_data(flow_length, stream.stream_id)
        except h2.exceptions.StreamClosedError:
            # The stream is gone: the connection window still needs its bytes back.
            self.h2.increment_flow_control_window(flow_length)
        self.flush()

    def reset_stream(self, stream: H2Stream, error_code: int) -> None:
        if self.state is _H2_CLOSED:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.h2.reset_stream(stream.stream_id, error_code)
        self.flush()

    def pump(self, stream: H2Stream) -> None:
        """Send what the client's window allows of the stream's waiting response bytes, then
        the end of the response once nothing waits; the backend reads from the app again only
        when the stream is caught up."""
        if self.state is _H2_CLOSED:
            return
        h2conn = self.h2
        stream_id = stream.stream_id
        out = stream.out
        ended = False
        try:
            while out and not self.write_paused:
                window = h2conn.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                size = min(window, h2conn.max_outbound_frame_size)
                data = out[0]
                if len(data) <= size:
                    out.popleft()
                else:
                    out[0] = data[size:]
                    data = data[:size]
                ended = not out and stream.response_end and not stream.trailers
                h2conn.send_data(stream_id, data, end_stream=ended)
            if not out and stream.response_end and not ended:
                if stream.trailers:
                    h2conn.send_headers(stream_id, stream.trailers, end_stream=True)
                else:
                    h2conn.end_stream(stream_id)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            log.debug("stream %d from %s ended under us: %s", stream_id, self.peer, exc)
            out.clear()
            stream.response_end = True
        backend = stream.backend
        if out:
            if stream not in self.blocked:
                self.blocked.add(stream)
                if backend is not None:
                    backend.pause_response()
            return
        if stream in self.blocked:
            self.blocked.discard(stream)
            if backend is not None and not self.write_paused:
                backend.resume_response()
        if stream.response_end:
            self.complete(stream)

    def complete(self, stream: H2Stream) -> None:
        """The response has gone out whole."""
        if stream.finished:
            return
        if not stream.request_complete:
            # RFC 9113 §8.1: the answer is complete; stop the client sending the rest.
            self.reset_stream(stream, h2.errors.ErrorCodes.NO_ERROR)
        stream._finish()

    def stream_finished(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.blocked.discard(stream)
        if not self.streams:
            self.mark = self.ctx.loop.time()
            if self.state is _GOAWAY_FINAL:
                self._goaway_and_close(h2.errors.ErrorCodes.NO_ERROR, "after_response")
                return
        self.flush()

    # --- events -------------------------------------------------------------------------------

    def _request_received(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        ctx = self.ctx
        if stream_id > self.last_stream_id:
            # Sent after our final GOAWAY: the client retries it elsewhere (RFC 9113 §6.8).
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        now = ctx.loop.time()
        self.mark = now
        stats = ctx.stats
        stats.requests_total += 1
        phase: str = ctx.lifecycle.phase._value_
        stats.count(stats.requests_by_phase, phase)
        if ctx.access_log:
            stream.access = AccessRecord(now, phase)
        regular: Headers = []
        cookies: list[bytes] = []
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":method":
                    stream.method = value
                elif name == b":path":
                    stream.path = value
                elif name == b":authority":
                    stream.authority = value
            elif name == b"cookie":
                cookies.append(value)
            else:
                regular.append((name, value))
        if cookies:
            # RFC 9113 §8.2.3: crumbs are joined with "; " for an HTTP/1.1 hop.
            regular.append((b"cookie", b"; ".join(cookies)))
        stream.headers = regular
        stream.request_complete = event.stream_ended is not None
        if ctx.lifecycle.should_close_connection():
            self.start_goaway()
        if stream.method == b"CONNECT":
            stream.fail(405, "method", "CONNECT is not supported by a reverse proxy")
            return
        stream.backend = open_backend(stream)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        flow_length = event.flow_controlled_length
        if stream is None or stream.backend is None or stream.finished:
            # A stream already answered or refused: give the window back at once.
            if flow_length:
                self.h2.increment_flow_control_window(flow_length)
            return
        data = event.data
        max_body = self.ctx.limits.max_body_bytes
        if max_body is not None:
            stream.body_size += len(data)
            if stream.body_size > max_body:
                self.h2.increment_flow_control_window(flow_length)
                stream.backend.cancel()
                self.ctx.stats.count(self.ctx.stats.requests_rejected, "413")
                stream.fail(413, "client", "request body larger than limits.max_body_bytes")
                return
        stream.backend.send_data(data, flow_length)

    def _request_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.request_complete:
            return
        stream.request_complete = True
        if stream.backend is not None:
            stream.backend.end_request()

    def _trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.backend is not None:
            stream.backend.send_trailers(event.headers)

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stats = self.ctx.stats
        stats.streams_reset_by_client += 1
        if not stream.response_started:
            self.early_resets += 1
        if stream.backend is not None:
            stream.backend.cancel()
        if not stream.finished:
            stream._finish("client")
        if (
            self.streams_opened >= _RESET_CHECK_AFTER
            and self.early_resets * 2 > self.streams_opened
        ):
            log.warning(
                "%s reset %d of %d streams before their response: GOAWAY ENHANCE_YOUR_CALM "
                "(rapid reset, CVE-2023-44487)",
                self.peer,
                self.early_resets,
                self.streams_opened,
                extra={"event": "http2_abuse"},
            )
            stats.http2_abusive_connections += 1
            self.force_close_for(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _window_updated(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream in self.blocked:
                self.pump(stream)
            return
        for stream in list(self.blocked):
            self.pump(stream)

    def _final_goaway(self) -> None:
        """Step two: every stream the client opened before it saw the first GOAWAY is here."""
        if self.state is not _GOAWAY_ANNOUNCED:
            return
        self.state = _GOAWAY_FINAL
        self.last_stream_id = self.h2.highest_inbound_stream_id
        self.write_now()
        self._write_goaway(self.last_stream_id, h2.errors.ErrorCodes.NO_ERROR)
        if not self.streams:
            self._goaway_and_close(h2.errors.ErrorCodes.NO_ERROR, "after_response")

    def _terminated_by_client(self) -> None:
        for stream in list(self.streams.values()):
            if stream.backend is not None:
                stream.backend.cancel()
            if not stream.finished:
                stream._finish("client")
        self._close("client")

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        log.info("HTTP/2 protocol error from %s: %s", self.peer, exc)
        self.ctx.stats.bad_requests += 1
        for stream in list(self.streams.values()):
            if stream.backend is not None:
                stream.backend.cancel()
            if not stream.finished:
                stream._finish("client")
        self.write_now()  # h2 has prepared the GOAWAY naming the error
        self._close("client", linger=True)

    def force_close_for(self, error_code: int) -> None:
        for stream in list(self.streams.values()):
            if stream.backend is not None:
                stream.backend.cancel()
            if not stream.finished:
                stream._finish("client")
        self._goaway_and_close(error_code, "client", linger=True)

    # --- closing ------------------------------------------------------------------------------

    def _write_goaway(self, last_stream_id: int, error_code: int) -> None:
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=error_code)
        if self.state is not _H2_CLOSED:
            self.transport.write(frame.serialize())

    def _goaway_and_close(self, error_code: int, reason: str, *, linger: bool = False) -> None:
        if self.state is _H2_CLOSED:
            return
        self.write_now()
        final = self.state is _GOAWAY_FINAL
        last = self.last_stream_id if final else self.h2.highest_inbound_stream_id
        self._write_goaway(last, error_code)
        self._close(reason, linger=linger)

    def _close(self, reason: str, *, linger: bool = False) -> None:
        """With ``linger`` (the client is likely still sending: an error), shut our side and
        discard input for a moment first: closing with unread bytes sends a TCP reset that can
        destroy the GOAWAY before the client reads it."""
        if self.state is _H2_CLOSED:
            return
        self.write_now()
        self.state = _H2_CLOSED
        self.close_reason = reason
        transport = self.transport
        if linger and transport.can_write_eof():
            transport.write_eof()
            self.ctx.loop.call_later(_LINGER_SECONDS, transport.close)
        else:
            transport.close()


# --- the HTTP/1.1 backend: an h2 stream as a request over the existing pool ----------------------


class Http1Exchange:
    """A stream translated to an HTTP/1.1 exchange on a pooled ``UpstreamConnection``, whose
    ``upstream.ExchangeSink`` it is."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        conn = stream.conn
        self.ctx = conn.ctx
        self.upstream: UpstreamConnection | None = None
        self.chunked = False
        self.head = b""
        #: Body bytes (and their flow-controlled lengths) waiting for the app connection.
        self.pending: list[bytes] = []
        self.pending_flow = 0
        #: Forwarded while the app's socket was backed up: acknowledged when it drains.
        self.unacknowledged = 0
        self.upstream_write_paused = False
        self.response_paused = False
        self.cancelled = False
        self.response_close_delimited = False
        #: The connect under way (held: the loop keeps only a weak reference to tasks).
        self.connect_task: asyncio.Task[None] | None = None
        #: When the whole request had gone to the app: the response head timeout runs from here.
        self.sent_at: float | None = None

    def start(self) -> None:
        stream = self.stream
        try:
            self.head = self._request_head()
        except FramingError as exc:
            stream.fail(400, "client", f"malformed request: {exc}")
            return
        conn = self.ctx.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self.connect_task = self.ctx.loop.create_task(self._connect())

    def _request_head(self) -> bytes:
        stream = self.stream
        ctx = self.ctx
        _check_request_line(stream.method, stream.path, stream.authority)
        head = [stream.method, b" ", stream.path or b"/", b" HTTP/1.1\r\n"]
        headers = stream.headers
        if stream.authority and not any(name == b"host" for name, _ in headers):
            headers = [(b"host", stream.authority), *headers]
        forwarding = ctx.forwarding
        info = forward_head(head, headers, request=True, drop=forwarding.drop)
        if info.host is None:
            head.append(forwarding.default_host_line)
        if not stream.request_complete and info.content_length is None:
            self.chunked = True
            head.append(b"Transfer-Encoding: chunked\r\n")
        add_forwarded_fields(head, info, forwarding, stream.conn.peer_bytes)
        head.append(CRLF)
        return b"".join(head)

    async def _connect(self) -> None:
        ctx = self.ctx
        try:
            conn = await ctx.pool.connect()
        except TimeoutError:
            if not self.cancelled:
                ctx.stats.count(ctx.stats.timeouts, "connect")
                seconds = ctx.config.upstream.connect_timeout
                self.stream.fail(504, "timeout", f"no connection to the app within {seconds:g}s")
            return
        except OSError as exc:
            if not self.cancelled:
                why = exc.strerror or exc
                self.stream.fail(502, "refused", f"cannot connect to the app: {why}")
            return
        finally:
            self.connect_task = None
        if self.cancelled:
            ctx.pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.bind(self)
        if self.response_paused:
            conn.pause_reading()
        stream = self.stream
        parts = [self.head]
        for data in self.pending:
            parts += self._framed(data)
        if stream.request_complete and self.chunked:
            parts.append(LAST_CHUNK)
        conn.write(b"".join(parts))
        if stream.access is not None:
            stream.access.upstream_sent = self.ctx.loop.time()
        if stream.request_complete:
            self.sent_at = self.ctx.loop.time()
        self.pending = []
        flow, self.pending_flow = self.pending_flow, 0
        self._forwarded(flow)

    def _framed(self, data: bytes) -> tuple[bytes, ...]:
        return (chunk_size_line(len(data)), data, CRLF) if self.chunked else (data,)

    def _forwarded(self, flow_length: int) -> None:
        if self.upstream_write_paused:
            self.unacknowledged += flow_length
        else:
            self.stream.data_forwarded(flow_length)

    # --- Backend ------------------------------------------------------------------------------

    def send_data(self, data: bytes, flow_length: int) -> None:
        conn = self.upstream
        if conn is None:
            self.pending.append(data)
            self.pending_flow += flow_length
            return
        if data:
            conn.writelines(self._framed(data))
        self._forwarded(flow_length)

    def send_trailers(self, headers: Headers) -> None:
        """Request trailers are dropped on the HTTP/1.1 hop, as drainproxy does for HTTP/1."""

    def end_request(self) -> None:
        conn = self.upstream
        if conn is not None:
            self.sent_at = self.ctx.loop.time()
            if self.chunked:
                conn.write(LAST_CHUNK)

    def cancel(self) -> None:
        self.cancelled = True
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()

    def pause_response(self) -> None:
        self.response_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_response(self) -> None:
        self.response_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- the callbacks of UpstreamConnection --------------------------------------------------

    def start_batch(self) -> None:
        pass

    def flush(self) -> None:
        self.stream.conn.flush()

    def pause_reading_for_upstream(self) -> None:
        self.upstream_write_paused = True

    def resume_reading_for_upstream(self) -> None:
        self.upstream_write_paused = False
        flow, self.unacknowledged = self.unacknowledged, 0
        if flow:
            self.stream.data_forwarded(flow)

    def response_interim(self, status: int, reason: bytes, headers: Headers) -> bool:
        try:
            fields = interim_fields(headers)
        except FramingError as exc:
            self.upstream_failed("invalid", f"invalid response from the app: {exc}")
            return False
        self.stream.respond_informational(status, fields)
        return True

    def response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, headers: Headers
    ) -> None:
        stream = self.stream
        if status == 101:
            self.upstream_failed("invalid", "101 response to a request that asked no upgrade")
            return
        try:
            fields, length, chunked = _response_framing(headers)
        except FramingError as exc:
            self.upstream_failed("invalid", f"invalid response from the app: {exc}")
            return
        self.response_close_delimited = conn.close_delimited = length is None and not chunked
        bodyless = stream.method == b"HEAD" or status in (204, 304)
        stream.respond_head(status, fields)
        if bodyless:
            self.response_complete(conn)

    def response_body(self, body: bytes) -> None:
        self.stream.respond_data(body)

    def response_complete(self, conn: UpstreamConnection) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        stream = self.stream
        if (
            conn.keep_alive
            and stream.request_complete
            and not conn.closed
            and not self.response_close_delimited
        ):
            self.ctx.pool.release(conn)
        else:
            conn.abort()
        stream.respond_end()

    def upstream_lost(self, conn: UpstreamConnection, kind: str) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        self.stream.fail(502, kind, f"the app {kind} the connection before responding")

    def upstream_failed(self, kind: str, message: str) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        self.stream.fail(502, kind, message)

    def tunnel_data_from_upstream(self, data: bytes) -> None:
        """Never called: an HTTP/2 stream asks for no upgrade."""

    def tunnel_closed_by_upstream(self) -> None:
        """Never called: an HTTP/2 stream asks for no upgrade."""


#: Bytes a method (a token, RFC 9110 §5.6.2) may hold.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: Whitespace and controls: none may appear in a request target or a Host (RFC 9112 §3.2).
_NOT_IN_TARGET = frozenset(range(0x21)) | {0x7F}


def _check_request_line(method: bytes, path: bytes, authority: bytes) -> None:
    """HTTP/2 allows spaces in ``:path`` and ``:authority`` values (only NUL, CR and LF are
    banned, RFC 9113 §8.2.1), but an HTTP/1.1 request line is split at spaces: a space there
    would let one request's fields be read as another request line. Raises FramingError."""
    if not method or not _TOKEN.issuperset(method):
        raise FramingError("the method is not a token")
    if _NOT_IN_TARGET.intersection(path):
        raise FramingError("whitespace or a control character in :path")
    if _NOT_IN_TARGET.intersection(authority):
        raise FramingError("whitespace or a control character in :authority")


def response_fields(headers: Headers) -> Headers:
    """An HTTP/1.1 response's end-to-end fields with lowercase names, as HTTP/2 requires."""
    fields, _, _ = _response_framing(headers)
    return fields


def interim_fields(headers: Headers) -> Headers:
    """An HTTP/1.1 1xx response's fields for HTTP/2, as ``response_fields``. Raises
    FramingError as ``check_interim_head`` does: framing fields on a 1xx are a broken app's
    (RFC 9110 §8.6), answered 502 on HTTP/2 as on HTTP/1.1."""
    pieces: list[bytes] = []
    check_interim_head(forward_head(pieces, headers, request=False))
    return _h2_fields(pieces)


def _h2_fields(pieces: list[bytes]) -> Headers:
    """``forward_head``'s output pieces as lowercase HTTP/2 fields, without the
    connection-specific ones (RFC 9113 §8.2.2)."""
    return [
        (pieces[index].lower(), pieces[index + 2])
        for index in range(0, len(pieces), 4)
        if pieces[index].lower() not in _CONNECTION_SPECIFIC
    ]


def _response_framing(headers: Headers) -> tuple[Headers, bytes | None, bool]:
    """The fields for HTTP/2, the Content-Length (kept: it lets the client size the body) and
    whether the body was chunked. Raises FramingError as ``forward_head`` does."""
    pieces: list[bytes] = []
    info = forward_head(pieces, headers, request=False)
    return _h2_fields(pieces), info.content_length, info.chunked
