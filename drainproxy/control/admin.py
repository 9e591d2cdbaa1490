"""The admin listener (h11 over asyncio streams): probes, status, metrics and the drain triggers.

``/ready``, ``/live``, ``/status`` and ``/metrics`` are open to probes. ``POST /drain`` and
``GET /prestop`` change state, so they are accepted from loopback, or from elsewhere only with
``admin.token`` in ``X-Drainproxy-Token`` (kubelet httpGet hooks come to the pod IP, not loopback).

h11 (sans-IO, pure Python, about 0.3 MiB in this process; chosen over the data path's
httptools in bench/RESULTS.md, "Serve memory") does the HTTP/1.1 framing: keep-alive, pipelining,
HTTP/1.0, ``Expect: 100-continue``, a bound on a head still arriving. This module adds what a
small API exposed to the pod network needs: bounds on a request's size and on the time it takes
to arrive, a bound on open connections, 404 and 405 with ``Allow``, error answers that survive
the close, and a shutdown that lets answers already decided (the released ``/prestop`` calls)
reach their clients. Bounds and answers: docs/hardening.md, "The admin listener".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11

from drainproxy.control.memory import release_freed_memory
from drainproxy.control.metrics import render_metrics
from drainproxy.core.lifecycle import DrainSource

if TYPE_CHECKING:
    from drainproxy.control.server import Server

log = logging.getLogger("drainproxy.admin")

TOKEN_HEADER = "X-Drainproxy-Token"
#: Request line plus header fields (larger: 431). Probes and hooks send a few hundred bytes.
MAX_HEAD_BYTES = 8 * 1024
#: A request body (none of the endpoints reads one; larger: 413 and the connection closes).
MAX_BODY_BYTES = 64 * 1024
#: From a request's first byte to its end (slower: 408 and close; slowloris).
REQUEST_TIMEOUT = 10.0
#: A keep-alive connection with no request for this long is closed (aiohttp's former default).
IDLE_TIMEOUT = 75.0
#: Open admin connections; beyond it the oldest idle one is closed for the newcomer (a flood of
#: silent connections must not lock the kubelet's probes out), or the newcomer if all are busy.
MAX_CONNECTIONS = 256
#: After an error answer, what the client still sends is read and dropped for at most this long.
LINGER_SECONDS = 2.0
#: At shutdown, answers being written (released /prestop calls) get this long to finish.
SHUTDOWN_GRACE = 1.0

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated field keeps its last value
    remote: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    allow: str | None = None

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())


Handler = Callable[["Server", Request], Awaitable[Response]]


class _Closed(Exception):
    """The client closed the connection, or the connection must close now."""


def _is_loopback(remote: str) -> bool:
    try:
        address = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def is_authorized(token: str | None, remote: str, given: str | None) -> bool:
    """Loopback always; elsewhere only the configured token, compared in constant time."""
    if _is_loopback(remote):
        return True
    return (
        token is not None
        and given is not None
        and hmac.compare_digest(token.encode(), given.encode("latin-1"))
    )


def _request_authorized(server: Server, request: Request) -> bool:
    given = request.headers.get(TOKEN_HEADER.lower())
    return is_authorized(server.config.admin.token, request.remote, given)


def _forbidden(server: Server, request: Request) -> Response:
    token_set = server.config.admin.token is not None
    why = "missing or wrong " + TOKEN_HEADER if token_set else "admin.token is not set"
    log.warning(
        "403 for %s %s from %s: %s; nothing changed",
        request.method,
        request.path,
        request.remote,
        why,
        extra={"event": "admin_forbidden"},
    )
    return Response.text(f"forbidden: {why}\n", 403)


# --- endpoints -------------------------------------------------------------------------------


async def live(server: Server, request: Request) -> Response:
    return Response.text("live\n")


async def ready(server: Server, request: Request) -> Response:
    is_ready = server.is_ready()
    server.note_readiness_probe(request.remote, request.headers.get("user-agent", ""), is_ready)
    if is_ready:
        return Response.text("ready\n")
    reason = server.lifecycle.phase.value if not server.lifecycle.is_ready() else "app unreachable"
    return Response.text(f"not ready: {reason}\n", 503)


async def status(server: Server, request: Request) -> Response:
    lifecycle = server.lifecycle
    now = server.loop.time()

    def until(deadline: float | None) -> float | None:
        return None if deadline is None else round(max(0.0, deadline - now), 3)

    drain = lifecycle.drain
    body = {
        "phase": lifecycle.phase.value,
        "seconds_in_phase": round(lifecycle.seconds_in_phase(), 3),
        "ready": server.is_ready(),
        "app_reachable": server.probe.reachable,
        "app_check_error": server.probe.last_error or None,
        "in_flight": server.in_flight(),
        "open_connections": len(server.proxy.connections),
        "deadlines": {
            "phase_ends_in": until(lifecycle.deadline),
            "drain_min_in": until(lifecycle.min_deadline) if drain else None,
            "drain_timeout_in": until(lifecycle.timeout_deadline) if drain else None,
        },
        "drain": None
        if drain is None
        else {
            "sources": sorted(source.value for source in drain.sources),
            "seconds_since_start": round(now - drain.started_at, 3),
            "forced": drain.forced,
        },
        "requests_total": server.stats.requests_total,
    }
    return Response(200, json.dumps(body).encode(), JSON)


async def metrics(server: Server, request: Request) -> Response:
    first_scrape = "prometheus_client" not in sys.modules
    body, content_type = render_metrics(server)
    if first_scrape:
        release_freed_memory()  # what importing prometheus_client freed
    return Response(200, body, content_type)


async def drain(server: Server, request: Request) -> Response:
    if not _request_authorized(server, request):
        return _forbidden(server, request)
    started = server.request_drain(DrainSource.ADMIN)
    return Response.text("drain started\n" if started else "drain already under way\n", 202)


async def prestop(server: Server, request: Request) -> Response:
    """The app container's preStop hook: start the drain, answer when the app may stop."""
    if not _request_authorized(server, request):
        return _forbidden(server, request)
    await server.prestop_hook()
    return Response.text("app released\n")


