"""Faults at scale: idle hordes, slowloris, the connection limit and file-descriptor exhaustion
must not stop the proxy from serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

from tests.conftest import StartProxy
from tests.proxy_support import (
    RawApp,
    RawClient,
    exchange,
    parse_responses,
    proc_status_kib,
)
from tests.support import ProxyProcess, base_config, deep_merge

REQUEST = b"GET /normal HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


async def normal_request(port: int) -> int:
    raw = await exchange(port, REQUEST)
    return parse_responses(raw, [b"GET"])[0].status


async def test_idle_hordes_and_slowloris_do_not_stop_normal_traffic(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port, {"timeouts": {"request_head": "60s"}})
    idle: list[asyncio.StreamWriter] = []
    slow: list[asyncio.StreamWriter] = []
    try:
        baseline = proc_status_kib(proxy.proc.pid, "VmRSS")
        for _ in range(1000):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            idle.append(writer)
        for index in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /slow-%d HTTP/1.1\r\nHost: h\r\n" % index)
            slow.append(writer)

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):
                    for writer in slow:
                        writer.write(b"X-Drip: 1\r\n")
                    await asyncio.sleep(0.05)  # load shape, not synchronisation

        dripping = asyncio.ensure_future(drip())
        keep_alive = await RawClient.connect(proxy.port)
        for index in range(100):
            assert (await keep_alive.request(b"GET", b"/ka-%d" % index)).status == 200
            assert await normal_request(proxy.port) == 200
        await keep_alive.close()
        dripping.cancel()
        growth = proc_status_kib(proxy.proc.pid, "VmRSS") - baseline
        assert growth < 1050 * 16, f"{growth} KiB for 1,050 idle connections"
        assert not [r for r in raw_app.requests if r.path.startswith(b"/slow")]
    finally:
        for writer in idle + slow:
            writer.close()


async def test_connection_limit_refuses_with_503_then_recovers(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(raw_app.port, {"limits": {"max_connections": 20}})
    clients: list[RawClient] = []
    try:
        for _ in range(20):
            client = await RawClient.connect(proxy.port)
            assert (await client.request(b"GET", b"/held")).status == 200
            clients.append(client)
        raw = await exchange(proxy.port, REQUEST)
        (refused,) = parse_responses(raw, [b"GET"])
        assert (refused.status, refused.header(b"connection")) == (503, [b"close"])
        await proxy.log.wait(r"refused 1 connection\(s\) over limits\.max_connections \(20\)")
        for client in clients[:5]:
            response = await client.request(b"GET", b"/bye", [(b"Connection", b"close")])
            assert response.status == 200
            assert await client.closed_by_peer()
        assert await normal_request(proxy.port) == 200
        assert (await clients[-1].request(b"GET", b"/still")).status == 200
    finally:
        for client in clients:
            await client.close()


async def test_file_descriptor_exhaustion_does_not_kill_the_accept_loop(
    raw_app: RawApp, tmp_path: Path
) -> None:
    """With 64 file descriptors the proxy cannot take 200 connections; it must shed them and
    then serve again, not stop accepting."""
    config = deep_merge(base_config(raw_app.port), {"limits": {"max_connections": 10000}})
    starter = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
        "from drainproxy.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proxy = ProxyProcess(config, tmp_path, launcher=[sys.executable, "-c", starter])
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await proxy.started()
        for _ in range(200):
            with contextlib.suppress(OSError):
                connections.append(await asyncio.open_connection("127.0.0.1", proxy.port))
        assert proxy.proc.poll() is None
        # Let the proxy close every connection it did accept: once the client sees the close,
        # the proxy's descriptor is free again.
        for reader, writer in connections:
            with contextlib.suppress(OSError):
                writer.write(REQUEST)
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
        connections.clear()
        statuses = [await normal_request(proxy.port) for _ in range(20)]
        assert statuses == [200] * 20
        assert proxy.proc.poll() is None
        assert "Traceback" not in proxy.log.text()
    finally:
        for _, writer in connections:
            writer.close()
        proxy.stop()
