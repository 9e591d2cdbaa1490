"""Stopping the app once the drain is over, in whatever way the pod allows (``app.stop``).

One stop method runs first, then the waiting ``GET /prestop`` calls are always released
(``stop_then_release``): the app gets the signal it understands (SIGQUIT for nginx...) before the
kubelet's SIGTERM, which follows the release; and whatever happened, the app container's
preStop hook must not hang until the grace period ends. Each method answers two calls:

* ``check()`` once the app first answers: can the app be found, and may we stop it? A wrong
  pidfile, a regex matching nothing or several processes, or a missing permission must show up
  when the pod starts, not at its first rollout. Returns what will happen, for the log.
* ``stop()`` at drain time, bounded by ``app.stop_timeout``: returns a short outcome (also a
  metric label, so details go to the log); raises AppStopError with a one-line reason.

``signal`` reaches a sibling container's process through a shared process namespace
(``shareProcessNamespace: true``). The process is held by a pidfd, so a recycled pid can never
receive our signal, and its exit is awaited as an event (a pidfd becomes readable when the
process exits), not polled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from drainproxy.config.schema import AppConfig
from drainproxy.control.httpclient import HttpCallError, request_url_status
from drainproxy.errors import DrainproxyError
from drainproxy.system.processes import until_exited

log = logging.getLogger("drainproxy.appstop")

#: After SIGKILL a process is gone within milliseconds unless stuck in the kernel; this bound
#: stays inside the grace-period margin (config.GRACE_MARGIN).
KILL_CONFIRM_SECONDS = 1.0
#: At most this many lines of an ``app.command``'s output are logged.
OUTPUT_LINES_LOGGED = 50
OUTPUT_BYTES_KEPT = 65536
_SHOWN_COMMAND_LINE = 120


class AppStopError(DrainproxyError):
    """The app cannot be found, reached or stopped as configured; the message is one line."""


class StopMethod(Protocol):
    def check(self) -> str: ...

    async def stop(self) -> str: ...


async def stop_then_release(release: Callable[[], Awaitable[str]], method: StopMethod) -> str:
    """Run the configured method, then release the waiting preStop calls, whatever happened."""
    try:
        stopped = await method.stop()
    except AppStopError as exc:
        log.error("%s", exc, extra={"event": "app_stop_failed"})
        stopped = "app not stopped"
    released = await release()
    return f"{stopped}; {released}" if stopped else released


def stop_method_for(config: AppConfig) -> StopMethod:
    if config.stop == "signal":
        return SignalStop(
            ProcessFinder(config.pidfile, config.process),
            signal.Signals[config.signal],
            config.stop_timeout,
            config.kill_after_timeout,
        )
    if config.stop == "http":
        assert config.url is not None
        return HttpStop(config.url, config.method, config.stop_timeout)
    if config.stop == "exec":
        assert config.command is not None
        return ExecStop(config.command, config.stop_timeout)
    if config.stop == "none":
        return NothingMore("none: the app is not stopped by drainproxy")
    return NothingMore("prestop: the kubelet stops the app once its preStop hook returns")


class NothingMore:
    """``prestop`` and ``none``: releasing the preStop calls is all there is to do."""

    def __init__(self, plan: str) -> None:
        self.plan = plan

    def check(self) -> str:
        return self.plan

    async def stop(self) -> str:
        return ""


# --- signal: a process in the shared process namespace ---------------------------------------


class SignalTarget(Protocol):
    """Something that can be signalled and whose exit can be awaited."""

    name: str

    def send(self, signum: signal.Signals) -> None: ...

    async def wait_exited(self) -> str:
        """Wait until it has exited (cancel-safe, may be awaited again); says how it ended."""
        ...


async def signal_and_wait(
    target: SignalTarget, signum: signal.Signals, timeout: float, kill_after_timeout: bool
) -> str:
    """Send ``signum``, wait ``timeout`` for the exit, then SIGKILL if allowed."""
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    target.send(signum)
    log.info("sent %s to %s; waiting up to %gs for it to exit", signum.name, target.name, timeout)
    try:
        ended = await asyncio.wait_for(target.wait_exited(), timeout)
    except TimeoutError:
        pass
    else:
        log.info("%s %s %.3fs after %s", target.name, ended, loop.time() - sent_at, signum.name)
        return f"app exited after {signum.name}"
    if not kill_after_timeout:
        raise AppStopError(
            f"{target.name} still runs {timeout:g}s after {signum.name}; not killed "
            "(app.kill_after_timeout is false)"
        )
    log.warning("%s ignored %s for %gs: sending SIGKILL", target.name, signum.name, timeout)
    target.send(signal.SIGKILL)
    try:
        ended = await asyncio.wait_for(target.wait_exited(), KILL_CONFIRM_SECONDS)
    except TimeoutError:
        raise AppStopError(
            f"{target.name} still runs {KILL_CONFIRM_SECONDS:g}s after SIGKILL"
        ) from None
    log.info("%s %s after SIGKILL", target.name, ended)
    return f"app killed after {signum.name} timed out"


class ProcessFinder:
    """Finds the app by ``app.pidfile`` or by ``app.process`` matched against command lines.

    Exactly one process may match, never drainproxy itself or one of its ancestors (in a shared
    process namespace a pattern like ``python`` would otherwise also match us, and PID 1 is the
    pod's pause process)."""

    def __init__(self, pidfile: str | None, pattern: str | None) -> None:
        self.pidfile = pidfile
        self.pattern = re.compile(pattern) if pattern is not None else None

    def find(self) -> int:
        if self.pidfile is not None:
            return self._from_pidfile(self.pidfile)
        assert self.pattern is not None
        return self._from_command_lines(self.pattern)

    def _from_pidfile(self, pidfile: str) -> int:
        try:
            text = Path(pidfile).read_text().strip()
        except OSError as exc:
            raise AppStopError(f"app.pidfile: {pidfile} cannot be read: {exc.strerror}") from None
        if not text.isdigit() or int(text) <= 0:
            raise AppStopError(f"app.pidfile: {pidfile} holds {text[:40]!r}, not a process id")
        pid = int(text)
        if pid in own_lineage():
            raise AppStopError(f"app.pidfile: {pidfile} names pid {pid}: drainproxy or its parent")
        if command_line(pid) is None:
            raise AppStopError(f"app.pidfile: {pidfile} names pid {pid}, which is not running")
        return pid

    def _from_command_lines(self, pattern: re.Pattern[str]) -> int:
        excluded = own_lineage()
        matches: list[tuple[int, str]] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in excluded:
                continue
            line = command_line(int(entry.name))
            if line and pattern.search(line):
                matches.append((int(entry.name), line))
        if len(matches) == 1:
            return matches[0][0]
        where = f"app.process: {pattern.pattern!r}"
        if not matches:
            raise AppStopError(
                f"{where} matches no process (drainproxy and its parents excluded); "
                "is shareProcessNamespace: true set, and is the app running?"
            )
        shown = ", ".join(f"pid {pid} {_shorten(line)!r}" for pid, line in sorted(matches)[:5])
        raise AppStopError(
            f"{where} matches {len(matches)} processes ({shown}); it must match exactly one: "
            "make the expression more specific, e.g. anchor it with ^"
        )


def command_line(pid: int) -> str | None:
    """The process's arguments joined by spaces; "" for kernel threads and zombies; None when
    the process does not exist (or cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def own_lineage() -> set[int]:
    """drainproxy's pid and its ancestors' pids."""
    lineage: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in lineage:
        lineage.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        # Fields after the command name (which may hold spaces and parentheses): state, ppid.
        pid = int(stat.rpartition(")")[2].split()[1])
    return lineage


def _shorten(line: str) -> str:
    return line if len(line) <= _SHOWN_COMMAND_LINE else line[: _SHOWN_COMMAND_LINE - 3] + "..."


class SiblingProcess:
    """A process of another container, held by a pidfd (no pid-reuse race, exit as an event)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.name = f"pid {pid} ({_shorten(command_line(pid) or '?')})"
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise AppStopError(f"{self.name} is not running") from None

    def close(self) -> None:
        os.close(self._fd)

    def send(self, signum: signal.Signals) -> None:
        try:
            signal.pidfd_send_signal(self._fd, signum)
        except PermissionError:
            raise AppStopError(self._permission_denied(signum)) from None
        except ProcessLookupError:
            pass  # exited already: wait_exited() returns at once

    def check_permission(self, signum: signal.Signals) -> None:
        """Signal 0 checks that we may send ``signum``, without sending anything."""
        try:
            signal.pidfd_send_signal(self._fd, 0)
        except PermissionError:
            raise AppStopError(self._permission_denied(signum)) from None
        except ProcessLookupError:
            raise AppStopError(f"{self.name} is not running") from None

    async def wait_exited(self) -> str:
        await until_exited(self._fd)
        return "exited"

    def _permission_denied(self, signum: signal.Signals) -> str:
        try:
            owner = f"uid {os.stat(f'/proc/{self.pid}').st_uid}"
        except OSError:
            owner = "another user"
        return (
            f"app.signal: cannot send {signum.name} to {self.name}, which runs as {owner}, "
            f"from uid {os.geteuid()}: sending a signal needs the same UID or CAP_KILL "
            "(run drainproxy as the app's user, or add KILL to its securityContext capabilities)"
        )


class SignalStop:
    def __init__(
        self,
        finder: ProcessFinder,
        signum: signal.Signals,
        timeout: float,
        kill_after_timeout: bool,
    ) -> None:
        self.finder = finder
        self.signum = signum
        self.timeout = timeout
        self.kill_after_timeout = kill_after_timeout

    def check(self) -> str:
        target = SiblingProcess(self.finder.find())
        try:
            target.check_permission(self.signum)
        finally:
            target.close()
        return f"signal: {self.signum.name} to {target.name}"

    async def stop(self) -> str:
        # Found again: the app may have restarted since start-up.
        target = SiblingProcess(self.finder.find())
        try:
            return await signal_and_wait(target, self.signum, self.timeout, self.kill_after_timeout)
        finally:
            target.close()


# --- http and exec -------------------------------------------------------------------------


class HttpStop:
    """Ask the app over HTTP (e.g. ``POST /quitquitquit``); any 2xx answer means accepted."""

    def __init__(self, url: str, method: str, timeout: float) -> None:
        self.url = url
        self.method = method
        self.timeout = timeout

    def check(self) -> str:
        return f"http: {self.method} {self.url}"  # calling it now would stop the app

    async def stop(self) -> str:
        call = f"app.url: {self.method} {self.url}"
        try:
            status = await request_url_status(self.method, self.url, self.timeout)
        except HttpCallError as exc:
            if exc.timed_out:
                raise AppStopError(f"{call} got no answer within {self.timeout:g}s") from None
            raise AppStopError(f"{call} failed: {exc}") from None
        if not 200 <= status < 300:
            raise AppStopError(f"{call} answered {status}: the stop was not accepted")
        log.info("%s answered %d: accepted", call, status)
        return "http stop accepted"


class ExecStop:
    """Run ``app.command`` (no shell), bounded by ``app.stop_timeout``; log status and output."""

    def __init__(self, command: tuple[str, ...], timeout: float) -> None:
        self.command = command
        self.timeout = timeout

    def check(self) -> str:
        if shutil.which(self.command[0]) is None:
            raise AppStopError(
                f"app.command: {self.command[0]!r} is not an executable program here "
                "(it runs in drainproxy's container, searched on PATH)"
            )
        return f"exec: {list(self.command)}"

    async def stop(self) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        shown = f"app.command {list(self.command)}"
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group, so a timeout kills what it started
            )
        except OSError as exc:
            raise AppStopError(f"{shown} cannot start: {exc.strerror}") from None
        assert process.stdout is not None
        output: list[bytes] = []
        collector = asyncio.ensure_future(_collect(process.stdout, output))
        try:
            status = await asyncio.wait_for(process.wait(), self.timeout)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise AppStopError(f"{shown} did not finish within {self.timeout:g}s: killed") from None
        finally:
            # Output stays open while a background child holds the pipe: bounded by the deadline.
            await asyncio.wait({collector}, timeout=max(0.0, deadline - loop.time()))
            collector.cancel()
            _log_output(shown, b"".join(output))
        if status != 0:
            raise AppStopError(f"{shown} exited with status {status}")
        log.info("%s exited with status 0", shown)
        return "command succeeded"


async def _collect(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    kept = 0
    while chunk := await stream.read(65536):
        if kept < OUTPUT_BYTES_KEPT:
            into.append(chunk)
            kept += len(chunk)


def _log_output(shown: str, output: bytes) -> None:
    lines = output.decode(errors="replace").splitlines()
    for line in lines[:OUTPUT_LINES_LOGGED]:
        log.info("%s output: %s", shown, line)
    if len(lines) > OUTPUT_LINES_LOGGED:
        log.info("%s output: (%d more lines)", shown, len(lines) - OUTPUT_LINES_LOGGED)
