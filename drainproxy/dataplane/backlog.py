"""Closing a listening socket without resetting a connection the kernel completed for it.

The kernel completes TCP handshakes on its own and queues the connections until the program
accepts them; their clients may already have sent a request. Closing the listener resets every
connection still queued, and a balancer does not retry a POST that was sent and then reset
(issue 12: 1-29 resets per drain with 32 clients opening a connection per POST). Go's
``Server.Shutdown`` and a plain ``asyncio.Server.close()`` have that race. So the drain closes a
listener in three steps, after which every client was either served or refused before its
handshake completed (a connection refused is safe to retry anywhere):

1. **Complete no new handshake**: a classic BPF socket filter (``SO_ATTACH_FILTER``, no privilege
   needed) drops segments that carry SYN without ACK. A new client's SYN goes unanswered; it
   retransmits (after 1 s) and, the listener gone by then, gets a reset: ``ECONNREFUSED``.
2. **Let the handshakes under way finish**: a SYN already answered completes with the client's
   ACK, which the filter lets through; such half-open connections are listed as ``SYN_RECV`` in
   ``/proc/net/tcp``. Wait until none is left, at most ``HANDSHAKE_WAIT_LIMIT``.
3. **Accept the whole queue, then close**, in one step of the event loop; the connections
   accepted are served like any other (their responses say ``Connection: close``).

Where the filter cannot be attached (not Linux), step 1 is skipped and the window left is the
one between the last accept and the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
import sys
from collections.abc import Iterable

#: Linux ``SO_ATTACH_FILTER`` (asm-generic/socket.h); the socket module does not name it.
SO_ATTACH_FILTER = 26
#: ``ldb [13]`` (the TCP flags), ``and #0x12`` (SYN|ACK), ``jeq #0x02`` -> drop, else keep it
#: whole. Socket filters see the segment from its TCP header on.
_DROP_SYN = (
    (0x30, 0, 0, 13),
    (0x54, 0, 0, 0x12),
    (0x15, 0, 1, 0x02),
    (0x06, 0, 0, 0),
    (0x06, 0, 0, 0xFFFFFFFF),
)
#: A handshake under way completes within a round trip; a lost segment would take a 1 s
#: retransmission, which the drain does not wait for.
HANDSHAKE_WAIT_LIMIT = 1.0
_SYN_RECV = "03"


def listening_sockets(server: asyncio.AbstractServer) -> list[socket.socket]:
    """Our own handles (duplicated descriptors) on a server's listening sockets: asyncio and
    uvloop expose only wrappers, which cannot attach a filter or accept."""
    handles = []
    for wrapped in getattr(server, "sockets", None) or ():
        handle = socket.socket(fileno=os.dup(wrapped.fileno()))
        handle.setblocking(False)
        handles.append(handle)
    return handles


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Attach the SYN-dropping filter; False where the system does not allow it."""
    if not sys.platform.startswith("linux"):
        return False
    code = ctypes.create_string_buffer(
        b"".join(struct.pack("HBBI", *instruction) for instruction in _DROP_SYN)
    )
    program = struct.pack("@HP", len(_DROP_SYN), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True


def handshakes_under_way(ports: Iterable[int]) -> int:
    """Connections to ``ports`` in SYN_RECV (answered, not yet acknowledged), from
    ``/proc/net/tcp`` and ``tcp6`` of this network namespace; 0 where those do not exist."""
    suffixes = tuple(f":{port:04X}" for port in ports)
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(path) as table:
            next(table, None)
            for line in table:
                fields = line.split(None, 4)
                if len(fields) > 3 and fields[3] == _SYN_RECV and fields[1].endswith(suffixes):
                    count += 1
    return count


async def wait_for_handshakes(ports: Iterable[int], limit: float = HANDSHAKE_WAIT_LIMIT) -> int:
    """Wait until no handshake to ``ports`` is under way, at most ``limit`` seconds; the kernel
    offers no event for it, so the table is polled at a growing interval, in a thread (it lists
    every TCP socket of the network namespace). Returns how many were still under way at the
    end (0 normally)."""
    ports = tuple(ports)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit
    interval = 0.005
    while (
        under_way := await asyncio.to_thread(handshakes_under_way, ports)
    ) and loop.time() < give_up:
        await asyncio.sleep(min(interval, max(0.0, give_up - loop.time())))
        interval *= 2
    return under_way


def accept_queued(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting in ``sock``'s accept queue, non-blocking."""
    accepted: list[socket.socket] = []
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError:  # EMFILE and the like: what is left will be reset at the close
            return accepted
        conn.setblocking(False)
        accepted.append(conn)
