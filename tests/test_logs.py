"""Logs of a real proxy process: every JSON line parses and carries the phase; drain lines carry
the event and the counts; the access log appears only when enabled."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import StartApp, StartProxy
from tests.support import ProxyProcess, slow_app

PHASES = {
    "serving",
    "delaying",
    "propagating",
    "draining",
    "stopping_app",
    "drained",
    "recovering",
    "stopped",
}


def json_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    entries = []
    for line in proxy.log.lines:
        entry = json.loads(line)  # a line that is not JSON fails the test here
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def app_with_slow_path() -> tuple[web.Application, asyncio.Event, asyncio.Event]:
    slow_started, release_slow = asyncio.Event(), asyncio.Event()
    app = slow_app(release_slow, slow_started, fast_path="/fast", fast_body="fast body")
    return app, slow_started, release_slow


async def test_json_logs_of_a_drain_with_the_access_log(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    app, slow_started, release_slow = app_with_slow_path()
    proxy = await start_proxy(
        await start_app(app),
        {"log": {"format": "json", "level": "info", "access_log": True}},
    )
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(proxy.url + "/fast?x=1") as response:
            assert await response.text() == "fast body"
        slow_request = asyncio.ensure_future(session.get(proxy.url + "/slow"))
        await slow_started.wait()
        proxy.send(signal.SIGTERM)
        await proxy.log.wait(r"serving -> propagating")
        async with session.get(proxy.url + "/fast") as response:
            assert response.status == 200
        await proxy.log.wait(r"propagating -> draining")
        release_slow.set()
        async with await slow_request as response:
            assert response.status == 200
    assert await proxy.exited() == 0
    proxy.log.join()

    entries = json_lines(proxy)
    for entry in entries:
        assert entry["phase"] in PHASES, entry
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry

    changes = [e for e in entries if e.get("event") == "phase"]
    assert [e["phase"] for e in changes] == ["propagating", "draining", "stopping_app", "stopped"]
    entering_draining = changes[1]
    assert entering_draining["counts"]["in_flight"] == 1
    assert entering_draining["counts"]["requests_by_phase"] == {"serving": 2, "propagating": 1}

    (summary,) = [e for e in entries if e.get("event") == "drain_summary"]
    assert summary["counts"]["connections_closed"]["after_response"] >= 2
    assert summary["counts"]["in_flight"] == 0
    assert set(summary["drain_phase_seconds"]) >= {"propagating", "draining", "stopping_app"}
    (stop,) = [e for e in entries if e.get("event") == "app_stop"]
    assert stop["phase"] == "stopping_app"

    access = [e for e in entries if e.get("event") == "access"]
    assert [(e["method"], e["target"], e["phase"]) for e in access] == [
        ("GET", "/fast?x=1", "serving"),
        ("GET", "/fast", "propagating"),
        ("GET", "/slow", "serving"),
    ]
    for entry in access:
        assert entry["status"] == 200
        assert entry["logger"] == "drainproxy.access"
        assert entry["outcome"] == "complete"
        assert 0 <= entry["upstream_seconds"] <= entry["duration_seconds"]
    assert [e["bytes"] for e in access] == [len(b"fast body"), len(b"fast body"), len(b"slow")]


async def test_access_log_is_off_by_default(start_app: StartApp, start_proxy: StartProxy) -> None:
    app, _, _ = app_with_slow_path()
    proxy = await start_proxy(await start_app(app), {"log": {"format": "json"}})
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/fast") as response:
        assert response.status == 200
    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0
    proxy.log.join()
    entries = json_lines(proxy)
    assert any(e.get("event") == "exit" for e in entries)
    assert not [e for e in entries if e["logger"] == "drainproxy.access"]


async def test_text_access_log_names_the_exchange(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    app, _, _ = app_with_slow_path()
    proxy = await start_proxy(await start_app(app), {"log": {"access_log": True}})
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/fast") as response:
        assert response.status == 200
    await proxy.log.wait(r"INFO GET /fast 200 \d+\.\d{3}s 9B upstream \d+\.\d{3}s phase serving$")
