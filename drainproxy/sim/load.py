"""A steady HTTP/1.1 load that never retries, recording the outcome of every request.

Browsers and most HTTP libraries quietly retry a request whose keep-alive connection died; that
would hide exactly the failures a rollout causes. This client sends each request once, on
keep-alive connections like a real client pool, and counts any error as a failure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class Outcome:
    started: float
    finished: float
    path: str
    status: int | None
    error: str | None
    body: bytes = b""

    @property
    def failed(self) -> bool:
        return self.error is not None or self.status is None or self.status >= 500


class _Response:
    """Collects one response from an llhttp parser."""

    def __init__(self) -> None:
        self.status = 0
        self.body = bytearray()
        self.done = False
        self.keep_alive = True
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


@dataclass
class LoadClient:
    host: str
    port: int
    rate: float = 200.0
    connections: int = 8
    slow_share: float = 0.0
    slow_seconds: float = 1.5
    timeout: float = 20.0
    seed: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight_slow: int = 0
    on_outcome: Callable[[Outcome], None] | None = None

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self._random = random.Random(self.seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._slow_changed = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(i)) for i in range(self.connections)]

    async def stop(self) -> list[Outcome]:
        """Stop sending; requests already sent complete (or fail) and are recorded."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.failed]

    async def wait_slow_in_flight(self, count: int) -> None:
        """Until at least ``count`` slow requests are outstanding at once."""
        while self.in_flight_slow < count:
            self._slow_changed.clear()
            await self._slow_changed.wait()

    def _next_path(self) -> str:
        if self._random.random() < self.slow_share:
            return f"/slow?seconds={self.slow_seconds}"
        return "/"

    async def _worker(self, index: int) -> None:
        interval = self.connections / self.rate
        next_send = time.monotonic() + interval * index / self.connections
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not self._stop.is_set():
            delay = next_send - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            next_send = max(next_send + interval, time.monotonic())
            path = self._next_path()
            slow = path != "/"
            self.in_flight_slow += slow
            self._slow_changed.set()
            started = time.monotonic()
            status: int | None = None
            error: str | None = None
            body = b""
            keep = False
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout
                    )
                assert reader is not None and writer is not None
                status, body, keep = await asyncio.wait_for(
                    self._exchange(reader, writer, path), self.timeout
                )
            except (OSError, TimeoutError, EOFError, httptools.HttpParserError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                self.in_flight_slow -= slow
                self._slow_changed.set()
            outcome = Outcome(started, time.monotonic(), path, status, error, body)
            self.outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            if not keep and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> tuple[int, bytes, bool]:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "User-Agent: drainproxy-load\r\n\r\n".encode()
        )
        response = _Response()
        while not response.done:
            data = await reader.read(65536)
            if not data:
                raise EOFError("connection closed before the response was complete")
            response.parser.feed_data(data)
        return response.status, bytes(response.body), response.keep_alive
