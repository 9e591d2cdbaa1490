"""The drain for HTTP/2 clients (docs/drain.md, docs/http2.md): from the propagation phase on, the
two-step GOAWAY; streams in flight finish; at drain.timeout the rest are reset and counted; and a
gRPC client balancing round-robin over two replicas sees no failed call while one is deleted the
kubelet's way."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import h2.errors
import pytest

from drainproxy.dataplane.h2_client import MAX_STREAM_ID
from drainproxy.sim.kubelet import Container, HttpGetHook, terminate_pod
from tests.conftest import StartProxy
from tests.grpc_app import method
from tests.h2_support import H2TestClient
from tests.proxy_support import AppRequest, RawApp, response_bytes
from tests.support import ProxyProcess, free_port

PHASE = r"phase \S+ -> {}"


def hold_until(release: asyncio.Event, app: RawApp) -> None:
    @app.route(b"/held")
    async def held(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(response_bytes(200, b"held"))
        return True


async def test_two_step_goaway_from_propagation_and_in_flight_streams_finish(
    start_proxy: StartProxy, raw_app: RawApp
) -> None:
    release = asyncio.Event()
    hold_until(release, raw_app)
    proxy = await start_proxy(
        raw_app.port, {"drain": {"propagation": "3s"}, "termination_grace_period": "40s"}
    )
    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/held")
    await raw_app.received(b"/held")
    proxy.send(signal.SIGTERM)
    await client.wait_for(lambda: len(client.goaways()) >= 2)
    first, final = client.goaways()[:2]
    no_error = h2.errors.ErrorCodes.NO_ERROR
    assert (first.error_code, first.last_stream_id) == (no_error, MAX_STREAM_ID)
    assert (final.error_code, final.last_stream_id) == (no_error, stream)
    # Told during propagation, as HTTP/1.1 keep-alives are told by Connection: close.
    assert (await proxy.status())["phase"] == "propagating"
    release.set()
    response = await client.response(stream)
    assert (response.status, bytes(response.body)) == (200, b"held")
    await client.wait_for(lambda: client.closed)
    await client.close()
    assert await proxy.exited() == 0


async def test_new_connection_during_propagation_is_served_then_told_to_go(
    start_proxy: StartProxy, raw_app: RawApp
) -> None:
    proxy = await start_proxy(
        raw_app.port, {"drain": {"propagation": "5s"}, "termination_grace_period": "40s"}
    )
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(PHASE.format("propagating"))
    client = await H2TestClient.connect(proxy.port)
    stream = client.request(b"/late")
    response = await client.response(stream)
    assert (response.status, bytes(response.body)) == (200, b"/late")
    await client.wait_for(lambda: len(client.goaways()) >= 2 and client.closed)
    assert client.goaways()[-1].last_stream_id == stream
    await client.close()


async def test_streams_left_at_drain_timeout_are_reset_and_counted(
    start_proxy: StartProxy, raw_app: RawApp
) -> None:
    hold_until(asyncio.Event(), raw_app)  # never released
    proxy = await start_proxy(raw_app.port, {"drain": {"propagation": "200ms", "timeout": "1s"}})
    client = await H2TestClient.connect(proxy.port)
    streams = [client.request(b"/held") for _ in range(2)]
    await raw_app.wait_for(lambda: sum(r.path == b"/held" for r in raw_app.requests) == 2)
    proxy.send(signal.SIGTERM)
    for stream in streams:
        result = await client.response(stream)
        assert result.reset_code == h2.errors.ErrorCodes.CANCEL
    assert await proxy.exited() == 0
    assert "reset 2 stream(s)" in proxy.log.text()
    await client.close()


# --- two gRPC replicas, round-robin, one deleted the kubelet's way ------------------------------


@dataclass
class Replica:
    name: str
    app: subprocess.Popen[bytes]
    proxy: ProxyProcess

    def pod(self) -> list[Container]:
        admin_port = int(self.proxy.admin_url.rsplit(":", 1)[1])
        # The app container's preStop hook waits for the drain; drainproxy gets SIGTERM at once.
        return [
            Container("app", self.app, HttpGetHook(admin_port, "/prestop")),
            Container("drainproxy", self.proxy.proc),
        ]


@dataclass
class Load:
    """Unary and server-streaming calls, round-robin over both replicas, until stopped."""

    channel: grpc.Channel
    loop: asyncio.AbstractEventLoop
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    ok: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    streams_ok: int = 0

    def unary_loop(self) -> None:
        call = self.channel.unary_unary(method("Unary"), _same, _same)
        while not self.stop.is_set():
            try:
                reply = call(b"x", timeout=10)
            except grpc.RpcError as exc:
                self.failures.append(f"unary: {exc.code()} {exc.details()}")
                continue
            name = reply.split(b":")[0].decode()
            self.ok[name] = self.ok.get(name, 0) + 1
            self.loop.call_soon_threadsafe(self.changed.set)

    async def until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.changed.wait()
                self.changed.clear()

    def stream_loop(self) -> None:
        call = self.channel.unary_stream(method("SlowStream"), _same, _same)
        while not self.stop.is_set():
            try:
                replies = list(call(b"5/0.1", timeout=20))
            except grpc.RpcError as exc:
                self.failures.append(f"stream: {exc.code()} {exc.details()}")
                continue
            if replies != [b"%d" % n for n in range(5)]:
                self.failures.append(f"stream: got {replies!r}")
            self.streams_ok += 1


def _same(data: bytes) -> bytes:
    return data


@pytest.fixture
def grpc_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


async def test_grpc_round_robin_over_two_replicas_loses_no_call_when_one_is_deleted(
    start_proxy: StartProxy, grpc_processes: list[subprocess.Popen[bytes]]
) -> None:
    replicas = []
    for name in ("r1", "r2"):
        port = free_port()
        app = subprocess.Popen(
            [sys.executable, "-m", "tests.grpc_app", "--port", str(port), "--name", name],
            stdout=subprocess.DEVNULL,
        )
        grpc_processes.append(app)
        proxy = await start_proxy(
            port,
            {
                "upstream": {"protocol": "h2c"},
                "drain": {"propagation": "1s", "timeout": "10s"},
                "termination_grace_period": "20s",
            },
        )
        replicas.append(Replica(name, app, proxy))
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.proxy.port}" for r in replicas)
    options = [("grpc.lb_policy_name", "round_robin")]
    with grpc.insecure_channel(target, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        load = Load(channel, asyncio.get_running_loop())
        workers = [
            threading.Thread(target=load.unary_loop),
            threading.Thread(target=load.unary_loop),
            threading.Thread(target=load.stream_loop),
        ]
        for worker in workers:
            worker.start()
        try:
            await load.until(lambda: load.ok.get("r1", 0) > 20 and load.ok.get("r2", 0) > 20)
            outcomes = await terminate_pod(replicas[0].pod(), grace_period=20)
            served_by_r2 = load.ok.get("r2", 0)
            await load.until(lambda: load.ok.get("r2", 0) > served_by_r2 + 50)
        finally:
            load.stop.set()
            for worker in workers:
                await asyncio.to_thread(worker.join, 30)
    assert load.failures == []
    assert load.streams_ok > 0
    assert [outcome.killed for outcome in outcomes] == [False, False]
    assert replicas[0].proxy.proc.returncode == 0
    log = replicas[0].proxy.log.text()
    assert "-> draining" in log
    assert "reset" not in log.split("-> draining", 1)[1]  # nothing was cut
