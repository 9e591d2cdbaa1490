"""An HTTP/2 client for tests, on the ``h2`` library and asyncio streams, that records every
event so tests can wait on frames (GOAWAY, RST_STREAM, PING) as well as on whole responses."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int


@dataclass
class StreamResult:
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers = field(default_factory=list)
    ended: bool = False
    reset_code: int | None = None

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)

    def trailer(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.trailers if key == name), None)


class H2TestClient:
    """One HTTP/2 connection. ``auto_ack`` returns flow-control window as data arrives; off, the
    test decides (``ack``), to exercise back-pressure."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: dict[int, int] | None = None,
        auto_ack: bool = True,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.auto_ack = auto_ack
        self.h2 = h2.connection.H2Connection(
            # Unchecked on the way out: tests send what a hostile client would.
            h2.config.H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False
            )
        )
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.events: list[h2.events.Event] = []
        #: GOAWAY frames, read here rather than by h2: h2 closes its state machine on the first
        #: one, so it would refuse the PING and the DATA of the graceful two-step shutdown.
        self.goaway_frames: list[GoAway] = []
        self._frames = bytearray()
        self.streams: dict[int, StreamResult] = {}
        self.closed = False
        self.changed = asyncio.Condition()
        self.flush()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        settings: dict[int, int] | None = None,
        auto_ack: bool = True,
    ) -> H2TestClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        return cls(reader, writer, settings, auto_ack)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(
        self,
        path: bytes,
        method: bytes = b"GET",
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        end: bool = True,
        authority: bytes = b"example.test",
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.streams[stream_id] = StreamResult()
        fields = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path),
            *headers,
        ]
        self.h2.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            self.send(stream_id, body, end=end)
        self.flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Send as much as the windows allow now; the rest is the caller's to send later."""
        self.h2.send_data(stream_id, data, end_stream=end)
        self.flush()

    async def send_all(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """Send ``data`` as the peer's windows open (the proxy's back-pressure on uploads)."""
        view = memoryview(data)
        while view:
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                await self.wait_for(
                    lambda: self.closed or self.h2.local_flow_control_window(stream_id) > 0
                )
                if self.closed:
                    raise ConnectionError("closed while uploading")
                continue
            piece, view = view[:window], view[window:]
            self.h2.send_data(stream_id, bytes(piece), end_stream=end and not view)
            self.flush()
            await self.writer.drain()
        if end and not data:
            self.h2.end_stream(stream_id)
            self.flush()

    def reset(self, stream_id: int, code: int = 8) -> None:
        self.h2.reset_stream(stream_id, code)
        self.flush()

    def ack(self, stream_id: int, size: int) -> None:
        self.h2.acknowledge_received_data(size, stream_id)
        self.flush()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    async def response(self, stream_id: int, timeout: float = 10.0) -> StreamResult:
        result = self.streams[stream_id]
        await self.wait_for(
            lambda: result.ended or result.reset_code is not None or self.closed, timeout
        )
        return result

    def goaways(self) -> list[GoAway]:
        return self.goaway_frames

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for event in self._receive(data):
                    self._apply(event)
                self.flush()
                async with self.changed:
                    self.changed.notify_all()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed = True
            async with self.changed:
                self.changed.notify_all()

    def _receive(self, data: bytes) -> list[h2.events.Event]:
        """Feed h2 whole frames, keeping GOAWAY frames out of it."""
        frames = self._frames
        frames += data
        events: list[h2.events.Event] = []
        while len(frames) >= 9:
            length = int.from_bytes(frames[:3], "big")
            if len(frames) < 9 + length:
                break
            frame = bytes(frames[: 9 + length])
            del frames[: 9 + length]
            if frame[3] == _GOAWAY:
                last = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
                self.goaway_frames.append(GoAway(last, int.from_bytes(frame[13:17], "big")))
            else:
                events += self.h2.receive_data(frame)
        return events

    def _apply(self, event: h2.events.Event) -> None:
        self.events.append(event)
        stream_id = getattr(event, "stream_id", None)
        result = self.streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived) and result is not None:
            for name, value in event.headers:
                if name == b":status":
                    result.status = int(value)
                else:
                    result.headers.append((name, value))
        elif isinstance(event, h2.events.DataReceived) and result is not None:
            result.body += event.data
            if self.auto_ack and event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and result is not None:
            result.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and result is not None:
            result.ended = True
        elif isinstance(event, h2.events.StreamReset) and result is not None:
            result.reset_code = int(event.error_code)


INITIAL_WINDOW_SIZE = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
_GOAWAY = 0x7
