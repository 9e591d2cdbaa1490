"""HAProxy as the load balancer in front of the replicas, health-checking each one's readiness
endpoint the way a cloud balancer or ingress controller would, with retries and redispatch off
so that every failure reaches the client."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backend:
    name: str
    port: int
    check_port: int
    check_path: str


def states_reached(states: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Every named server is in its wanted state; a prefix is enough (HAProxy's "UP 1/2", up
    with one failed check so far, is still UP)."""
    return all(states.get(name, "").startswith(state) for name, state in wanted.items())


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


@dataclass(eq=False)
class HealthCheckedBalancer:
    """What either balancer is given: its port, the replicas, and how it checks them (every
    ``check_interval`` seconds; ``fall`` failures in a row mark one DOWN, ``rise`` successes UP)."""

    port: int
    backends: list[Backend]
    check_interval: float = 0.2
    fall: int = 2
    rise: int = 2


@dataclass(eq=False)
class HAProxy(HealthCheckedBalancer):
    #: ``proto`` on the server lines: ``h2`` has HAProxy speak HTTP/2 to the replicas (the
    #: readiness checks stay HTTP/1.1: the admin listener speaks no HTTP/2).
    server_proto: str | None = None

    def __post_init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="drainproxy-haproxy-"))
        self.socket_path = self._dir / "admin.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        inter = f"{int(self.check_interval * 1000)}ms"
        proto = f" proto {self.server_proto} check-proto h1" if self.server_proto else ""
        servers = "\n".join(
            f"    server {b.name} 127.0.0.1:{b.port} check port {b.check_port}{proto}"
            for b in self.backends
        )
        paths = {b.check_path for b in self.backends}
        assert len(paths) == 1, "one check path for all backends"
        return f"""global
    stats socket {self.socket_path} mode 600 level admin
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    retries 0
    no option redispatch

frontend web
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET {paths.pop()}
    http-check expect status 200
    default-server inter {inter} fall {self.fall} rise {self.rise}
{servers}
"""

    def start(self) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (apt-get install haproxy)")
        config = self._dir / "haproxy.cfg"
        config.write_text(self.config_text())
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def server_states(self) -> dict[str, str]:
        """Each backend server's status (UP, DOWN...) from the stats socket."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        writer.write(b"show stat\n")
        data = await reader.read()
        writer.close()
        states: dict[str, str] = {}
        lines = data.decode().splitlines()
        if not lines:
            return states
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "replicas" and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = row.get("status", "")
        return states

    async def wait_for_states(self, wanted: dict[str, str], timeout: float = 20.0) -> None:
        """Wait until the named servers report the wanted statuses (checked each interval)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    states = await self.server_states()
                except OSError:
                    states = {}
                if states_reached(states, wanted):
                    return
                await asyncio.sleep(self.check_interval / 2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
