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

h11 is lenient where a request's framing is ambiguous, which invites request smuggling through
anything in front of this listener: ``request_framing_fault`` refuses those requests (400, and
the connection closes, as for any error after which the framing is unknown).

The driver is reached only through ``AdminControls`` (what the endpoints may ask and do) and
its ``Snapshot`` (what ``/status`` and ``/metrics`` report).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import urlsplit

import h11

from drainproxy.config.schema import AdminConfig
from drainproxy.control.memory import release_freed_memory
from drainproxy.control.metrics import render_metrics
from drainproxy.core.lifecycle import DrainSource
from drainproxy.core.snapshot import Snapshot

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


class AdminControls(Protocol):
    """What the endpoints need from the driver (``control/server.py``'s ``Server``)."""

    def snapshot(self) -> Snapshot:
        """The proxy now, for ``/status`` and ``/metrics``."""
        ...

    def readiness(self) -> str | None:
        """None when ``/ready`` answers 200; else why not (the drain phase, "app unreachable")."""
        ...

    def note_readiness_probe(self, address: str, user_agent: str, ready: bool) -> None:
        """A prober asked ``/ready`` and was told ``ready``: evidence of propagation."""
        ...

    def request_drain(self, source: DrainSource) -> bool:
        """Start a drain (True) or join the one under way (False)."""
        ...

    async def prestop_hook(self) -> None:
        """Start or join a drain; return once that drain's app stop is due (the long poll)."""
        ...


Handler = Callable[[AdminControls, Request], Awaitable[Response]]


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
    """Loopback always; elsewhere only the configured token, compared in constant time.

    hmac is imported at the first token to compare, not at start-up: it loads OpenSSL's
    digests, about 0.7 MiB of RSS (bench/RESULTS.md, "The Snapshot seam") that a pod pays only
    once a hook or an operator calls a guarded path from outside loopback."""
    if _is_loopback(remote):
        return True
    if token is None or given is None:
        return False
    import hmac

    return hmac.compare_digest(token.encode(), given.encode("latin-1"))


def _request_authorized(token: str | None, request: Request) -> bool:
    given = request.headers.get(TOKEN_HEADER.lower())
    return is_authorized(token, request.remote, given)


def _forbidden(token: str | None, request: Request) -> Response:
    token_set = token is not None
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


async def live(controls: AdminControls, request: Request) -> Response:
    return Response.text("live\n")


async def ready(controls: AdminControls, request: Request) -> Response:
    reason = controls.readiness()
    user_agent = request.headers.get("user-agent", "")
    controls.note_readiness_probe(request.remote, user_agent, reason is None)
    if reason is None:
        return Response.text("ready\n")
    return Response.text(f"not ready: {reason}\n", 503)


def render_status(snapshot: Snapshot) -> bytes:
    """``/status``'s JSON: times in seconds, to the millisecond; a deadline is null when none
    is to come (``Deadlines``), ``drain`` null while serving."""
    drain = snapshot.drain
    deadlines = snapshot.deadlines
    body = {
        "phase": snapshot.phase.value,
        "seconds_in_phase": round(snapshot.seconds_in_phase, 3),
        "ready": snapshot.ready,
        "app_reachable": snapshot.app_reachable,
        "app_check_error": snapshot.app_check_error,
        "in_flight": snapshot.in_flight,
        "open_connections": snapshot.open_connections,
        "deadlines": {
            "phase_ends_in": _seconds(deadlines.phase_ends_in),
            "drain_min_in": _seconds(deadlines.drain_min_in),
            "drain_timeout_in": _seconds(deadlines.drain_timeout_in),
        },
        "drain": None
        if drain is None
        else {
            "sources": [source.value for source in drain.sources],
            "seconds_since_start": round(drain.seconds_since_start, 3),
            "forced": drain.forced,
        },
        "requests_total": snapshot.counters.requests_total,
    }
    return json.dumps(body).encode()


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def status(controls: AdminControls, request: Request) -> Response:
    return Response(200, render_status(controls.snapshot()), JSON)


async def metrics(controls: AdminControls, request: Request) -> Response:
    first_scrape = "prometheus_client" not in sys.modules
    body, content_type = render_metrics(controls.snapshot())
    if first_scrape:
        release_freed_memory()  # what importing prometheus_client freed
    return Response(200, body, content_type)


async def drain(controls: AdminControls, request: Request) -> Response:
    started = controls.request_drain(DrainSource.ADMIN)
    return Response.text("drain started\n" if started else "drain already under way\n", 202)


