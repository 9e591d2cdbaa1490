"""Is the app reachable? A TCP connect, or an HTTP GET answered below 500, every interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

from drainproxy.config.schema import UpstreamConfig, format_duration
from drainproxy.control.httpclient import HttpCallError, request_status
from drainproxy.system.tls import upstream_context

log = logging.getLogger("drainproxy.appcheck")

#: While the app stays unreachable, the log says so again this often (issue 15: a pod that just
#: stays unready, with nothing in the log, is a puzzle).
UNREACHABLE_REPEAT = 30.0

Report = Literal["reachable", "unreachable", "still unreachable"]


class ReachabilityLog:
    """Which app check results are worth a log line: the first, every change, and while the app
    stays unreachable one every ``repeat`` seconds. Pure: the caller passes the time."""

    def __init__(self, repeat: float = UNREACHABLE_REPEAT) -> None:
        self.repeat = repeat
        self._reachable: bool | None = None
        self._since = 0.0
        self._logged_at = 0.0

    def observe(self, reachable: bool, now: float) -> Report | None:
        if reachable != self._reachable:
            self._reachable, self._since, self._logged_at = reachable, now, now
            return "reachable" if reachable else "unreachable"
        if not reachable and now - self._logged_at >= self.repeat:
            self._logged_at = now
            return "still unreachable"
        return None

    def unreachable_for(self, now: float) -> float:
        """Seconds since the app was last seen reachable (or since the first check)."""
        return now - self._since


class AppProbe:
    def __init__(self, config: UpstreamConfig, on_checked: Callable[[bool], None]) -> None:
        self.config = config
        self.on_checked = on_checked
        self.reachable = False
        self.last_error = "not checked yet"
        self._task: asyncio.Task[None] | None = None
        # An HTTP check of an https app speaks TLS, as the data path does.
        tls = config.tls if config.check.kind == "http" else None
        self._ssl = upstream_context(tls) if tls is not None else None
        self._server_hostname = (tls.server_name or config.host) if tls is not None else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        reports = ReachabilityLog()
        loop = asyncio.get_running_loop()
        while True:
            ok, error = await self.check_once()
            self.reachable = ok
            self.last_error = error
            self._log(reports.observe(ok, loop.time()), error, reports.unreachable_for(loop.time()))
            self.on_checked(ok)
            await asyncio.sleep(self.config.check.interval)

    def _log(self, report: Report | None, error: str, down_for: float) -> None:
        url, check = self.config.url, self.config.check
        how = f"GET {check.path}" if check.kind == "http" else "a TCP connect"
        extra = {"event": "app_check", "url": url}
        if report == "reachable":
            log.info("app reachable at %s", url, extra=extra)
        elif report == "unreachable":
            log.warning(
                "app unreachable at %s: %s; /ready answers 503 until it answers (%s every %s)",
                url,
                error,
                how,
                format_duration(check.interval),
                extra=extra,
            )
        elif report == "still unreachable":
            log.warning(
                "app still unreachable at %s after %s: %s",
                url,
                format_duration(round(down_for)),
                error,
                extra=extra,
            )

    async def check_once(self) -> tuple[bool, str]:
        check = self.config.check
        if check.kind == "http":
            try:
                status = await request_status(
                    self.config.host,
                    self.config.port,
                    "GET",
                    check.path,
                    check.timeout,
                    tls=self._ssl,
                    server_hostname=self._server_hostname,
                    user_agent="drainproxy-check",
                )
            except HttpCallError as exc:
                return False, str(exc)
            if status >= 500:
                return False, f"GET {check.path} answered {status}"
            return True, ""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.config.host, self.config.port), check.timeout
            )
        except (OSError, TimeoutError) as exc:
            return False, _describe(exc)
        writer.close()
        return True, ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
