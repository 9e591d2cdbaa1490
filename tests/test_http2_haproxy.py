"""HAProxy speaking HTTP/2 to drainproxy (``proto h2`` on its server lines), through a rollout: a
replica deleted the kubelet's way under load, its HTTP/2 connections told to go by GOAWAY."""

from __future__ import annotations

from pathlib import Path

import pytest

from drainproxy.sim.haproxy import Backend, HAProxy, haproxy_binary
from drainproxy.sim.replica import Replica
from drainproxy.sim.rollout import Balancer, RolloutPlan, run_rollout

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed"),
]


def haproxy_speaking_h2(port: int, replicas: list[Replica]) -> Balancer:
    backends = [Backend(r.name, r.serving_port, r.check_port, r.check_path) for r in replicas]
    return HAProxy(port, backends, server_proto="h2")


async def test_haproxy_over_h2_loses_no_request_when_a_replica_is_deleted(
    tmp_path: Path,
) -> None:
    plan = RolloutPlan(extra_config={"log": {"level": "debug"}})
    result = await run_rollout(plan, tmp_path, balancer_factory=haproxy_speaking_h2)
    assert result.outcomes, "the load produced no requests"
    assert result.failures == [], [str(o) for o in result.failures[:5]]
    assert result.served_by(result.deleted) and result.served_by(result.survivor)
    assert result.deleted.proxy_log is not None
    log = result.deleted.proxy_log.text()
    assert "HTTP/2 connection from 127.0.0.1" in log
    assert "HTTP/2 connections get GOAWAY" in log
    proxy = next(c for c in result.containers if c.name == "drainproxy")
    assert (proxy.killed, proxy.returncode) == (False, 0)