async def prestop(controls: AdminControls, request: Request) -> Response:
    """The app container's preStop hook: start the drain, answer when the app may stop."""
    await controls.prestop_hook()
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
#: Paths that change state: from loopback, or with ``admin.token`` (``is_authorized``).
GUARDED_PATHS = frozenset({"/drain", "/prestop"})


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

    def __init__(self, controls: AdminControls, settings: AdminConfig) -> None:
        self.controls = controls
        self.settings = settings
        self._listener: asyncio.Server | None = None
        #: Each connection's task, and whether it is answering a request now.
        self._connections: dict[asyncio.Task[None], bool] = {}
        self._writers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._refusing = False
        self._closing = False

    async def start(self) -> None:
        listen = self.settings.listen
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
        token = self.settings.token
        if request.path in GUARDED_PATHS and not _request_authorized(token, request):
            return _forbidden(token, request)
        try:
            return await found(self.controls, request)
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
        #: The request's bytes as received, until h11 has parsed its head (a pipelined request
        #: may be in h11's buffer already): h11 hides how the framing fields were written.
        raw = bytearray(conn.trailing_data[0])
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
                if head is None:
                    raw += data
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                if _head_size(event) > MAX_HEAD_BYTES:  # h11 bounds only a head still arriving
                    raise h11.RemoteProtocolError("request head too large", 431)
                if not event.http_version.startswith(b"1."):  # h11 takes HTTP/2.0 as 1.1
                    raise h11.RemoteProtocolError("only HTTP/1.x is served here", 505)
                fault = request_framing_fault(bytes(raw), event.http_version)
                if fault is not None:
                    raise h11.RemoteProtocolError(fault, 400)
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
                    try:
                        target = urlsplit(target).path or "/"
                    except ValueError:  # an unclosed "[": urlsplit's invalid IPv6 URL
                        raise h11.RemoteProtocolError("invalid request target", 400) from None
                return Request(head.method.decode(), target.partition("?")[0], headers, remote)
            else:  # ConnectionClosed
                raise _Closed


#: The empty line that ends a head (h11 also takes a bare LF for a line's end, RFC 9112
#: section 2.2).
_HEAD_END = re.compile(rb"\n\r?\n")


def request_framing_fault(received: bytes, http_version: bytes) -> str | None:
    """Why the framing of a request head that h11 accepted is ambiguous, or None if it is not.

    ``received`` is the request as received, from its request line on (what follows the head
    is ignored); ``http_version`` is the version h11 parsed (``b"1.1"``). h11 resolves
    each of these faults its own way, and anything in front of this listener that resolved it
    differently would read another request than this one (request smuggling):

    * both Content-Length and Transfer-Encoding: "ought to be handled as an error" (RFC 9112
      section 6.3; h11 takes Transfer-Encoding);
    * Content-Length more than once, or as a list, even of one repeated value (RFC 9110
      section 8.6 lets a recipient reject it; h11 takes the value);
    * Transfer-Encoding in an HTTP/1.0 request: its framing is faulty (RFC 9112 section 6.1);
    * obsolete line folding, a field line that starts with whitespace: a server rejects it
      with 400 or unfolds it (RFC 9112 section 5.2; h11 unfolds).

    The caller answers 400 and closes the connection, as RFC 9112 section 6.3 requires."""
    end = _HEAD_END.search(received)
    head = received[: end.end() if end else len(received)]
    content_lengths = 0
    transfer_encoding = False
    for line in head.split(b"\n")[1:]:
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding is not accepted"
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            content_lengths += 1 + value.count(b",")
        elif name == b"transfer-encoding":
            transfer_encoding = True
    if content_lengths and transfer_encoding:
        return "both Content-Length and Transfer-Encoding"
    if content_lengths > 1:
        return "several Content-Length values"
    if transfer_encoding and http_version == b"1.0":
        return "Transfer-Encoding in an HTTP/1.0 request"
    return None


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
    # The reason phrase, as the admin API wrote it on aiohttp (h11 leaves it empty): a human
    # reading a probe's output, or a log line quoting it, sees what the status means.
    reason = HTTPStatus(answer.status).phrase.encode()
    data = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))
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


async def start_admin(
    controls: AdminControls, settings: AdminConfig
) -> Callable[[], Awaitable[None]]:
    """Listen on ``settings.listen``; returns the coroutine function that stops the admin API."""
    admin = AdminServer(controls, settings)
    await admin.start()
    return admin.close
