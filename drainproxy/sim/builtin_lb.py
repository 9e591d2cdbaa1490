"""A small load balancer for machines without HAProxy: round-robin at the TCP level, with HTTP
health checks, in the caller's event loop.

It behaves like kube-proxy or a cloud L4 balancer, which is what makes it a fair stand-in:

* Each replica is checked with ``GET check_path`` every ``check_interval``; ``fall`` failures in
  a row mark it DOWN, ``rise`` successes UP (replicas start DOWN).
* A new client connection goes to the next replica that is UP. An established connection stays
  pinned to its replica until one side closes it: a keep-alive client keeps talking to a replica
  the balancer already marked DOWN, which is why drainproxy answers ``Connection: close``.
* Nothing is retried or redispatched: a replica that refuses or resets a connection fails the
  client's request, so every failure a rollout causes reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Coroutine
from typing import Any

from drainproxy.sim.haproxy import Backend

_CHUNK = 65536


class _Replica:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.up = False
        self.streak = 0  # consecutive check results that disagree with ``up``


class BuiltinBalancer:
    """Same surface as ``drainproxy.sim.haproxy.HAProxy``: start, wait_for_states, stop."""

    def __init__(
        self,
        port: int,
        backends: list[Backend],
        check_interval: float = 0.2,
        fall: int = 2,
        rise: int = 2,
        check_timeout: float = 1.0,
    ) -> None:
        self.port = port
        self.check_interval = check_interval
        self.fall = fall
        self.rise = rise
        self.check_timeout = check_timeout
        self._replicas = [_Replica(backend) for backend in backends]
        self._turn = itertools.cycle(range(len(self._replicas)))
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._spawn(self._listen())
        for replica in self._replicas:
            self._spawn(self._check_forever(replica))

    async def server_states(self) -> dict[str, str]:
        return {r.backend.name: "UP" if r.up else "DOWN" for r in self._replicas}

    async def wait_for_states(self, wanted: dict[str, str], timeout: float = 20.0) -> None:
        """Until the named replicas are in the wanted states; woken by each state change."""

        def reached() -> bool:
            states = {r.backend.name: "UP" if r.up else "DOWN" for r in self._replicas}
            return all(states.get(name, "").startswith(s) for name, s in wanted.items())

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(reached)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    # --- health checks --------------------------------------------------------------------

    async def _check_forever(self, replica: _Replica) -> None:
        while True:
            healthy = await self._check(replica.backend)
            replica.streak = 0 if healthy == replica.up else replica.streak + 1
            if replica.streak >= (self.rise if healthy else self.fall):
                replica.up = healthy
                replica.streak = 0
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(self.check_interval)

    async def _check(self, backend: Backend) -> bool:
        request = (
            f"GET {backend.check_path} HTTP/1.1\r\nHost: 127.0.0.1:{backend.check_port}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.check_timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", backend.check_port)
                writer.write(request)
                status_line = await reader.readline()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.transport.abort()
        parts = status_line.split()
        return len(parts) >= 2 and parts[1] == b"200"

    # --- traffic ------------------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    def _pick(self) -> Backend | None:
        for _ in self._replicas:
            replica = self._replicas[next(self._turn)]
            if replica.up:
                return replica.backend
        return None

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self._writers.add(client)
        backend = self._pick()
        try:
            if backend is None:
                return
            try:
                upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", backend.port)
            except OSError:
                return  # no retry: the client sees its connection end without a response
            self._writers.add(upstream)
            try:
                await _splice(client_reader, upstream, upstream_reader, client)
            finally:
                self._writers.discard(upstream)
                upstream.transport.abort()
        finally:
            self._writers.discard(client)
            client.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _splice(
    client_reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side ends; a reset on one side resets the other."""
    reset = False

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal reset
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except OSError:
            reset = True

    tasks = [
        asyncio.ensure_future(copy(client_reader, upstream)),
        asyncio.ensure_future(copy(upstream_reader, client)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if reset:
        client.transport.abort()
