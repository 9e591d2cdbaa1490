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
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from drainproxy.sim.haproxy import Backend, HealthCheckedBalancer, states_reached


class _Replica:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.up = False
        self.streak = 0  # consecutive check results that disagree with ``up``


@dataclass(eq=False)
class BuiltinBalancer(HealthCheckedBalancer):
    """Same surface as ``drainproxy.sim.haproxy.HAProxy``: start, wait_for_states, stop."""

    check_timeout: float = 1.0

    def __post_init__(self) -> None:
        self._replicas = [_Replica(backend) for backend in self.backends]
        self._turn = itertools.cycle(range(len(self._replicas)))
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sides: set[_Side] = set()

    def start(self) -> None:
        self._spawn(self._listen())
        for replica in self._replicas:
            self._spawn(self._check_forever(replica))

    async def server_states(self) -> dict[str, str]:
        return self._states()

    def _states(self) -> dict[str, str]:
        return {r.backend.name: "UP" if r.up else "DOWN" for r in self._replicas}

    async def wait_for_states(self, wanted: dict[str, str], timeout: float = 20.0) -> None:
        """Until the named replicas are in the wanted states; woken by each state change."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: states_reached(self._states(), wanted))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for side in list(self._sides):
            side.abort()

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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Side(self, client=True), "127.0.0.1", self.port
        )

    def _pick(self) -> Backend | None:
        for _ in self._replicas:
            replica = self._replicas[next(self._turn)]
            if replica.up:
                return replica.backend
        return None

    async def _connect(self, client: _Side, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: _Side(self, client=False), "127.0.0.1", backend.port
            )
        except OSError:
            client.abort()  # no retry: the client sees its connection end without a response
            return
        if client.closed:
            upstream.abort()
        else:
            client.splice(upstream)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Side(asyncio.Protocol):
    """One side of a relayed connection: what it receives, its peer sends. A graceful close
    passes through as a close, a reset as a reset; a full buffer pauses the other side."""

    def __init__(self, balancer: BuiltinBalancer, client: bool) -> None:
        self.balancer = balancer
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.closed = False
        #: Client bytes that arrive before the replica's connection is up.
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.balancer._sides.add(self)
        if not self.client:
            return
        backend = self.balancer._pick()
        if backend is None:
            self.abort()
        else:
            self.balancer._spawn(self.balancer._connect(self, backend))

    def splice(self, upstream: _Side) -> None:
        self.peer, upstream.peer = upstream, self
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.balancer._sides.discard(self)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
