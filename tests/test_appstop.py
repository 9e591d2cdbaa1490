"""Stopping the app after the drain: signal (a sibling found by pidfile or command line), http,
exec; start-up errors. Real processes: drainproxy, tests/fake_app.py, aiohttp servers, commands."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from drainproxy.config.schema import config_from_mapping
from drainproxy.control.appstop import AppStopError, ExecStop, HttpStop, ProcessFinder
from drainproxy.errors import ConfigError
from tests.conftest import StartApp, StartProxy
from tests.support import (
    REPO,
    ProxyProcess,
    WatchedProcess,
    base_config,
    deep_merge,
    free_port,
)

FAKE_APP = Path(__file__).with_name("fake_app.py")
FAST_DRAIN = {"propagation": "200ms", "timeout": "1s"}


class FakeApp(WatchedProcess):
    """tests/fake_app.py as a sibling process: another container in a shared PID namespace."""

    def __init__(self, *args: str, user: int | None = None) -> None:
        self.port = free_port()
        as_user = [] if user is None else as_another_user(user)
        super().__init__([*as_user, sys.executable, str(FAKE_APP), "--port", str(self.port), *args])

    async def listening(self) -> None:
        await self.log.wait(r"fake app: listening")

    async def exited(self, timeout: float = 10.0) -> int:
        return await super().exited(timeout)


@pytest.fixture
def fake_apps() -> Iterator[list[FakeApp]]:
    started: list[FakeApp] = []
    yield started
    for app in started:
        app.stop()


async def start_fake_app(apps: list[FakeApp], *args: str, user: int | None = None) -> FakeApp:
    app = FakeApp(*args, user=user)
    apps.append(app)
    await app.listening()
    return app


def marker() -> tuple[str, str]:
    """A token only one test's processes carry, and a pattern matching their command line."""
    token = uuid.uuid4().hex
    return token, rf"fake_app\.py .*--marker {token}"


def signal_overrides(**app: Any) -> dict[str, Any]:
    return {"drain": FAST_DRAIN, "app": {"stop": "signal", "stop_timeout": "1s", **app}}


# --- signal ----------------------------------------------------------------------------------


async def test_signal_stops_the_app_found_by_pidfile_after_releasing_prestop(
    tmp_path: Path, fake_apps: list[FakeApp], start_proxy: StartProxy
) -> None:
    pidfile = tmp_path / "app.pid"
    app = await start_fake_app(fake_apps, "--pidfile", str(pidfile))
    proxy = await start_proxy(app.port, signal_overrides(pidfile=str(pidfile)))
    plan = await proxy.log.wait(r"app stop plan: signal: SIGTERM to pid (\d+)")
    assert int(plan.group(1)) == app.proc.pid
    async with aiohttp.ClientSession() as session:
        # The app container's preStop hook starts the drain and waits; then the kubelet's SIGTERM.
        prestop = asyncio.ensure_future(session.get(proxy.admin_url + "/prestop"))
        await proxy.log.wait(r"drain requested by prestop")
        proxy.send(signal.SIGTERM)
        async with await prestop as response:
            assert response.status == 200
        assert await app.exited() == -signal.SIGTERM
    assert await proxy.exited() == 0
    assert "app stop: app exited after SIGTERM; preStop hooks released" in proxy.log.text()


async def test_signal_sigquit_to_the_app_found_by_command_line(
    fake_apps: list[FakeApp], start_proxy: StartProxy
) -> None:
    token, pattern = marker()
    app = await start_fake_app(fake_apps, "--exit-on", "SIGQUIT", "--marker", token)
    proxy = await start_proxy(app.port, signal_overrides(process=pattern, signal="SIGQUIT"))
    await proxy.log.wait(rf"app stop plan: signal: SIGQUIT to pid {app.proc.pid} ")
    proxy.send(signal.SIGTERM)
    await app.log.wait(r"fake app: got SIGQUIT, exiting")
    assert await app.exited() == 0
    assert await proxy.exited() == 0


async def test_an_app_ignoring_the_signal_is_killed_after_stop_timeout(
    fake_apps: list[FakeApp], start_proxy: StartProxy
) -> None:
    token, pattern = marker()
    app = await start_fake_app(fake_apps, "--ignore", "SIGTERM", "--marker", token)
    overrides = signal_overrides(process=pattern, kill_after_timeout=True)
    proxy = await start_proxy(app.port, overrides)
    await proxy.log.wait(r"app stop plan")
    proxy.send(signal.SIGTERM)
    assert await app.exited() == -signal.SIGKILL
    assert await proxy.exited() == 0
    assert "ignored SIGTERM for 1s: sending SIGKILL" in proxy.log.text()
    assert "app stop: app killed after SIGTERM timed out; preStop hooks released" in (
        proxy.log.text()
    )


