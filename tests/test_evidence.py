"""Evidence-based propagation against the probers and routers of a real cluster (issue 12 item 5):
the kubelet's probes, a router that never probes and lags behind the endpoint update, a caller
that read /ready once, and a real HAProxy health-checking the pod. Real proxy process, real app;
the load is shaped by sleeps (a router's rhythm), nothing waits on time for a result."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from drainproxy.sim.haproxy import HAProxy, haproxy_binary
from drainproxy.sim.replica import free_port
from tests.conftest import StartProxy
from tests.proxy_support import RawApp, parse_responses
from tests.support import ProxyProcess, WatchedProcess

KUBELET = "kube-probe/1.31"

#: The documented defaults, with the kubelet's failureThreshold 2 and a 12 s maximum.
EVIDENCE: dict[str, Any] = {
    "drain": {
        "propagation": "12s",
        "propagation_mode": "evidence",
        "probers": [{"user_agent": "^kube-probe/", "failure_threshold": 2}],
    },
    "termination_grace_period": "40s",
}

REQUEST = b"GET /order HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"


async def probe_every(
    proxy: ProxyProcess, interval: float, user_agent: str, stop: asyncio.Event
) -> None:
    """The kubelet's readiness probe: GET /ready every ``interval``, until ``stop``."""
    async with aiohttp.ClientSession(headers={"User-Agent": user_agent}) as session:
        while not stop.is_set():
            try:
                async with session.get(proxy.admin_url + "/ready") as response:
                    await response.read()
            except aiohttp.ClientError:
                return  # the proxy exited
            await asyncio.sleep(interval)  # the prober's rhythm, not synchronisation


