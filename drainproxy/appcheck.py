"""Is the app reachable? A TCP connect, or an HTTP GET answered below 500, every interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from drainproxy.config import UpstreamConfig
from drainproxy.httpclient import HttpCallError, request_status
from drainproxy.tls import upstream_context

log = logging.getLogger("drainproxy.appcheck")


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
        while True:
            ok, error = await self.check_once()
            changed = ok != self.reachable
            self.reachable = ok
            self.last_error = error
            if changed:
                log.info("app %s", "reachable" if ok else f"unreachable: {error}")
            self.on_checked(ok)
            await asyncio.sleep(self.config.check.interval)

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
