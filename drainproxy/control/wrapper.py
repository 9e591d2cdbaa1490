"""Wrapper mode: one container, with drainproxy as its PID 1 and the app as its child.

Many images start the app from a ``run.sh`` that runs as PID 1, never passes SIGTERM on and
never reaps orphans. ``drainproxy wrap -- CMD ARGS...`` takes over PID 1's duties:

* CMD starts in its own process group and inherits stdin, stdout and stderr, so the app's lines
  pass through untouched (drainproxy's own lines say "drainproxy").
* Every child is reaped, also orphans re-parented to us: as PID 1 of a PID namespace, or else as a
  child subreaper (prctl PR_SET_CHILD_SUBREAPER).
* SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGTTIN and SIGTTOU are forwarded to the child unchanged
  (reloads, log reopening, gunicorn's worker scaling).
* SIGTERM or SIGINT drain as in ``serve``, then ``app.signal`` goes to the child's process group,
  which is killed after ``app.stop_timeout``. drainproxy exits with the child's status
  (128 + the signal number when a signal ended it).
* If the child exits on its own, readiness fails and drainproxy exits at once with the child's
  status, so the kubelet restarts the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence

from drainproxy.config.schema import Config
from drainproxy.control.appstop import KILL_CONFIRM_SECONDS, signal_and_wait
from drainproxy.control.server import Server
from drainproxy.core.lifecycle import DrainSource, Phase
from drainproxy.errors import DrainproxyError

log = logging.getLogger("drainproxy.wrapper")

FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
#: Python ignores these; the child must start with the default actions (as subprocess does).
_RESET_TO_DEFAULT = (signal.SIGPIPE, signal.SIGXFSZ)
_PR_SET_CHILD_SUBREAPER = 36


class ChildStartError(DrainproxyError):
    """CMD cannot be started; ``exit_code`` follows the shell's convention (127, 126)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def run_wrapped(config: Config, command: Sequence[str], loop_name: str) -> int:
    """Start CMD, serve in front of it until the drain (or its own exit); its exit status."""
    loop = asyncio.get_running_loop()
    if os.getpid() != 1:
        _become_subreaper()
    pid = start_child(command)
    log.info("started the app, pid %d: %s", pid, list(command), extra={"event": "app_started"})
    reaper = Reaper(loop, pid)
    reaper.start()
    app_exit = reaper.app_exit
    for signum in FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, _forward, signum, pid, app_exit)
    server_status: int | None = None
    try:
        server = Server(config, loop_name)
        server.app_stop = WrappedAppStop(
            ChildGroup(pid, app_exit),
            signal.Signals[config.app.signal],
            config.app.stop_timeout,
            # The container ends with its app: once it is stopped, exit (never stay drained).
            on_stop=lambda: server.request_drain(DrainSource.SIGNAL),
        )
        app_exit.add_done_callback(lambda done: _app_exited(server, pid, done.result()))
        server_status = await server.run()
    finally:
        for signum in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signum)
        if not app_exit.done():
            log.warning("the app (pid %d) still runs: killing its process group", pid)
            _kill_group(pid, signal.SIGKILL)
            await asyncio.wait({app_exit}, timeout=KILL_CONFIRM_SECONDS)
    if not app_exit.done():
        raise DrainproxyError(f"the app (pid {pid}) did not exit after SIGKILL")
    status = app_exit.result()
    if status != server_status:  # the server has logged its own status already
        log.info("exiting with the app's status %d", status, extra={"event": "exit"})
    return status


def start_child(command: Sequence[str]) -> int:
    """posix_spawn, not subprocess: the reaper thread alone waits for children."""
    try:
        return os.posix_spawnp(
            command[0],
            list(command),
            os.environ,
            setpgroup=0,
            setsigdef=_RESET_TO_DEFAULT,
            setsigmask=(),
        )
    except FileNotFoundError:
        raise ChildStartError(f"cannot start {command[0]!r}: command not found", 127) from None
    except PermissionError:
        raise ChildStartError(f"cannot start {command[0]!r}: not executable", 126) from None


class Reaper:
    """Reaps every child in a thread blocked in waitpid(-1) and hands each exit to the loop;
    the app's exit status resolves ``app_exit``. (A thread, because uvloop keeps SIGCHLD.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, app_pid: int) -> None:
        self.loop = loop
        self.app_pid = app_pid
        self.app_exit: asyncio.Future[int] = loop.create_future()
        self._thread = threading.Thread(target=self._reap_forever, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _reap_forever(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                return  # no child left; the app was one, so drainproxy is exiting
            try:
                self.loop.call_soon_threadsafe(self._reaped, pid, exit_status(wait_status))
            except RuntimeError:
                return  # the loop has closed: drainproxy is exiting

    def _reaped(self, pid: int, status: int) -> None:
        if pid == self.app_pid:
            if not self.app_exit.done():
                self.app_exit.set_result(status)
        else:
            log.debug("reaped orphan pid %d (status %d)", pid, status, extra={"event": "reaped"})


def exit_status(wait_status: int) -> int:
    """A shell-style status: the exit code, or 128 + the signal number."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class ChildGroup:
    """The app's process group as a stop target; its exit is the group leader's."""

    def __init__(self, pid: int, app_exit: asyncio.Future[int]) -> None:
        self.pid = pid
        self.app_exit = app_exit
        self.name = f"the app's process group (pid {pid})"

    def send(self, signum: signal.Signals) -> None:
        _kill_group(self.pid, signum)

    async def wait_exited(self) -> str:
        status = await asyncio.shield(self.app_exit)
        return f"exited with status {status}"


class WrappedAppStop:
    """The stop method of wrapper mode: signal the child's group, SIGKILL after the timeout."""

    def __init__(
        self,
        target: ChildGroup,
        signum: signal.Signals,
        timeout: float,
        on_stop: Callable[[], object],
    ) -> None:
        self.target = target
        self.signum = signum
        self.timeout = timeout
        self.on_stop = on_stop

    def check(self) -> str:
        return f"wrapper: {self.signum.name} to {self.target.name}, SIGKILL after {self.timeout:g}s"

    async def stop(self) -> str:
        self.on_stop()
        if self.target.app_exit.done():
            return "app had exited already"
        return await signal_and_wait(self.target, self.signum, self.timeout, True)


def _app_exited(server: Server, pid: int, status: int) -> None:
    server.exit_code = status
    if server.lifecycle.phase not in (Phase.STOPPING_APP, Phase.STOPPED):
        log.error(
            "the app (pid %d) exited on its own with status %d: readiness fails, "
            "drainproxy exits with that status",
            pid,
            status,
            extra={"event": "app_exited"},
        )
        server.shutdown_now("the app exited on its own", status)


def _forward(signum: signal.Signals, pid: int, app_exit: asyncio.Future[int]) -> None:
    if app_exit.done():
        return  # the pid may already belong to another process
    log.info("forwarding %s to the app (pid %d)", signum.name, pid, extra={"event": "forward"})
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _kill_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _become_subreaper() -> None:
    """Not PID 1 (e.g. under tini or a test): orphans of the app would go to the real PID 1;
    as a child subreaper they come to us instead and are reaped the same way."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))
