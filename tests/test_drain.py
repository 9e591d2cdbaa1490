"""The drain as a client and the kubelet see it: real proxy process, real sockets, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from drainproxy.sim.kubelet import Container, ExecHook, HttpGetHook, terminate_pod
from drainproxy.sim.process import LogWatcher
from drainproxy.sim.replica import free_port
from tests.conftest import StartApp, StartProxy
from tests.proxy_support import (
    AppRequest,
    IncompleteResponse,
    RawApp,
    parse_responses,
    response_bytes,
)
from tests.support import slow_app

PHASE = r"phase \w+ -> {}"


async def raw_request(
    port: int, path: str = "/"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return reader, writer


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_keep_alive_clients_get_connection_close_while_propagating(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        await start_app(slow_app(asyncio.Event(), asyncio.Event())),
        {"drain": {"propagation": "30s"}, "termination_grace_period": "60s"},
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/") as response:
            assert "Connection" not in response.headers
        proxy.send(signal.SIGTERM)
        await proxy.log.wait(PHASE.format("propagating"))
        async with session.get(proxy.admin_url + "/ready") as response:
            assert response.status == 503
        # Still serving, new connections included, but telling keep-alive clients to leave.
        async with session.get(proxy.url + "/") as response:
            assert response.status == 200
            assert response.headers["Connection"] == "close"
        reader, writer = await raw_request(proxy.port)
        head = await read_head(reader)
        assert b"Connection: close" in head
        await reader.readexactly(4)
        assert await reader.read() == b"", "the proxy closes the connection after the response"
        writer.close()


async def test_after_propagation_new_connections_are_refused_and_idle_ones_closed(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    release, slow_started = asyncio.Event(), asyncio.Event()
    proxy = await start_proxy(
        await start_app(slow_app(release, slow_started)),
        {
            "drain": {"propagation": "300ms", "timeout": "30s", "idle_grace": "100ms"},
            "termination_grace_period": "60s",
        },
    )
    idle_reader, idle_writer = await raw_request(proxy.port)
    await read_head(idle_reader)
    await idle_reader.readexactly(4)  # "fast": the connection is now idle, kept alive
    busy_reader, busy_writer = await raw_request(proxy.port, "/slow")
    await slow_started.wait()

    proxy.send(signal.SIGTERM)
    await proxy.log.wait(r"listener closed")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await idle_reader.read() == b"", "the idle keep-alive connection is closed"
    idle_writer.close()

    release.set()  # the in-flight request still finishes, with Connection: close
    head = await read_head(busy_reader)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert await busy_reader.readexactly(4) == b"slow"
    busy_writer.close()
    summary = await proxy.log.wait(
        r"drain summary: .* closed idle (\d+), after a response (\d+), by force (\d+)"
    )
    assert summary.groups() == ("1", "1", "0")
    assert await proxy.exited() == 0


async def test_an_admin_keep_alive_connection_is_closed_quietly_at_exit(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    """A scraper's keep-alive admin connection is open at exit: it is closed, and the log holds
    no traceback (Python 3.11's stream callback raised on a connection task cancelled by the
    admin's close)."""
    proxy = await start_proxy(
        await start_app(slow_app(asyncio.Event(), asyncio.Event())),
        {"drain": {"propagation": "100ms"}},
    )
    admin_port = int(proxy.admin_url.rpartition(":")[2])
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
    writer.write(b"GET /live HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
    proxy.send(signal.SIGTERM)
    assert await reader.read() == b"live\n", "the connection is closed after its answer"
    writer.close()
    assert await proxy.exited() == 0
    assert "Traceback" not in proxy.log.text()


async def test_a_request_outliving_drain_timeout_is_cut_and_counted(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    release, slow_started = asyncio.Event(), asyncio.Event()
    proxy = await start_proxy(
        await start_app(slow_app(release, slow_started)),
        {"drain": {"propagation": "100ms", "timeout": "300ms"}},
    )
    reader, writer = await raw_request(proxy.port, "/slow")
    await slow_started.wait()
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(r"drain.timeout: cut 1 connection")
    assert await reader.read() == b"", "the client sees its connection cut, not a response"
    writer.close()
    summary = await proxy.log.wait(r"drain summary: .* by force (\d+)")
    assert summary.group(1) == "1"
    assert await proxy.exited() == 0
    release.set()


async def test_prestop_waits_for_the_drain_and_repeats_are_no_ops(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(await start_app(slow_app(asyncio.Event(), asyncio.Event())))
    async with aiohttp.ClientSession() as session:
        prestop = asyncio.ensure_future(session.get(proxy.admin_url + "/prestop"))
        await proxy.log.wait(PHASE.format("propagating"))
        assert not prestop.done()
        # SIGTERM and a second preStop call arrive too: no second drain starts.
        proxy.send(signal.SIGTERM)
        async with session.post(proxy.admin_url + "/drain") as response:
            assert response.status == 202
            assert await response.text() == "drain already under way\n"
        response = await prestop
        assert response.status == 200
        response.release()
        assert await proxy.exited() == 0
    assert len([line for line in proxy.log.lines if "-> propagating" in line]) == 1


async def test_liveness_restart_prestop_without_sigterm_recovers(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    app_port = free_port()
    app_command = [sys.executable, "-m", "drainproxy.sim.sample_app", "--port", str(app_port)]
    first_app = subprocess.Popen(app_command, stdout=subprocess.DEVNULL)
    second_app: subprocess.Popen[bytes] | None = None
    try:
        proxy = await start_proxy(app_port, {"drain": {"propagation": "200ms"}})
        # The kubelet restarts only the app container: its preStop hook, then SIGTERM to it.
        outcomes = await terminate_pod(
            [
                Container(
                    "app",
                    first_app,
                    HttpGetHook(int(proxy.admin_url.rsplit(":", 1)[1]), "/prestop"),
                )
            ],
            grace_period=10,
        )
        assert outcomes[0].hook_result == "httpGet /prestop: 200"
        assert not outcomes[0].killed
        await proxy.log.wait(PHASE.format("recovering"))
        second_app = subprocess.Popen(app_command, stdout=subprocess.DEVNULL)
        await proxy.log.wait(r"recovering -> serving")
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.admin_url + "/ready") as response:
                assert response.status == 200
            async with session.get(proxy.url + "/") as response:
                assert response.status == 200
                assert "Connection" not in response.headers
        assert proxy.proc.poll() is None, "a liveness restart must not stop drainproxy"
    finally:
        for app in (first_app, second_app):
            if app is not None:
                app.kill()
                app.wait()


async def test_each_drain_summary_counts_only_that_drains_requests_and_closes(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    """A liveness restart's drain, then serving, then the pod's deletion: the second summary
    counts nothing of the first drain nor of the serving in between."""
    proxy = await start_proxy(
        await start_app(slow_app(asyncio.Event(), asyncio.Event())),
        {"drain": {"propagation": "1s"}, "app": {"stop_timeout": "200ms"}},
    )
    async with aiohttp.ClientSession() as session:
        prestop = asyncio.ensure_future(session.get(proxy.admin_url + "/prestop"))
        await proxy.log.wait(PHASE.format("propagating"))
        async with session.get(proxy.url + "/") as response:
            assert response.status == 200
        (await prestop).release()
    await proxy.log.wait(r"recovering -> serving")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")  # closed by the proxy
    writer.close()
    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0
    summaries = re.findall(
        r"drain summary: .*; requests served during the drain (\d+); connections closed idle "
        r"(\d+), after a response (\d+), by force (\d+)",
        proxy.log.text(),
    )
    assert len(summaries) == 2
    assert summaries[0][0] == "1"
    assert summaries[1] == ("0", "0", "0", "0")


async def test_second_sigint_exits_at_once(start_app: StartApp, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(
        await start_app(slow_app(asyncio.Event(), asyncio.Event())),
        {"drain": {"propagation": "60s"}, "termination_grace_period": "90s"},
    )
    proxy.send(signal.SIGINT)
    await proxy.log.wait(PHASE.format("propagating"))
    proxy.send(signal.SIGINT)
    assert await proxy.exited() == 128 + signal.SIGINT
    assert "immediate shutdown" in proxy.log.text()


async def test_sigquit_exits_at_once(start_app: StartApp, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(await start_app(slow_app(asyncio.Event(), asyncio.Event())))
    proxy.send(signal.SIGQUIT)
    assert await proxy.exited() == 128 + signal.SIGQUIT


async def test_status_reports_phase_counts_and_deadlines(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    release, slow_started = asyncio.Event(), asyncio.Event()
    proxy = await start_proxy(
        await start_app(slow_app(release, slow_started)),
        {"drain": {"propagation": "30s"}, "termination_grace_period": "60s"},
    )
    reader, writer = await raw_request(proxy.port, "/slow")
    await slow_started.wait()
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(PHASE.format("propagating"))
    status = await proxy.status()
    assert status["phase"] == "propagating"
    assert status["in_flight"] == 1
    assert status["open_connections"] == 1
    assert 0 < status["deadlines"]["phase_ends_in"] <= 30
    assert status["drain"]["sources"] == ["signal"]
    release.set()
    await read_head(reader)
    writer.close()


# --- the kubelet simulator itself --------------------------------------------------------------


def _sleeper(ignore_term: bool) -> subprocess.Popen[bytes]:
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('up', flush=True)\ntime.sleep(60)\n"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


async def _started(*processes: subprocess.Popen[bytes]) -> list[LogWatcher]:
    watchers = [LogWatcher(process.stdout) for process in processes]
    for watcher in watchers:
        await watcher.wait("up")
    return watchers


def _reap(watchers: list[LogWatcher], *processes: subprocess.Popen[bytes]) -> None:
    for watcher, process in zip(watchers, processes, strict=True):
        watcher.join()
        assert process.stdout is not None
        process.stdout.close()


async def test_kubelet_runs_the_hook_then_sigterm_and_kills_at_the_grace_period() -> None:
    obedient, stubborn = _sleeper(ignore_term=False), _sleeper(ignore_term=True)
    watchers = await _started(obedient, stubborn)
    outcomes = await terminate_pod(
        [
            Container("obedient", obedient, ExecHook(["true"])),
            Container("stubborn", stubborn),
        ],
        grace_period=1.0,
    )
    by_name = {outcome.name: outcome for outcome in outcomes}
    assert by_name["obedient"].hook_result == "exec true: exit 0"
    assert by_name["obedient"].returncode == -signal.SIGTERM
    assert not by_name["obedient"].killed
    assert by_name["stubborn"].killed
    assert by_name["stubborn"].returncode == -signal.SIGKILL
    _reap(watchers, obedient, stubborn)


async def test_kubelet_sends_native_sidecars_sigterm_after_the_app_exits() -> None:
    app, sidecar = _sleeper(ignore_term=False), _sleeper(ignore_term=False)
    watchers = await _started(app, sidecar)
    outcomes = await terminate_pod(
        [Container("app", app)], 5.0, sidecars=[Container("proxy", sidecar)]
    )
    app_outcome, sidecar_outcome = outcomes
    assert app_outcome.exited_after is not None and sidecar_outcome.sigterm_after is not None
    assert sidecar_outcome.sigterm_after >= app_outcome.exited_after
    _reap(watchers, app, sidecar)


async def test_close_spread_closes_idle_connections_one_after_another(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        await start_app(slow_app(asyncio.Event(), asyncio.Event())),
        {"drain": {"propagation": "100ms", "idle_grace": "0s", "close_spread": "3s"}},
    )
    connections = []
    for _ in range(3):
        reader, writer = await raw_request(proxy.port)
        await read_head(reader)
        await reader.readexactly(4)
        connections.append((reader, writer))
    proxy.send(signal.SIGTERM)
    reads = [asyncio.ensure_future(reader.read()) for reader, _ in connections]
    done, pending = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "one connection closed first; the others wait their turn"
    assert len(pending) == 2
    assert [await read for read in reads] == [b"", b"", b""]
    summary = await proxy.log.wait(r"closed idle (\d+)")
    assert summary.group(1) == "3"
    for _, writer in connections:
        writer.close()


# --- closing without losing or faking bytes (issue 11; RFC 9112 §9.6) ---------------------------

BIG = 16 << 20


async def test_a_pipelining_slow_reader_gets_the_whole_answer_and_a_clean_close(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """During a drain the answer to the first request says Connection: close, and two more
    requests follow it 50 ms apart; the proxy must not close with them unread (the kernel would
    reset the connection and destroy the answer's tail): it shuts its side, discards them and
    closes once the client has read everything."""

    @raw_app.route(b"/big")
    async def big(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(response_bytes(200, b"b" * BIG))
        return True

    proxy = await start_proxy(
        raw_app.port,
        {"drain": {"propagation": "100ms", "timeout": "60s"}, "termination_grace_period": "90s"},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(r"listener closed")
    writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")

    async def pipeline() -> None:
        for index in (2, 3):
            await asyncio.sleep(0.05)  # load shape from the issue, not synchronisation
            writer.write(b"GET /more-%d HTTP/1.1\r\nHost: t\r\n\r\n" % index)

    pipelining = asyncio.ensure_future(pipeline())
    received = bytearray()
    while data := await asyncio.wait_for(reader.read(64 << 10), 30):  # a reset raises here
        received += data
        await asyncio.sleep(0.002)  # a slow reader (load shape)
    await pipelining
    writer.close()
    (response,) = parse_responses(bytes(received), [b"GET"] * 3)
    assert (response.status, len(response.body)) == (200, BIG)
    assert response.header(b"connection") == [b"close"]
    assert [r.path for r in raw_app.requests] == [b"/big"]


@pytest.mark.parametrize("trigger", ["drain.timeout", "shutdown"])
@pytest.mark.parametrize(
    ("version", "app_framing"),
    [("1.0", "close"), ("1.0", "chunked"), ("1.0", "length"), ("1.1", "close"), ("1.1", "length")],
)
async def test_a_response_cut_by_the_proxy_never_looks_complete(
    raw_app: RawApp, start_proxy: StartProxy, trigger: str, version: str, app_framing: str
) -> None:
    """Where the body ends at the close (an HTTP/1.0 client, no Content-Length from the app)
    the cut is a reset; elsewhere the client sees a message short of its framing."""
    framing = {
        "close": b"Connection: close\r\n",
        "chunked": b"Transfer-Encoding: chunked\r\n",
        "length": b"Content-Length: 1000\r\n",
    }[app_framing]
    first = b"7\r\npartial\r\n" if app_framing == "chunked" else b"partial"
    held = asyncio.Event()

    @raw_app.route(b"/stream")
    async def stream(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + first)
        await writer.drain()
        await held.wait()  # never set: the rest never comes
        return False

    proxy = await start_proxy(raw_app.port, {"drain": {"propagation": "100ms", "timeout": "300ms"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /stream HTTP/" + version.encode() + b"\r\nHost: t\r\n\r\n")
    received = await asyncio.wait_for(reader.readuntil(b"partial"), 10)
    proxy.send(signal.SIGTERM if trigger == "drain.timeout" else signal.SIGQUIT)
    ends_at_close = version == "1.0" and app_framing != "length"
    try:
        if ends_at_close:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
        else:
            with contextlib.suppress(ConnectionResetError):
                received += await asyncio.wait_for(reader.read(), 10)
            with pytest.raises(IncompleteResponse):
                parse_responses(received, [b"GET"])
    finally:
        writer.close()
        held.set()
    if trigger == "drain.timeout":
        await proxy.log.wait("drain.timeout: cut 1")
        summary = await proxy.log.wait(r"drain summary: .* by force (\d+)")
        assert summary.group(1) == "1", "a reset is counted as a forced close"
    else:
        await proxy.log.wait("immediate")