async def test_without_kill_after_timeout_an_app_ignoring_the_signal_keeps_running(
    fake_apps: list[FakeApp], start_proxy: StartProxy
) -> None:
    token, pattern = marker()
    app = await start_fake_app(fake_apps, "--ignore", "SIGTERM", "--marker", token)
    proxy = await start_proxy(app.port, signal_overrides(process=pattern, stop_timeout="300ms"))
    await proxy.log.wait(r"app stop plan")
    proxy.send(signal.SIGTERM)
    await proxy.log.wait(
        rf"ERROR pid {app.proc.pid} .* still runs 0.3s after SIGTERM; not killed "
        r"\(app.kill_after_timeout is false\)"
    )
    await proxy.exited()
    assert app.proc.poll() is None
    assert "app stop: app not stopped; preStop hooks released" in proxy.log.text()


async def test_no_matching_process_is_an_error_at_start_up(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    token, pattern = marker()
    port = await start_app(hello_app())
    proxy = await start_proxy(port, signal_overrides(process=pattern), wait_ready=False)
    await proxy.log.wait(rf"ERROR app.process: '.*{token}' matches no process")
    assert await proxy.exited() == 1


async def test_several_matching_processes_are_an_error_at_start_up(
    fake_apps: list[FakeApp], start_proxy: StartProxy
) -> None:
    token, pattern = marker()
    first = await start_fake_app(fake_apps, "--marker", token)
    second = await start_fake_app(fake_apps, "--marker", token)
    proxy = await start_proxy(first.port, signal_overrides(process=pattern), wait_ready=False)
    pids = sorted([first.proc.pid, second.proc.pid])
    await proxy.log.wait(
        rf"ERROR app.process: .* matches 2 processes \(pid {pids[0]} .*, pid {pids[1]} .*\); "
        "it must match exactly one"
    )
    assert await proxy.exited() == 1


def test_pidfile_problems_are_named(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    cases = {
        "": rf"app.pidfile: {pidfile} cannot be read: No such file or directory",
        "not-a-pid\n": r"holds 'not-a-pid', not a process id",
        f"{os.getpid()}\n": r"names pid \d+: drainproxy or its parent",
        "4194304\n": r"names pid 4194304, which is not running",  # above the kernel's pid_max
    }
    for content, message in cases.items():
        pidfile.unlink(missing_ok=True)
        if content:
            pidfile.write_text(content)
        with pytest.raises(AppStopError, match=message):
            ProcessFinder(str(pidfile), None).find()


DRAINPROXY_UID = 65533
APP_UID = 65534  # nobody


def _can_run_as_another_user() -> str | None:
    """Why the EPERM test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to run drainproxy and the app as two other users"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    probe = subprocess.run(
        [*as_another_user(DRAINPROXY_UID), sys.executable, "-c", "import drainproxy"],
        capture_output=True,
        cwd=REPO,
    )
    return None if probe.returncode == 0 else "the venv is not readable by another user here"


def as_another_user(uid: int) -> list[str]:
    """A command prefix; setpriv drops root's capabilities (CAP_KILL among them) with the UID."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


async def test_permission_denied_is_one_line_naming_uid_and_cap_kill(
    fake_apps: list[FakeApp], proxies: list[ProxyProcess]
) -> None:
    if reason := _can_run_as_another_user():
        pytest.skip(reason)
    token, pattern = marker()
    app = await start_fake_app(fake_apps, "--marker", token, user=APP_UID)
    # A directory the other user can read, for drainproxy's config.
    workdir = Path(tempfile.mkdtemp(prefix="drainproxy-eperm-"))
    workdir.chmod(0o755)
    try:
        config = deep_merge(base_config(app.port), signal_overrides(process=pattern))
        launcher = [*as_another_user(DRAINPROXY_UID), sys.executable, "-m", "drainproxy"]
        proxy = ProxyProcess(config, workdir, launcher=launcher)
        proxies.append(proxy)
        assert await proxy.exited() == 1
    finally:
        shutil.rmtree(workdir)
    lines = [line for line in proxy.log.lines if "CAP_KILL" in line]
    assert len(lines) == 1, proxy.log.text()
    assert f"cannot send SIGTERM to pid {app.proc.pid} " in lines[0]
    assert f"which runs as uid {APP_UID}, from uid {DRAINPROXY_UID}" in lines[0]
    assert "needs the same UID or CAP_KILL" in lines[0]
    assert app.proc.poll() is None


# --- http ------------------------------------------------------------------------------------


def hello_app(**extra_routes: Any) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    for path, handler in extra_routes.items():
        app.router.add_route("*", f"/{path}", handler)
    return app


async def test_http_calls_the_app_after_the_drain(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    asked: list[str] = []

    async def quit_handler(request: web.Request) -> web.Response:
        asked.append(request.method)
        return web.Response(status=202, text="bye")

    port = await start_app(hello_app(quitquitquit=quit_handler))
    url = f"http://127.0.0.1:{port}/quitquitquit"
    overrides = {"drain": FAST_DRAIN, "app": {"stop": "http", "url": url, "stop_timeout": "1s"}}
    proxy = await start_proxy(port, overrides)
    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0
    assert asked == ["POST"]
    assert f"app.url: POST {url} answered 202: accepted" in proxy.log.text()
    assert "app stop: http stop accepted; preStop hooks released" in proxy.log.text()


async def test_http_stop_errors_name_the_call(start_app: StartApp) -> None:
    async def never_answers(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def refuses(request: web.Request) -> web.Response:
        return web.Response(status=503)

    port = await start_app(hello_app(hang=never_answers, refuse=refuses))
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(AppStopError, match=rf"app.url: PUT {base}/hang got no answer within 0.3s"):
        await HttpStop(f"{base}/hang", "PUT", 0.3).stop()
    with pytest.raises(AppStopError, match=r"answered 503: the stop was not accepted"):
        await HttpStop(f"{base}/refuse", "POST", 1.0).stop()
    closed = f"http://127.0.0.1:{free_port()}/quit"
    with pytest.raises(AppStopError, match=rf"app.url: POST {closed} failed: "):
        await HttpStop(closed, "POST", 1.0).stop()


# --- exec ------------------------------------------------------------------------------------


async def test_exec_runs_the_command_after_the_drain_and_logs_its_output(
    tmp_path: Path, start_app: StartApp, start_proxy: StartProxy
) -> None:
    ran = tmp_path / "ran"
    command = ["sh", "-c", f'echo "stopping the app"; echo "on stderr" >&2; touch {ran}']
    port = await start_app(hello_app())
    overrides = {"drain": FAST_DRAIN, "app": {"stop": "exec", "command": command}}
    proxy = await start_proxy(port, overrides)
    await proxy.log.wait(r"app stop plan: exec: \['sh', '-c'")
    assert not ran.exists()
    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0
    assert ran.exists()
    log = proxy.log.text()
    assert "output: stopping the app" in log
    assert "output: on stderr" in log
    assert "exited with status 0" in log
    assert "app stop: command succeeded; preStop hooks released" in log


async def test_exec_timeout_kills_the_command_and_keeps_its_output(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drainproxy")
    command = ("sh", "-c", "echo started; sleep 30 & wait")
    with pytest.raises(AppStopError, match=r"did not finish within 0.3s: killed"):
        await ExecStop(command, 0.3).stop()
    assert "output: started" in caplog.text


async def test_exec_failure_reports_the_status_and_output(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drainproxy")
    with pytest.raises(AppStopError, match=r"exited with status 3"):
        await ExecStop(("sh", "-c", "echo no such app >&2; exit 3"), 1.0).stop()
    assert "output: no such app" in caplog.text
    with pytest.raises(AppStopError, match=r"'no-such-program-x' is not an executable program"):
        ExecStop(("no-such-program-x",), 1.0).check()


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ({"stop": "signal"}, r"app.stop: 'signal' needs exactly one of app.pidfile .* app.process"),
        (
            {"stop": "signal", "pidfile": "/run/app.pid", "process": "x"},
            r"app.stop: 'signal' needs exactly one of",
        ),
        ({"stop": "http"}, r"app.stop: 'http' needs app.url"),
        ({"stop": "exec"}, r"app.stop: 'exec' needs app.command"),
        ({"stop": "exec", "command": "nginx -s quit"}, r"app.command: .* must be a non-empty list"),
        ({"signal": "TERM"}, r"app.signal: 'TERM' must be a signal name such as SIGTERM"),
        ({"stop": "signal", "process": "("}, r"app.process: '\(' is not a valid regular expr"),
        ({"url": "http://127.0.0.1/quit"}, r"app.url: .* is only used with app.stop: http"),
        ({"stop": "http", "url": "ftp://x/"}, r"app.url: 'ftp://x/' must be an http:// or https"),
        ({"stop": "kill"}, r"app.stop: 'kill' must be one of prestop, signal, http, exec, none"),
    ],
)
def test_app_config_errors_name_the_field(app: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"app": app})
