"""Real processes and sockets for tests: the proxy as a subprocess, waited on through its logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from drainproxy.control.appstop import command_line
from drainproxy.sim.process import spawn_watched
from drainproxy.sim.replica import free_port as free_port  # re-exported for the tests

REPO = Path(__file__).resolve().parent.parent
START_LINE = re.compile(r"drainproxy \S+ on \S+ loop")


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def base_config(upstream_port: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "upstream": {
            "url": f"http://127.0.0.1:{upstream_port}",
            "check": {"interval": "100ms", "timeout": "500ms"},
        },
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "drain": {"propagation": "1s", "timeout": "5s", "idle_grace": "200ms"},
        "log": {"level": "debug"},
    }


def slow_app(
    release: asyncio.Event,
    started: asyncio.Event,
    *,
    fast_path: str = "/",
    fast_body: str = "fast",
) -> web.Application:
    """An app with a quick path and /slow, which sets ``started`` and holds its answer until
    ``release``: the in-flight request a drain has to wait for."""

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text=fast_body)

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get(fast_path, fast)
    app.router.add_get("/slow", slow)
    return app


def kill_wrapped_app(drainproxy_log: str, app_marker: str) -> None:
    """After a failure, ``drainproxy wrap`` may be killed before its child, which would live on
    and hold the output pipe open: SIGKILL the child it logged starting, if that is still the
    app (its command line contains ``app_marker``)."""
    found = re.search(r"started the app, pid (\d+):", drainproxy_log)
    if found and app_marker in (command_line(int(found.group(1))) or ""):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(found.group(1)), signal.SIGKILL)


class WatchedProcess:
    """A child process whose output (stdout and stderr together) is read line by line into
    ``log``, so tests wait on what it says."""

    def __init__(self, cmd: list[str], **popen: Any) -> None:
        self.proc, self.log = spawn_watched(cmd, **popen)

    async def exited(self, timeout: float = 60.0) -> int:
        """The exit status, once every line the process (and its children) wrote is read."""
        status = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self.log.join)
        return status

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class ProxyProcess(WatchedProcess):
    """drainproxy run as a real process, as the kubelet would run it."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        command: str = "serve",
        extra_args: Sequence[str] = (),
        launcher: Sequence[str] = (sys.executable, "-m", "drainproxy"),
    ) -> None:
        """Runs ``LAUNCHER COMMAND --config FILE EXTRA_ARGS`` with ``config`` written to FILE."""
        self.config = dict(config)
        self.config_path = workdir / f"drainproxy-{id(self)}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.port = int(str(config["listen"]).rpartition(":")[2])
        self.url = f"http://127.0.0.1:{self.port}"
        admin_port = int(str(config["admin"]["listen"]).rpartition(":")[2])
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        cmd = [*launcher, command, "--config", str(self.config_path), *extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        super().__init__(cmd, cwd=REPO, env=env, start_new_session=True)

    async def started(self) -> None:
        await self.log.wait(START_LINE.pattern, timeout=30)

    async def ready(self) -> None:
        await self.log.wait(r"app reachable", timeout=30)

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    async def status(self) -> dict[str, Any]:
        """GET /status, parsed (the answer must be JSON)."""
        async with aiohttp.ClientSession() as session, session.get(self.admin_url + "/status") as r:
            body: dict[str, Any] = await r.json()
            return body

    async def metrics_text(self) -> str:
        """GET /metrics as the exposition text."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin_url + "/metrics") as r,
        ):
            return await r.text()
