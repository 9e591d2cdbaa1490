"""What one flooding peer costs drainproxy (issue 11): CPU seconds, peak RSS growth, and the
slowest answer another client got meanwhile, for two revisions side by side.

    .venv/bin/python bench/floods.py --base 1bcf2ef --rev HEAD

Each flood sends (or, from the app, answers) up to its size in writes of its piece size, or
stops when the proxy ends the connection; another client sends a keep-alive GET every 10 ms
until then (a light load, so the proxy's CPU is the flood's). The origin is an asyncio server in
this process; each revision's proxy runs from ``git archive`` (``harness.export_revision``) and
is started afresh for each flood. CPU is utime + stime from /proc; the slowest answer is wall
time on a shared machine: compare the revisions within one run, and read CPU and memory first."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import Processes, Target, export_revision, start_drainproxy, wait_until_serving

from drainproxy.sim.replica import free_port

PIECE = 64 << 10
_TRAILER = (
    b"POST /f HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
)


@dataclass(frozen=True)
class Flood:
    """``prefix``, then ``filler`` repeated: up to ``mib`` MiB in writes of ``piece`` bytes."""

    sender: str  # "client" or "app"
    prefix: bytes
    filler: bytes
    mib: int
    piece: int

    async def send(self, writer: asyncio.StreamWriter) -> int:
        piece = self.filler * (self.piece // len(self.filler))
        sent = 0
        with contextlib.suppress(ConnectionError):
            writer.write(self.prefix)
            while sent < self.mib << 20:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        return sent


#: The client's floods go to the proxy; the app's answer GET /flood.
FLOODS = {
    "request trailer field": Flood("client", _TRAILER, b"t", 32, PIECE),
    "request trailer field, 1 KiB writes": Flood("client", _TRAILER, b"t", 8, 1024),
    "request chunk extension": Flood(
        "client",
        b"POST /f HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5;e=",
        b"e",
        32,
        PIECE,
    ),
    "response head (64 MiB in the issue)": Flood(
        "app", b"HTTP/1.1 200 OK\r\nX-Head: ", b"h", 64, PIECE
    ),
    "response trailer field": Flood(
        "app",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ",
        b"t",
        32,
        PIECE,
    ),
}


class Origin:
    """``/flood`` answers with the current app flood; a POST (a client's flood) waits for the
    whole body, as an app reading it would: never; anything else gets a tiny 200."""

    def __init__(self) -> None:
        self.flood: Flood | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # CancelledError: a POST still held when the run ends; nothing is waiting for it.
        with contextlib.suppress(
            ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError
        ):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /flood ") and self.flood is not None:
                    await self.flood.send(writer)
                    return
                if head.startswith(b"POST "):
                    await reader.read()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


async def other_client(port: int, stop: asyncio.Event) -> float:
    """Keep-alive GETs 10 ms apart until ``stop``; the slowest answer in seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    slowest = 0.0
    try:
        while not stop.is_set():
            started = time.perf_counter()
            writer.write(b"GET /other HTTP/1.1\r\nHost: b\r\n\r\n")
            await reader.readuntil(b"\r\n\r\nok")
            slowest = max(slowest, time.perf_counter() - started)
            await asyncio.sleep(0.01)
    finally:
        writer.close()
    return slowest


async def flood_once(target: Target, origin: Origin, flood: Flood) -> dict[str, float]:
    pid = target.pid
    assert pid is not None
    cpu_before, rss_before = cpu_seconds(pid), status_kib(pid, "VmRSS")
    stop = asyncio.Event()
    others = asyncio.ensure_future(other_client(target.port, stop))
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    started = time.perf_counter()
    try:
        if flood.sender == "client":
            writer.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
            await flood.send(writer)
        else:
            origin.flood = flood
            writer.write(b"GET /flood HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        # The answer (400, 502 or the cut) comes at once after the fix; without it, a client's
        # flood has nothing to wait for but this guard.
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            while await asyncio.wait_for(reader.read(PIECE), 5):
                pass
    finally:
        writer.close()
    elapsed = time.perf_counter() - started
    stop.set()
    slowest = await others
    return {
        "cpu_s": cpu_seconds(pid) - cpu_before,
        "rss_growth_mib": (status_kib(pid, "VmHWM") - rss_before) / 1024,
        "wall_s": elapsed,
        "slowest_other_s": slowest,
    }


async def measure(revisions: dict[str, Path]) -> None:
    origin = Origin()
    server = await asyncio.start_server(origin.serve, "127.0.0.1", free_port())
    origin_port = server.sockets[0].getsockname()[1]
    print(
        "| flood (MiB at most) | revision | proxy CPU s | peak RSS growth MiB | wall s "
        "| slowest other answer s |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, flood in FLOODS.items():
            for label, source in revisions.items():
                processes = Processes(Path(tmp))
                try:
                    target = start_drainproxy(
                        processes, Path(tmp) / label, origin_port, cpu=0, source=source
                    )
                    await asyncio.to_thread(wait_until_serving, target, processes)
                    result = await flood_once(target, origin, flood)
                finally:
                    processes.stop_all()
                print(
                    f"| {name} ({flood.mib}) | {label} | {result['cpu_s']:.2f} | "
                    f"{result['rss_growth_mib']:.1f} | {result['wall_s']:.2f} | "
                    f"{result['slowest_other_s']:.3f} |",
                    flush=True,
                )
    server.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision before")
    parser.add_argument("--rev", default="HEAD", help="the revision after")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        revisions = {}
        for label in (args.base, args.rev):
            dest = Path(tmp) / label
            export_revision(label, dest)
            revisions[label] = dest
        asyncio.run(measure(revisions))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
