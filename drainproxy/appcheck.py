"""Is the app reachable? A TCP connect, or an HTTP GET answered below 500, every interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from drainproxy.config import UpstreamConfig

log = logging.getLogger("drainproxy.appcheck")


class AppProbe:
    def __init__(self, config: UpstreamConfig, on_change: Callable[[bool], None]) -> None:
        self.config = config
        self.on_change = on_change
        self.reachable = False
        self.last_error = "not checked yet"
        self._fresh_needed = False
        self._task: asyncio.Task[None] | None = None
        self._checked = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def require_fresh_success(self) -> None:
        """After a preStop release the old app may still answer: only a check that starts from
        now on may report it ready again."""
        self._fresh_needed = True

    async def _run(self) -> None:
        while True:
            fresh_needed_at_start = self._fresh_needed
            ok, error = await self.check_once()
            if self._fresh_needed and not fresh_needed_at_start:
                ok = False  # this check began before the release: it proves nothing
            elif ok:
                self._fresh_needed = False
            changed = ok != self.reachable
            self.reachable = ok
            self.last_error = error
            if changed:
                log.info("app %s", "reachable" if ok else f"unreachable: {error}")
            self.on_change(ok)
            await asyncio.sleep(self.config.check.interval)

    async def check_once(self) -> tuple[bool, str]:
        check = self.config.check
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.config.host, self.config.port), check.timeout
            )
        except (OSError, TimeoutError) as exc:
            return False, _describe(exc)
        try:
            if check.kind == "tcp":
                return True, ""
            request = (
                f"GET {check.path} HTTP/1.1\r\nHost: {self.config.host}:{self.config.port}\r\n"
                "User-Agent: drainproxy-check\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode())
            status_line = await asyncio.wait_for(reader.readline(), check.timeout)
            parts = status_line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                return False, f"invalid response to GET {check.path}"
            status = int(parts[1])
            if status >= 500:
                return False, f"GET {check.path} answered {status}"
            return True, ""
        except (OSError, TimeoutError) as exc:
            return False, _describe(exc)
        finally:
            writer.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
