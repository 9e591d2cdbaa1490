"""One HTTP/1.1 request to the app for its status: the app check and the ``http`` app stop.

Both need only the status of the response head (the check: below 500 is reachable; the stop:
2xx is accepted), so there is no pool and no body: one connection per call, ``Connection:
close``, h11 to write the request and to parse (and bound) the response head.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from urllib.parse import urlsplit

import h11

#: Methods whose requests carry ``Content-Length: 0`` (some servers answer 411 without it).
_WITH_LENGTH = frozenset({"POST", "PUT", "PATCH"})


class HttpCallError(Exception):
    """No valid response head: ``str()`` is a short reason for a log line ("timed out",
    "Connection refused", "invalid response: ..."); ``timed_out`` says it was the deadline."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


async def request_status(
    host: str,
    port: int,
    method: str,
    target: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    user_agent: str = "drainproxy",
) -> int:
    """Send ``method target`` with no body and return the response's status (informational
    responses skipped). Connect, send and receive together get ``timeout`` seconds.

    Raises HttpCallError."""
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(host, port, method, target, tls, server_hostname, user_agent)
    except TimeoutError:
        raise HttpCallError("timed out", timed_out=True) from None
    except h11.ProtocolError as exc:
        raise HttpCallError(f"invalid response: {exc}") from None
    except ssl.SSLError as exc:
        raise HttpCallError(f"TLS: {exc}") from None
    except OSError as exc:  # asyncio's own text ("Connect call failed") does not say why
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        raise HttpCallError(reason) from None


async def request_url_status(method: str, url: str, timeout: float) -> int:
    """``request_status`` for an ``http://`` or ``https://`` URL (https verified against the
    system's CAs)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return await request_status(
        parts.hostname or "",
        parts.port or (443 if https else 80),
        method,
        target,
        timeout,
        tls=ssl.create_default_context() if https else None,
    )


async def _exchange(
    host: str,
    port: int,
    method: str,
    target: str,
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
    user_agent: str,
) -> int:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None
    )
    try:
        conn = h11.Connection(h11.CLIENT)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = [("Host", authority), ("User-Agent", user_agent), ("Connection", "close")]
        if method in _WITH_LENGTH:
            headers.append(("Content-Length", "0"))
        writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                return int(event.status_code)
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpCallError("connection closed before a response")
    finally:
        writer.close()
