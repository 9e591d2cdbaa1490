"""Instructions per proxied exchange, counted by callgrind: deterministic, so a before/after
comparison of the data path is exact on a noisy shared machine (see RESULTS.md).

The real ClientConnection and UpstreamConnection, with their real llhttp parsers, exchange
keep-alive GETs through fake transports (no system calls, no event loop turns): a client
request in one read, the app's 5-field nginx-style response in one read. Instrumentation is
on only around the N exchanges (a 3-line C helper built with ``cc`` issues callgrind's client
requests), so start-up, whose count varies by millions from run to run, is left out:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/dev/null .venv/bin/python bench/exchange_instructions.py 5000

callgrind's "Collected" line divided by N is the cost of one exchange. ``--direct`` instead
runs natively and prints microseconds per exchange (a sanity check, not the measurement)."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drainproxy.config.schema import config_from_mapping
from drainproxy.control.server import Server
from drainproxy.dataplane.context import ProxyContext
from drainproxy.dataplane.proxy import ClientConnection
from drainproxy.dataplane.upstream import UpstreamConnection

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"Hello, world!"
)


class FakeTransport(asyncio.Transport):
    """Takes writes and drops them; answers the questions the protocols ask."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def writelines(self, list_of_data: Any) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_TOGGLE_C = """
#include <valgrind/callgrind.h>
void instrumentation_on(void) { CALLGRIND_START_INSTRUMENTATION; }
void instrumentation_off(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def callgrind_toggles(workdir: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """Functions that switch callgrind's instrumentation on and off (no-ops outside it)."""
    source, library = workdir / "toggle.c", workdir / "toggle.so"
    source.write_text(_TOGGLE_C)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", library, source], check=True)
    lib = ctypes.CDLL(str(library))
    return lib.instrumentation_on, lib.instrumentation_off


async def run(exchanges: int, direct: bool) -> None:
    config = config_from_mapping(
        {"upstream": "http://127.0.0.1:9", "log": {"level": "warning", "access_log": False}}
    )
    server = Server(config)
    ctx: ProxyContext = server.proxy
    client = ClientConnection(ctx)
    client.connection_made(FakeTransport())
    app = UpstreamConnection(server.pool)
    app.connection_made(FakeTransport())
    server.pool.release(app)
    exchange(client, app)  # the first one warms caches (status lines, known names)
    with tempfile.TemporaryDirectory() as tmp:
        on, off = callgrind_toggles(Path(tmp))
        started = time.perf_counter()
        on()
        for _ in range(exchanges):
            exchange(client, app)
        off()
    if direct:
        elapsed = time.perf_counter() - started
        print(f"{elapsed / max(exchanges, 1) * 1e6:.2f} µs per exchange")


def exchange(client: ClientConnection, app: UpstreamConnection) -> None:
    client.data_received(REQUEST)
    app.data_received(RESPONSE)
    assert client.active is None and app.client is None, "the exchange did not complete"


def main(argv: list[str]) -> int:
    direct = "--direct" in argv
    numbers = [arg for arg in argv if arg != "--direct"]
    asyncio.run(run(int(numbers[0]) if numbers else 1000, direct))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
