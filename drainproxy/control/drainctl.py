"""``drainproxy drain``: start the drain of a running drainproxy from inside its pod.

Made for exec preStop hooks, above all a native sidecar's own hook, which must start the drain
at pod deletion (its SIGTERM comes only after the app has exited). ``POST /drain`` marks the
drain as an admin drain, so drainproxy stays drained until its SIGTERM instead of recovering
as it does after a ``/prestop``-only drain (a liveness restart of the app).
"""

from __future__ import annotations

import socket

import h11

from drainproxy.config.schema import Config
from drainproxy.errors import DrainproxyError

#: The admin API's token header (``admin.TOKEN_HEADER``; not imported from there, so
#: ``drainproxy drain`` loads neither asyncio nor the server).
TOKEN_HEADER = "X-Drainproxy-Token"
#: Seconds to wait for drainproxy to accept the drain request.
REQUEST_TIMEOUT = 10.0
#: The longest answer read (the admin API answers a line).
MAX_ANSWER_BYTES = 64 * 1024


class DrainRequestError(DrainproxyError):
    """The running drainproxy could not be reached, or refused the request."""


def _admin_host(config: Config) -> str:
    """The admin listener as seen from inside the pod: wildcard binds are reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        config.admin.listen.host, config.admin.listen.host
    )


def admin_url(config: Config, path: str) -> str:
    host = _admin_host(config)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{config.admin.listen.port}{path}"


def _call(config: Config, method: str, path: str, timeout: float) -> str:
    """One request on a blocking socket (h11 for the framing; no asyncio, no urllib and its
    ssl and email modules: this runs in every exec preStop hook). ``timeout`` bounds each
    socket operation, as urllib's did."""
    url = admin_url(config, path)
    host, port = _admin_host(config), config.admin.listen.port
    headers = [(b"Host", url.split("/")[2].encode()), (b"User-Agent", b"drainproxy-drain")]
    headers.append((b"Connection", b"close"))
    if method == "POST":
        headers.append((b"Content-Length", b"0"))
    if config.admin.token is not None:  # UTF-8, as the admin compares it
        headers.append((TOKEN_HEADER.encode(), config.admin.token.encode()))
    conn = h11.Connection(h11.CLIENT)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(
                conn.send(h11.Request(method=method, target=path, headers=headers))
                + conn.send(h11.EndOfMessage())
            )
            status, body = _read_answer(conn, sock)
    except (OSError, h11.ProtocolError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DrainRequestError(f"{method} {url} failed: {reason or type(exc).__name__}") from None
    if not 200 <= status < 300:
        raise DrainRequestError(f"{method} {url} answered {status}: {body}")
    return body


def _read_answer(conn: h11.Connection, sock: socket.socket) -> tuple[int, str]:
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_ANSWER_BYTES:
                raise h11.RemoteProtocolError("answer too long")
        elif isinstance(event, h11.EndOfMessage):
            return status, body.decode(errors="replace").strip()
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before an answer")


def request_drain(config: Config, wait: bool) -> str:
    """Start the drain; with ``wait``, return only once it is over and the app is released."""
    outcome = _call(config, "POST", "/drain", REQUEST_TIMEOUT)
    if wait:
        outcome = _call(config, "GET", "/prestop", config.termination_grace_period)
    return outcome
