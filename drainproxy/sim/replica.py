"""One replica of a pod as processes on this machine: the legacy app, and optionally drainproxy in
front of it as a classic sidecar (the app container's preStop calls drainproxy's /prestop)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drainproxy.sim.kubelet import Container, HttpGetHook
from drainproxy.sim.process import LogWatcher, spawn_watched

TOKEN = "replica-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Replica:
    name: str
    workdir: Path
    with_drainproxy: bool = True
    drain: Mapping[str, Any] = field(default_factory=lambda: {"propagation": "2s"})
    grace_period: float = 15.0
    extra_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.app_port = free_port()
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.app: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_log: LogWatcher | None = None
        self.app_log: LogWatcher | None = None

    @property
    def serving_port(self) -> int:
        return self.proxy_port if self.with_drainproxy else self.app_port

    @property
    def check_port(self) -> int:
        return self.admin_port if self.with_drainproxy else self.app_port

    @property
    def check_path(self) -> str:
        return "/ready" if self.with_drainproxy else "/healthz"

    def proxy_config(self) -> dict[str, Any]:
        return {
            "listen": f"127.0.0.1:{self.proxy_port}",
            "upstream": {
                "url": f"http://127.0.0.1:{self.app_port}",
                "check": {"interval": "100ms"},
            },
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", "token": TOKEN},
            "drain": dict(self.drain),
            "termination_grace_period": self.grace_period,
            **self.extra_config,
        }

    def app_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "drainproxy.sim.sample_app",
            "--port",
            str(self.app_port),
            "--name",
            self.name,
        ]

    def write_config(self) -> Path:
        """This replica's drainproxy config, written to a file in ``workdir``."""
        config = self.workdir / f"{self.name}-drainproxy.yaml"
        config.write_text(yaml.safe_dump(self.proxy_config()))
        return config

    def drainproxy_command(self, mode: str) -> list[str]:
        """``drainproxy MODE --config FILE`` with this replica's config written to FILE."""
        return [sys.executable, "-m", "drainproxy", mode, "--config", str(self.write_config())]

    def launch(self, role: str, command: list[str]) -> tuple[subprocess.Popen[bytes], LogWatcher]:
        """Start one of the pod's containers (``role`` is "app" or "drainproxy"): here a process."""
        return spawn_watched(command)

    def start(self) -> None:
        self.app, self.app_log = self.launch("app", self.app_command())
        if self.with_drainproxy:
            self.proxy, self.proxy_log = self.launch("drainproxy", self.drainproxy_command("serve"))

    async def started(self, timeout: float = 30.0) -> None:
        assert self.app_log is not None
        await self.app_log.wait(r"listening on", timeout)
        if self.proxy_log is not None:
            await self.proxy_log.wait(r"app reachable", timeout)

    def containers(self) -> list[Container]:
        """The pod's containers as the kubelet sees them."""
        assert self.app is not None
        hook = (
            HttpGetHook(self.admin_port, "/prestop", headers={"X-Drainproxy-Token": TOKEN})
            if self.with_drainproxy
            else None
        )
        containers = [Container("app", self.app, pre_stop=hook)]
        if self.proxy is not None:
            containers.append(Container("drainproxy", self.proxy))
        return containers

    def stop(self) -> None:
        for process in (self.proxy, self.app):
            if process is not None and process.poll() is None:
                process.kill()
            if process is not None:
                process.wait()
        for watcher, process in ((self.proxy_log, self.proxy), (self.app_log, self.app)):
            if watcher is not None:
                watcher.join()
            if process is not None and process.stdout is not None:
                process.stdout.close()