#: path -> method -> handler; every GET answers HEAD too (RFC 9110 section 9.3.2).
ROUTES: dict[str, dict[str, Handler]] = {
    "/live": {"GET": live},
    "/ready": {"GET": ready},
    "/status": {"GET": status},
    "/metrics": {"GET": metrics},
    "/drain": {"POST": drain},
    "/prestop": {"GET": prestop},
}


def route(method: str, path: str) -> Handler | Response:
    """The handler for ``method path``, or the 404/405 answer (405 names the allowed methods)."""
    methods = ROUTES.get(path)
    if methods is None:
        return Response.text("404: Not Found\n", 404)
    handler = methods.get("GET" if method == "HEAD" else method)
    if handler is None:
        allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
        return Response(405, b"405: Method Not Allowed\n", TEXT, allow=", ".join(allowed))
    return handler


# --- connections -----------------------------------------------------------------------------


class AdminServer:
    """The listener and its connections; ``close`` stops both (see ``SHUTDOWN_GRACE``)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._listener: asyncio.Server | None = None
        #: Each connection's task, and whether it is answering a request now.
        self._connections: dict[asyncio.Task[None], bool] = {}
        self._writers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._refusing = False
        self._closing = False

    async def start(self) -> None:
        listen = self.server.config.admin.listen
        self._listener = await asyncio.start_server(
            self._accept, listen.host, listen.port, reuse_address=True
        )

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=SHUTDOWN_GRACE)
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS and not self._close_oldest_idle():
            if not self._refusing:  # once per episode, not once per connection
                log.warning(
                    "admin: %d connections open; closing new ones until some end",
                    MAX_CONNECTIONS,
                    extra={"event": "admin_connections_full"},
                )
            self._refusing = True
            writer.close()
            return
        self._refusing = False
        self._connections[task] = False
        self._writers[task] = writer
        try:
            await self._serve(task, reader, writer)
        except (_Closed, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # ``close`` ends connections by cancelling them: such a task must end normally, or
            # Python 3.11's asyncio stream callback (task.exception() on a cancelled task)
            # logs a traceback at every shutdown with a keep-alive admin connection open.
            if not self._closing:
                raise
        finally:
            self._connections.pop(task, None)  # already gone if closed for a newcomer
            del self._writers[task]
            writer.close()

    def _close_oldest_idle(self) -> bool:
        """Close the longest-open connection that is not answering a request; False if none."""
        for task, busy in self._connections.items():
            if not busy:
                self._writers[task].close()  # its read ends, and the task with it
                del self._connections[task]
                return True
        return False

    async def _serve(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) else "-"
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        first = True
        while True:
            try:
                request = await self._read_request(conn, reader, writer, remote, first)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await _send(
                        conn,
                        reader,
                        writer,
                        "GET",
                        Response.text(f"{status}: {exc}\n", status),
                        close=True,
                    )
                return
            except TimeoutError:
                started = conn.their_state is not h11.IDLE or bool(conn.trailing_data[0])
                if started and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(
                        conn,
                        reader,
                        writer,
                        "GET",
                        Response.text("408: Request Timeout\n", 408),
                        close=True,
                    )
                return  # a silent idle connection just closes
            self._connections[task] = True
            await _send(conn, reader, writer, request.method, await self._answer(request))
            self._connections[task] = False
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close from either side, or HTTP/1.0
            conn.start_next_cycle()
            first = False

    async def _answer(self, request: Request) -> Response:
        found = route(request.method, request.path)
        if isinstance(found, Response):
            return found
        try:
            return await found(self.server, request)
        except Exception:
            log.exception("admin: %s %s failed", request.method, request.path)
            return Response.text("500: Internal Server Error\n", 500)

    async def _read_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        remote: str,
        first: bool,
    ) -> Request:
        """The next request, its body read and dropped. On a new connection the whole request
        gets ``REQUEST_TIMEOUT`` from the connect (probes and hooks send at once; a silent
        connection is not kept); on a kept-alive one the first byte may take ``IDLE_TIMEOUT``,
        the rest ``REQUEST_TIMEOUT``."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        head: h11.Request | None = None
        body_bytes = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                if deadline is None and first:
                    deadline = loop.time() + REQUEST_TIMEOUT
                wait = IDLE_TIMEOUT if deadline is None else deadline - loop.time()
                async with asyncio.timeout(max(0.0, wait)):
                    data = await reader.read(65536)
                if deadline is None and data:
                    deadline = loop.time() + REQUEST_TIMEOUT
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                if _head_size(event) > MAX_HEAD_BYTES:  # h11 bounds only a head still arriving
                    raise h11.RemoteProtocolError("request head too large", 431)
                head = event
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
                if body_bytes > MAX_BODY_BYTES:
                    too_large = Response.text("413: Content Too Large\n", 413)
                    await _send(conn, reader, writer, "POST", too_large, close=True)
                    raise _Closed
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {
                    name.decode().lower(): value.decode("latin-1") for name, value in head.headers
                }
                target = head.target.decode("latin-1")
                if not target.startswith("/"):  # absolute-form (RFC 9112 section 3.2.2)
                    target = urlsplit(target).path or "/"
                return Request(head.method.decode(), target.partition("?")[0], headers, remote)
            else:  # ConnectionClosed
                raise _Closed


