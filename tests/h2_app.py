"""An h2c app (HTTP/2 with prior knowledge, no TLS) on the ``h2`` library, for the tests of
``upstream.protocol: h2c`` with plain HTTP clients. Every request is recorded; the answer depends
on the path:

- ``/big?N``: N bytes without content-length, sent as the client's window allows;
- ``/reset``: RST_STREAM (INTERNAL_ERROR) instead of an answer;
- ``/trailers``: a body, then trailers;
- ``/wait``: answered once ``release`` is set (streams held open, to fill the app's limit);
- ``/goaway``: a graceful GOAWAY naming this stream as the last, then the answer (as nginx does
  at its ``keepalive_requests``);
- anything else: ``200`` with the path as the body and the request's body size in a field.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import GoAwayFrame

Headers = list[tuple[bytes, bytes]]


@dataclass
class H2Request:
    headers: Headers
    body: bytearray = field(default_factory=bytearray)

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


class H2App:
    def __init__(
        self,
        max_concurrent_streams: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.ssl_context = ssl_context
        self.release = asyncio.Event()
        #: Streams open at once, at most (over every connection).
        self.open_streams = 0
        self.most_open_streams = 0
        self.requests: list[H2Request] = []
        self.changed = asyncio.Condition()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        if self.max_concurrent_streams is not None:
            conn.update_settings(
                {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams}
            )
        writer.write(conn.data_to_send())
        requests: dict[int, H2Request] = {}
        sending: dict[int, int] = {}  # stream -> bytes still to send (/big)
        window_opened = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def send_big(stream_id: int) -> None:
            while sending.get(stream_id, 0) > 0:
                window = conn.local_flow_control_window(stream_id)
                window = min(window, conn.max_outbound_frame_size)
                if window <= 0:
                    window_opened.clear()
                    await window_opened.wait()
                    continue
                size = min(window, sending[stream_id])
                sending[stream_id] -= size
                conn.send_data(stream_id, b"b" * size, end_stream=sending[stream_id] == 0)
                writer.write(conn.data_to_send())
                await writer.drain()

        async def answer_when_released(stream_id: int, request: H2Request) -> None:
            await self.release.wait()
            self.open_streams -= 1
            conn.send_headers(stream_id, [(b":status", b"200")])
            conn.send_data(stream_id, b"waited", end_stream=True)
            writer.write(conn.data_to_send())

        def answer(stream_id: int, request: H2Request) -> None:
            path = request.header(b":path") or b""
            if path == b"/wait":
                self.open_streams += 1
                self.most_open_streams = max(self.most_open_streams, self.open_streams)
                task = asyncio.ensure_future(answer_when_released(stream_id, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif path.startswith(b"/big?"):
                sending[stream_id] = int(path.partition(b"?")[2])
                conn.send_headers(stream_id, [(b":status", b"200")])
                task = asyncio.ensure_future(send_big(stream_id))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif path == b"/reset":
                conn.reset_stream(stream_id, 2)
            elif path == b"/goaway":
                writer.write(conn.data_to_send())
                # Written here: h2 would refuse to send anything after its own GOAWAY.
                writer.write(GoAwayFrame(0, last_stream_id=stream_id).serialize())
                conn.send_headers(stream_id, [(b":status", b"200")])
                for last in range(5):
                    conn.send_data(stream_id, b"x" * 10_000, end_stream=last == 4)
            elif path == b"/trailers":
                conn.send_headers(stream_id, [(b":status", b"200")])
                conn.send_data(stream_id, b"with trailers")
                conn.send_headers(stream_id, [(b"x-checksum", b"abc")], end_stream=True)
            else:
                body = path
                fields = [
                    (b":status", b"200"),
                    (b"content-length", b"%d" % len(body)),
                    (b"x-body-size", b"%d" % len(request.body)),
                ]
                conn.send_headers(stream_id, fields)
                conn.send_data(stream_id, body, end_stream=True)

        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        request = H2Request(list(event.headers))
                        requests[event.stream_id] = request
                        self.requests.append(request)
                    elif isinstance(event, h2.events.DataReceived):
                        requests[event.stream_id].body += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        answer(event.stream_id, requests[event.stream_id])
                    elif isinstance(event, h2.events.WindowUpdated):
                        window_opened.set()
                    elif isinstance(event, h2.events.StreamReset):
                        sending.pop(event.stream_id, None)
                        window_opened.set()
                writer.write(conn.data_to_send())
                async with self.changed:
                    self.changed.notify_all()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
