"""Wrapper mode: drainproxy starts the app (tests/fake_app.py) as its child, proxies to it, stops
it after the drain and exits with its status; as PID 1 of a PID namespace it reaps orphans and
forwards signals. PID 1 is real: ``unshare --pid --fork --mount-proc`` (util-linux, needs root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support import (
    REPO,
    ProxyProcess,
    base_config,
    deep_merge,
    free_port,
    kill_wrapped_app,
)
from tests.test_appstop import FAKE_APP, FAST_DRAIN

ORPHANS = 3


class Wrapped:
    """``drainproxy wrap -- python tests/fake_app.py ...`` as a process, optionally as PID 1."""

    def __init__(self, proxy: ProxyProcess, app_port: int, in_pid_namespace: bool) -> None:
        self.proxy = proxy
        self.app_port = app_port
        self.in_pid_namespace = in_pid_namespace
        self.pid = _only_child(proxy.proc.pid) if in_pid_namespace else proxy.proc.pid

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill_app_left_behind(self) -> None:
        """After a failure drainproxy may be killed before its child, which would keep the output
        pipe open (in a PID namespace, the kernel kills everything with PID 1)."""
        if not self.in_pid_namespace:
            kill_wrapped_app(self.proxy.log.text(), str(FAKE_APP))


@pytest.fixture
def wrapped_apps(proxies: list[ProxyProcess]) -> Iterator[list[Wrapped]]:
    started: list[Wrapped] = []
    yield started
    for wrapped in started:
        wrapped.kill_app_left_behind()


async def start_wrapped(
    tmp_path: Path,
    proxies: list[ProxyProcess],
    wrapped_apps: list[Wrapped],
    *app_args: str,
    overrides: dict[str, Any] | None = None,
    in_pid_namespace: bool = False,
) -> Wrapped:
    port = free_port()
    defaults = {"drain": FAST_DRAIN, "app": {"stop_timeout": "1s"}}
    config = deep_merge(deep_merge(base_config(port), defaults), overrides or {})
    launcher = [sys.executable, "-m", "drainproxy"]
    if in_pid_namespace:
        # --kill-child: if the test kills unshare, the namespace's PID 1 (drainproxy) dies too.
        launcher = ["unshare", "--pid", "--mount-proc", "--kill-child", *launcher]
    app_command = [sys.executable, str(FAKE_APP), "--port", str(port), *app_args]
    proxy = ProxyProcess(
        config, tmp_path, command="wrap", extra_args=["--", *app_command], launcher=launcher
    )
    proxies.append(proxy)
    await proxy.started()
    wrapped = Wrapped(proxy, port, in_pid_namespace)
    wrapped_apps.append(wrapped)
    await proxy.ready()
    return wrapped


def _only_child(pid: int) -> int:
    """The process unshare forked (PID 1 inside the namespace), as seen from outside."""
    children = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent_of(int(entry.name)) == pid
    ]
    assert len(children) == 1, children
    return children[0]


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return None


def _pid_inside_namespace(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    nspids = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    return int(nspids.split()[-1])


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def _no_pid_namespace_reason() -> str | None:
    if os.geteuid() != 0:
        return "unshare --pid needs root"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    return None


# --- exit status -----------------------------------------------------------------------------


async def test_wrap_proxies_drains_and_exits_with_the_apps_clean_exit(
    tmp_path: Path, proxies: list[ProxyProcess], wrapped_apps: list[Wrapped]
) -> None:
    wrapped = await start_wrapped(tmp_path, proxies, wrapped_apps, "--exit-on", "SIGTERM")
    assert await get(wrapped.proxy.url + "/") == (200, "hello from fake app\n")
    wrapped.send(signal.SIGTERM)
    assert await wrapped.proxy.exited() == 0
    lines = wrapped.proxy.log.lines
    # The app's output passes through untouched; drainproxy's own lines say so.
    assert f"fake app: listening on {wrapped.app_port}, pid " in "\n".join(lines)
    assert "fake app: got SIGTERM, exiting" in lines
    assert all(" drainproxy " in line for line in lines if not line.startswith("fake app"))
    log = wrapped.proxy.log.text()
    assert log.index("phase draining -> stopping_app") < log.index("fake app: got SIGTERM")
    assert "sent SIGTERM to the app's process group" in log


async def test_wrap_exits_128_plus_the_signal_that_ended_the_app(
    tmp_path: Path, proxies: list[ProxyProcess], wrapped_apps: list[Wrapped]
) -> None:
    wrapped = await start_wrapped(tmp_path, proxies, wrapped_apps)
    wrapped.send(signal.SIGTERM)
    assert await wrapped.proxy.exited() == 128 + signal.SIGTERM


async def test_wrap_kills_an_app_ignoring_the_signal_after_stop_timeout(
    tmp_path: Path, proxies: list[ProxyProcess], wrapped_apps: list[Wrapped]
) -> None:
    overrides = {"app": {"signal": "SIGUSR2", "stop_timeout": "300ms"}}
    wrapped = await start_wrapped(
        tmp_path, proxies, wrapped_apps, "--ignore", "SIGUSR2", overrides=overrides
    )
    wrapped.send(signal.SIGTERM)
    assert await wrapped.proxy.exited() == 128 + signal.SIGKILL
    assert "ignored SIGUSR2 for 0.3s: sending SIGKILL" in wrapped.proxy.log.text()


async def test_wrap_exits_with_the_status_of_an_app_that_crashes_on_its_own(
    tmp_path: Path, proxies: list[ProxyProcess], wrapped_apps: list[Wrapped]
) -> None:
    wrapped = await start_wrapped(tmp_path, proxies, wrapped_apps)
    assert await get(wrapped.proxy.url + "/exit/3") == (200, "hello from fake app\n")
    await wrapped.proxy.log.wait(r"ERROR the app \(pid \d+\) exited on its own with status 3")
    await wrapped.proxy.log.wait(r"phase serving -> stopped \(the app exited on its own\)")
    assert await wrapped.proxy.exited() == 3


# --- PID 1 -----------------------------------------------------------------------------------


async def test_wrap_as_pid_1_reaps_orphans_and_forwards_signals(
    tmp_path: Path, proxies: list[ProxyProcess], wrapped_apps: list[Wrapped]
) -> None:
    if reason := _no_pid_namespace_reason():
        pytest.skip(reason)
    report = ["--report", "SIGHUP", "--report", "SIGUSR1", "--report", "SIGWINCH"]
    wrapped = await start_wrapped(
        tmp_path, proxies, wrapped_apps, "--exit-on", "SIGTERM", *report, in_pid_namespace=True
    )
    assert _pid_inside_namespace(wrapped.pid) == 1
    log = wrapped.proxy.log
    # Orphans of the app are re-parented to PID 1, which must reap them.
    assert await get(f"{wrapped.proxy.url}/orphans/{ORPHANS}") == (200, "hello from fake app\n")
    orphans = (await log.wait(r"^fake app: left orphans ([\d ]+)$")).group(1).split()
    assert len(orphans) == ORPHANS
    for orphan in orphans:
        await log.wait(rf"reaped orphan pid {orphan} \(status 0\)")
    assert _zombies_under(wrapped.pid) == []
    # Signals the app uses for reloads and such reach it unchanged; drainproxy keeps serving.
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGWINCH):
        wrapped.send(signum)
        await log.wait(rf"^fake app: got {signum.name}$")
    assert await get(wrapped.proxy.url + "/") == (200, "hello from fake app\n")
    wrapped.send(signal.SIGTERM)
    assert await wrapped.proxy.exited() == 0
    assert "fake app: got SIGTERM, exiting" in log.lines


def _zombies_under(parent: int) -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if stat[0] == "Z" and int(stat[1]) == parent:
            zombies.append(int(entry.name))
    return zombies


# --- bad input -------------------------------------------------------------------------------


def run_cli(
    *args: str, config: dict[str, Any] | None, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "wrap.yaml"
    path.write_text(yaml.safe_dump({"upstream": "http://127.0.0.1:8000", **(config or {})}))
    return subprocess.run(
        [sys.executable, "-m", "drainproxy", "wrap", "--config", str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )


def test_wrap_rejects_an_app_stop_it_would_ignore(tmp_path: Path) -> None:
    config = {"app": {"stop": "http", "url": "http://127.0.0.1:1/quit"}}
    result = run_cli("--", "true", config=config, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "app.stop: 'http' is not used in wrapper mode" in result.stderr


def test_wrap_without_a_command_or_with_a_missing_one(tmp_path: Path) -> None:
    result = run_cli(config={}, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "the app's command is missing" in result.stderr
    result = run_cli("--", "no-such-program-x", config={}, tmp_path=tmp_path)
    assert result.returncode == 127
    assert "cannot start 'no-such-program-x': command not found" in result.stderr