def _head_size(head: h11.Request) -> int:
    """The head's size on the wire, give or take the spaces around header values."""
    fields = sum(len(name) + len(value) + 4 for name, value in head.headers.raw_items())
    return len(head.method) + len(head.target) + 13 + fields


async def _send(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    answer: Response,
    close: bool = False,
) -> None:
    """Write one response; ``close`` for errors after which the request's framing is unknown:
    then stop writing and read what the client still sends (bounded), so that closing with
    unread data does not reset the connection before the client has read the answer
    (RFC 9112 section 9.6)."""
    headers = [
        ("Content-Type", answer.content_type),
        ("Content-Length", str(len(answer.body))),
        ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
        ("Cache-Control", "no-store"),
    ]
    if answer.allow is not None:
        headers.append(("Allow", answer.allow))
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=answer.status, headers=headers))
    if method != "HEAD":
        data += conn.send(h11.Data(data=answer.body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    async with asyncio.timeout(REQUEST_TIMEOUT):  # a client that does not read
        await writer.drain()
    if close and writer.can_write_eof():
        writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await reader.read(65536):
                    pass


async def start_admin(server: Server) -> Callable[[], Awaitable[None]]:
    """Listen on ``admin.listen``; returns the coroutine function that stops the admin API."""
    admin = AdminServer(server)
    await admin.start()
    return admin.close
