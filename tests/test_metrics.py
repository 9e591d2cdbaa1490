"""/metrics scraped from a real proxy process while a drain runs: the phase moves, counters rise."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartApp, StartProxy
from tests.support import free_port, slow_app

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> Samples:
    async with session.get(admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("drainproxy_"), family.name
        for sample in family.samples:
            if family.type == "counter" and sample.name.endswith("_created"):
                continue
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def current_phase(samples: Samples) -> str:
    (phase,) = [
        dict(labels)["phase"]
        for (name, labels), v in samples.items()
        if name == "drainproxy_phase" and v == 1.0
    ]
    return phase


def assert_counters_never_fall(earlier: Samples, later: Samples) -> None:
    for key, before in earlier.items():
        if key[0].endswith("_total"):
            assert later.get(key, 0.0) >= before, key


async def test_metrics_follow_an_admin_drain(start_app: StartApp, start_proxy: StartProxy) -> None:
    slow_started, release_slow = asyncio.Event(), asyncio.Event()
    app = slow_app(release_slow, slow_started, fast_path="/fast")
    # Propagation long enough to make one request and one scrape inside it.
    proxy = await start_proxy(
        await start_app(app), {"drain": {"propagation": "3s", "timeout": "10s"}}
    )
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        serving = await scrape(session, proxy.admin_url)
        assert current_phase(serving) == "serving"
        assert value(serving, "drainproxy_ready") == 1.0
        assert value(serving, "drainproxy_requests_total", phase="serving") == 0.0
        assert value(serving, "drainproxy_upstream_errors_total", kind="reset") == 0.0
        assert value(serving, "drainproxy_drain_duration_seconds") == 0.0

        async with session.get(proxy.url + "/fast") as response:
            assert response.status == 200
        slow_request = asyncio.ensure_future(session.get(proxy.url + "/slow"))
        await slow_started.wait()
        busy = await scrape(session, proxy.admin_url)
        assert value(busy, "drainproxy_requests_total", phase="serving") == 2.0
        assert value(busy, "drainproxy_responses_total", status_class="2xx") == 1.0
        assert value(busy, "drainproxy_in_flight_requests") == 1.0
        assert value(busy, "drainproxy_open_connections") >= 1.0

        async with session.post(proxy.admin_url + "/drain") as response:
            assert response.status == 202
        await proxy.log.wait(r"phase serving -> propagating")
        async with session.get(proxy.url + "/fast") as response:
            assert response.status == 200
            assert response.headers["Connection"] == "close"
        propagating = await scrape(session, proxy.admin_url)
        assert current_phase(propagating) == "propagating"
        assert value(propagating, "drainproxy_ready") == 0.0
        assert value(propagating, "drainproxy_phase_transitions_total", phase="propagating") == 1
        assert value(propagating, "drainproxy_requests_total", phase="propagating") == 1.0
        assert value(propagating, "drainproxy_in_flight_requests") == 1.0
        assert value(propagating, "drainproxy_drain_duration_seconds") > 0.0

        await proxy.log.wait(r"phase propagating -> draining")
        draining = await scrape(session, proxy.admin_url)
        assert current_phase(draining) == "draining"
        assert value(draining, "drainproxy_in_flight_requests") == 1.0
        assert value(draining, "drainproxy_open_connections") == 1.0
        # The propagation phase ended at its deadline: it lasted drain.propagation exactly.
        propagated = value(draining, "drainproxy_drain_phase_duration_seconds", phase="propagating")
        assert propagated == pytest.approx(3.0)

        release_slow.set()
        async with await slow_request as response:
            assert response.status == 200
            assert response.headers["Connection"] == "close"
        await proxy.log.wait(r"phase stopping_app -> drained")
        drained = await scrape(session, proxy.admin_url)
        assert current_phase(drained) == "drained"
        for phase in ("draining", "stopping_app", "drained"):
            assert value(drained, "drainproxy_phase_transitions_total", phase=phase) == 1.0
        assert value(drained, "drainproxy_in_flight_requests") == 0.0
        assert value(drained, "drainproxy_open_connections") == 0.0
        assert value(drained, "drainproxy_responses_total", status_class="2xx") == 3.0
        assert (
            value(drained, "drainproxy_connections_closed_total", reason="after_response")
            >= value(busy, "drainproxy_connections_closed_total", reason="after_response") + 2
        )
        assert value(drained, "drainproxy_drains_completed_total") == 1.0
        assert value(drained, "drainproxy_drain_forced") == 0.0
        assert value(drained, "drainproxy_app_stop_outcome", outcome="preStop hooks released") == 1
        duration = value(drained, "drainproxy_drain_duration_seconds")
        assert duration >= value(
            drained, "drainproxy_drain_phase_duration_seconds", phase="propagating"
        )
        # A finished drain's duration is fixed: a later scrape reports the same number.
        assert (
            value(await scrape(session, proxy.admin_url), "drainproxy_drain_duration_seconds")
            == duration
        )

        for earlier, later in (
            (serving, busy),
            (busy, propagating),
            (propagating, draining),
            (draining, drained),
        ):
            assert_counters_never_fall(earlier, later)

    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0


async def test_metrics_count_upstream_errors_by_kind(start_proxy: StartProxy) -> None:
    nothing_listens = free_port()
    proxy = await start_proxy(nothing_listens, wait_ready=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/") as response:
            assert response.status == 502
        samples = await scrape(session, proxy.admin_url)
    assert value(samples, "drainproxy_upstream_errors_total", kind="refused") == 1.0
    assert value(samples, "drainproxy_upstream_errors_total", kind="timeout") == 0.0
    assert value(samples, "drainproxy_responses_total", status_class="5xx") == 1.0
    assert value(samples, "drainproxy_app_reachable") == 0.0
    assert value(samples, "drainproxy_ready") == 0.0