class Router:
    """A router that never probes (kube-proxy, an ingress controller): a new connection every
    ``interval`` from ``source``, until ``keep_going`` says it caught up with the endpoint
    update."""

    def __init__(
        self,
        port: int,
        interval: float,
        keep_going: Callable[[], bool],
        source: str = "127.0.0.1",
    ) -> None:
        self.port = port
        self.interval = interval
        self.keep_going = keep_going
        self.source = source
        self.statuses: list[int | str] = []
        self.sent = asyncio.Event()

    async def request(self) -> int | str:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(self.source, 0)
            )
        except ConnectionError as exc:
            return type(exc).__name__
        try:
            writer.write(REQUEST)
            raw = await asyncio.wait_for(reader.read(), 10)
            return parse_responses(raw, [b"GET"])[0].status
        except (ConnectionError, AssertionError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    async def run(self) -> None:
        while self.keep_going():
            self.statuses.append(await self.request())
            if len(self.statuses) >= 4:
                self.sent.set()
            await asyncio.sleep(self.interval)  # the router's rhythm, not synchronisation


async def drain_end(proxy: ProxyProcess) -> str:
    ended = await proxy.log.wait(r"phase propagating -> draining \((.*)\)")
    return ended.group(1)


@pytest.mark.parametrize("router_lag", [4.6, 8.0])
async def test_a_router_still_arriving_at_its_pace_holds_propagation(
    raw_app: RawApp, start_proxy: StartProxy, router_lag: float
) -> None:
    """Kubelet-style probing (threshold 2, every 1 s) is satisfied within about 2 s, but a
    router lagging behind the endpoint update still opens a connection every 1.5 s, up to
    ``router_lag`` s after SIGTERM: none of its requests may be refused (the issue saw those at
    3.1 s and 4.6 s refused), and the log says what ended the phase."""
    proxy = await start_proxy(raw_app.port, EVIDENCE)
    loop = asyncio.get_running_loop()
    signalled: list[float] = []

    def lagging() -> bool:
        return not signalled or loop.time() - signalled[0] <= router_lag

    stop_probing = asyncio.Event()
    router = Router(proxy.port, 1.5, lagging)
    tasks = [
        asyncio.ensure_future(probe_every(proxy, 1.0, KUBELET, stop_probing)),
        asyncio.ensure_future(router.run()),
    ]
    try:
        await router.sent.wait()  # its usual pace is established
        signalled.append(loop.time())
        proxy.send(signal.SIGTERM)
        reason = await drain_end(proxy)
        await asyncio.wait_for(tasks[1], 30)
    finally:
        stop_probing.set()
        for task in tasks:
            task.cancel()
    assert [s for s in router.statuses if s != 200] == []
    assert reason.startswith("evidence: 1 prober(s): 127.0.0.1 kube-probe/1.31 (")
    assert "; traffic stopped: last request " in reason
    assert await proxy.exited() == 0


async def test_a_sparse_router_is_not_hidden_by_a_busy_balancer(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """Per client: a balancer sending 50 requests/s stops at once after the drain begins (it
    probes and saw the 503s), while a router from another address still comes every 1.5 s up
    to 4.6 s after SIGTERM: the balancer's quick pace must not end propagation before the
    router's requests."""
    proxy = await start_proxy(raw_app.port, EVIDENCE)
    loop = asyncio.get_running_loop()
    signalled: list[float] = []

    def lagging() -> bool:
        return not signalled or loop.time() - signalled[0] <= 4.6

    def balancer_still_routing() -> bool:
        return not signalled or loop.time() - signalled[0] <= 1.0

    stop_probing = asyncio.Event()
    router = Router(proxy.port, 1.5, lagging, source="127.0.0.2")
    balancer = Router(proxy.port, 0.02, balancer_still_routing)
    tasks = [
        asyncio.ensure_future(probe_every(proxy, 1.0, KUBELET, stop_probing)),
        asyncio.ensure_future(router.run()),
        asyncio.ensure_future(balancer.run()),
    ]
    try:
        await router.sent.wait()
        signalled.append(loop.time())
        proxy.send(signal.SIGTERM)
        reason = await drain_end(proxy)
        await asyncio.wait_for(asyncio.gather(tasks[1], tasks[2]), 30)
    finally:
        stop_probing.set()
        for task in tasks:
            task.cancel()
    assert [s for s in router.statuses + balancer.statuses if s != 200] == []
    assert reason.startswith("evidence: "), reason
    assert await proxy.exited() == 0


async def test_when_traffic_never_stops_the_log_says_it_held_propagation(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    overrides = {**EVIDENCE, "drain": {**EVIDENCE["drain"], "propagation": "5s"}}
    proxy = await start_proxy(raw_app.port, overrides)
    stop = asyncio.Event()
    router = Router(proxy.port, 0.5, lambda: not stop.is_set())
    tasks = [
        asyncio.ensure_future(probe_every(proxy, 1.0, KUBELET, stop)),
        asyncio.ensure_future(router.run()),
    ]
    try:
        await router.sent.wait()
        proxy.send(signal.SIGTERM)
        reason = await drain_end(proxy)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
    assert reason.startswith("propagation ran to its maximum; held by traffic still arriving: ")
    assert "probers" not in reason, "the kubelet was satisfied: only the traffic held it"


@pytest.mark.haproxy
@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")
async def test_a_caller_that_read_ready_once_does_not_hold_propagation(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """Behind HAProxy checking every 500 ms (fall 2), an operator's curl read /ready once
    before the drain: the pod leaves on HAProxy's evidence, not at the 12 s maximum."""
    overrides = {**EVIDENCE, "drain": {**EVIDENCE["drain"], "default_failure_threshold": 2}}
    proxy = await start_proxy(raw_app.port, overrides)
    admin_port = int(proxy.admin_url.rsplit(":", 1)[1])
    from drainproxy.sim.haproxy import Backend

    balancer = HAProxy(
        free_port(), [Backend("pod", proxy.port, admin_port, "/ready")], check_interval=0.5
    )
    balancer.start()
    try:
        await balancer.wait_for_states({"pod": "UP"})
        async with (
            aiohttp.ClientSession(headers={"User-Agent": "curl/8.5.0"}) as session,
            session.get(proxy.admin_url + "/ready") as response,
        ):
            assert response.status == 200
        proxy.send(signal.SIGTERM)
        await balancer.wait_for_states({"pod": "DOWN"})
        reason = await drain_end(proxy)
    finally:
        balancer.stop()
    assert reason.startswith("evidence: 1 prober(s): 127.0.0.1 - ("), reason
    assert "curl" not in reason
    assert await proxy.exited() == 0


FLOOD = Path(__file__).with_name("ready_flood.py")


@pytest.mark.haproxy
@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")
@pytest.mark.parametrize(
    ("addresses", "rules"),
    [
        pytest.param(100, [{"address": "127.0.0.1", "failure_threshold": 2}], id="named-prober"),
        pytest.param(1, [], id="one-address"),
    ],
)
async def test_a_flood_of_ready_callers_does_not_hide_the_balancer(
    raw_app: RawApp, start_proxy: StartProxy, addresses: int, rules: list[dict[str, Any]]
) -> None:
    """Issue 17: 100 made-up User-Agents calling /ready in turn pushed HAProxy's checks out of
    the 64-entry prober table before each next check, so nobody was counted and propagation
    ran to its 12 s maximum while the flood went on. HAProxy starts checking during the flood.
    From 100 addresses: a prober named by a ``drain.probers`` rule (HAProxy sends no
    User-Agent: by its address) keeps its place. From one address, with no rule: that address
    holds only a few callers, so HAProxy's checks find room. Either way the pod leaves on
    HAProxy's evidence, the flood still running."""
    drain = {**EVIDENCE["drain"], "default_failure_threshold": 2}
    drain["probers"] = [*drain["probers"], *rules]
    proxy = await start_proxy(raw_app.port, {**EVIDENCE, "drain": drain})
    admin_port = int(proxy.admin_url.rsplit(":", 1)[1])
    from drainproxy.sim.haproxy import Backend

    balancer = HAProxy(
        free_port(), [Backend("pod", proxy.port, admin_port, "/ready")], check_interval=0.5
    )
    flood = WatchedProcess([sys.executable, str(FLOOD), str(admin_port), "100", str(addresses)])
    try:
        await flood.log.wait(r"^3$")  # every caller has called three times
        balancer.start()
        await balancer.wait_for_states({"pod": "UP"})
        proxy.send(signal.SIGTERM)
        await balancer.wait_for_states({"pod": "DOWN"})
        reason = await drain_end(proxy)
        assert flood.proc.poll() is None, "the flood went on through the drain"
    finally:
        flood.stop()
        balancer.stop()
    # A flood caller that happened to keep its place and probe repeatedly may count too.
    assert reason.startswith("evidence: "), reason
    assert " 127.0.0.1 - (" in reason.split("; traffic stopped: ")[0], "HAProxy was counted"
    assert await proxy.exited() == 0
