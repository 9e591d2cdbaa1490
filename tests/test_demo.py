"""``drainproxy demo`` end to end as a real process, its built-in balancer, and Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from drainproxy.sim.builtin_lb import BuiltinBalancer
from drainproxy.sim.haproxy import Backend
from drainproxy.sim.process import LogWatcher
from tests.conftest import StartApp
from tests.support import REPO, free_port


class Demo:
    """``drainproxy demo`` in its own session, so the test can find anything it leaves behind."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "drainproxy", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        self.out = LogWatcher(self.proc.stdout)
        self.err = LogWatcher(self.proc.stderr)

    async def exited(self, timeout: float = 60.0) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        self.out.join()
        self.err.join()
        return code

    def left_behind(self) -> list[str]:
        """Processes still in the demo's session (its pid is the session id)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited while we looked
            if int(fields[3]) == self.proc.pid:
                found.append(stat.parent.name)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.stop()


def table_row(text: str, name: str) -> list[str]:
    match = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)$", text, re.MULTILINE)
    assert match, f"no {name!r} row in:\n{text}"
    return [match.group(1), match.group(2)]


async def test_short_demo_reports_real_requests(tmp_path: Path, demos: list[Demo]) -> None:
    svg, report_path = tmp_path / "timeline.svg", tmp_path / "report.json"
    demo = Demo(
        "--short", "--rate", "80", "--balancer", "builtin",
        "--svg", str(svg), "--json", str(report_path),
    )  # fmt: skip
    demos.append(demo)
    assert await demo.exited() == 0, demo.out.text() + demo.err.text()
    output = demo.out.text()
    report: dict[str, Any] = json.loads(report_path.read_text())

    assert report["balancer"] == "builtin"
    assert "the built-in balancer" in output
    without, with_drainproxy = report["runs"]
    assert (without["with_drainproxy"], with_drainproxy["with_drainproxy"]) == (False, True)
    # With drainproxy nothing is lost; without it the same deletion fails requests, which
    # proves the demo can show a failure.
    assert with_drainproxy["failed"] == 0, with_drainproxy["failures"]
    assert without["failed"] > 0
    for run in report["runs"]:
        # Every request was answered by one of the two real app replicas, or failed.
        served = run["served_by"]
        assert sorted(served) == ["replica-1", "replica-2"]
        assert min(served.values()) > 0, run
        assert sum(served.values()) + run["failed"] == run["requests"]
    assert {"propagating", "stopped"} <= {p["phase"] for p in with_drainproxy["phases"]}
    # The same load window after the deletion in both runs (issue 12: it used to end 2 s after
    # the replica was gone, 0 s into the run without drainproxy).
    for run in report["runs"]:
        assert (
            run["load_window_seconds"] >= report["load_until_seconds"] > run["replica_gone_seconds"]
        ), run
    # The whole sequence: propagation ends early on the balancer's evidence, the slow requests
    # in flight at the deletion are answered (they fail without drainproxy), and "failed" is
    # broken down by what the client saw.
    assert with_drainproxy["propagation_ended"]["reason"].startswith("evidence: 1 prober(s)")
    in_flight = with_drainproxy["slow_in_flight_at_deletion"]
    assert in_flight["sent"] >= 1 and in_flight["answered"] == in_flight["sent"], in_flight
    assert without["slow_in_flight_at_deletion"]["answered"] == 0
    for run in report["runs"]:
        assert sum(run["failed_by_kind"].values()) == run["failed"]
    assert set(without["failed_by_kind"]) <= {
        "closed without a response",
        "connection reset",
    }, without["failed_by_kind"]
    assert re.search(r"^propagation ended\s+-\s+evidence \d+\.\ds$", output, re.M), output
    assert re.search(r"^  \+ *\d+\.\ds  a slow request in flight is answered$", output, re.M)
    assert re.search(r"^  failed: \d+ ", output, re.M), "the kinds behind the failures"
    assert [(c["name"], c["killed"], c["returncode"]) for c in with_drainproxy["containers"]] == [
        ("app", False, -signal.SIGTERM),
        ("drainproxy", False, 0),
    ]

    # The printed table and timeline show the same numbers.
    assert table_row(output, "requests") == [
        str(without["requests"]),
        str(with_drainproxy["requests"]),
    ]
    assert table_row(output, "failed") == [str(without["failed"]), "0"]
    assert re.search(r"^  phase  s+p+.*x+\s*$", output, re.MULTILINE), output
    assert "== Deleting a replica without drainproxy ==" in output
    assert re.search(r"\d+ requests, 0 failed, replica-1 drainproxy: (?!serving)\w+", output)

    root = ET.fromstring(svg.read_text())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    titles = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert f"with drainproxy: {with_drainproxy['requests']} requests, 0 failed" in " ".join(titles)
    assert demo.left_behind() == []


async def test_ctrl_c_stops_everything_the_demo_started(demos: list[Demo], tmp_path: Path) -> None:
    demo = Demo("--short", "--rate", "50", "--svg", str(tmp_path / "never.svg"))
    demos.append(demo)
    # Interrupt while the replicas, the balancer and the load all run.
    await demo.out.wait(r"deleting replica-1")
    assert demo.left_behind(), "the demo should be running replicas now"
    demo.proc.send_signal(signal.SIGINT)
    assert await demo.exited() == 130
    assert "interrupted" in demo.err.text()
    assert demo.left_behind() == []
    assert not (tmp_path / "never.svg").exists()


async def test_builtin_balancer_follows_health_checks(start_app: StartApp) -> None:
    ready = {"a": True, "b": True}

    def replica(name: str) -> web.Application:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text=name)

        async def check(request: web.Request) -> web.Response:
            return web.Response(status=200 if ready[name] else 503)

        app = web.Application()
        app.router.add_get("/", hello)
        app.router.add_get("/ready", check)
        return app

    ports = {name: await start_app(replica(name)) for name in ready}
    backends = [Backend(name, port, port, "/ready") for name, port in ports.items()]
    backends.append(Backend("gone", free_port(), free_port(), "/ready"))
    balancer = BuiltinBalancer(free_port(), backends, check_interval=0.05)
    balancer.start()
    try:
        await balancer.wait_for_states({"a": "UP", "b": "UP"})
        assert (await balancer.server_states())["gone"] == "DOWN"
        # One request per connection: new connections take turns among the replicas UP.
        assert {await fetch(balancer.port) for _ in range(4)} == {"a", "b"}

        ready["a"] = False
        await balancer.wait_for_states({"a": "DOWN"})
        assert {await fetch(balancer.port) for _ in range(4)} == {"b"}

        ready["b"] = False
        await balancer.wait_for_states({"b": "DOWN"})
        # Nothing UP: the connection ends without a response, as no retry is made anywhere.
        assert await fetch(balancer.port) == ""
    finally:
        balancer.stop()


async def fetch(port: int) -> str:
    """The body of one request on a new connection; "" when the connection ends without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        response = await reader.read()
    except ConnectionResetError:
        response = b""
    writer.close()
    return response.partition(b"\r\n\r\n")[2].decode()
