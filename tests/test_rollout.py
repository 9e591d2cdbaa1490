"""Zero lost requests through a real HAProxy while one replica is deleted under load."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from drainproxy.sim.haproxy import haproxy_binary
from drainproxy.sim.rollout import RolloutPlan, RolloutResult, run_rollout
from tests.rollout_replicas import SignalledReplica, WrappedReplica

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.skipif(
        haproxy_binary() is None and not __import__("os").environ.get("CI"),
        reason="haproxy is not installed (make test installs it)",
    ),
]


def describe(result: RolloutResult) -> str:
    failures = result.failures
    lines = [f"{len(result.outcomes)} requests, {len(failures)} failed"]
    lines += [
        f"  {o.path} at +{o.started - result.deleted_at:.3f}s: {o.status} {o.error}"
        for o in failures[:10]
    ]
    lines += [f"  {c}" for c in result.containers]
    if result.deleted.proxy_log is not None:
        lines += ["drainproxy log:", result.deleted.proxy_log.text()]
    return "\n".join(lines)


def assert_no_request_lost(result: RolloutResult) -> None:
    assert result.outcomes, "the load produced no requests"
    assert result.failures == [], describe(result)


def assert_slow_in_flight_answered(result: RolloutResult) -> None:
    """The slow requests in flight at deletion were answered by the deleted replica."""
    slow_after = [
        o
        for o in result.served_by(result.deleted)
        if o.path.startswith("/slow") and o.finished > result.deleted_at
    ]
    assert slow_after, describe(result)


async def test_deleting_a_replica_under_load_loses_no_request(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(with_drainproxy=True), tmp_path)
    assert_no_request_lost(result)
    assert_slow_in_flight_answered(result)
    # The kubelet never had to kill anything, and drainproxy exited cleanly.
    assert [(c.name, c.killed) for c in result.containers] == [
        ("app", False),
        ("drainproxy", False),
    ]
    proxy = next(c for c in result.containers if c.name == "drainproxy")
    assert proxy.returncode == 0, describe(result)
    app = next(c for c in result.containers if c.name == "app")
    assert app.hook_result == "httpGet /prestop: 200"
    assert result.survivor.name.encode() in b"".join(o.body for o in result.outcomes[-5:])


async def test_without_drainproxy_the_same_deletion_fails_requests(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(with_drainproxy=False), tmp_path)
    assert len(result.failures) > 0, describe(result)


EVIDENCE_DRAIN = {
    "propagation": "10s",
    "timeout": "5s",
    "propagation_mode": "evidence",
    "propagation_min": "200ms",
    "propagation_margin": "300ms",
    "quiet": "300ms",
    # HAProxy marks a server down after `fall 2` failed checks (drainproxy.sim.haproxy).
    "default_failure_threshold": 2,
}


async def test_evidence_based_propagation_leaves_early_and_loses_no_request(tmp_path: Path) -> None:
    plan = RolloutPlan(drain=EVIDENCE_DRAIN, grace_period=20.0)
    result = await run_rollout(plan, tmp_path)
    assert result.failures == [], describe(result)
    assert result.deleted.proxy_log is not None
    ended = await result.deleted.proxy_log.wait(r"propagating -> draining \((.*)\)")
    assert ended.group(1).startswith("evidence: 1 prober(s): 127.0.0.1"), describe(result)
    # It left on evidence: long before the fixed 10 s propagation alone would have ended.
    assert result.gone_at - result.deleted_at < 10.0, describe(result)
    proxy = next(c for c in result.containers if c.name == "drainproxy")
    assert proxy.returncode == 0


async def test_wrapper_mode_rollout_loses_no_request(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(replica_class=WrappedReplica), tmp_path)
    assert_no_request_lost(result)
    # One container: drainproxy drained, stopped its child with SIGTERM and exited with its status.
    [container] = result.containers
    assert (container.name, container.killed) == ("app", False), describe(result)
    assert container.returncode == 128 + signal.SIGTERM, describe(result)
    assert result.deleted.proxy_log is not None
    await result.deleted.proxy_log.wait(r"app stop: app exited after .*; preStop hooks released")


async def test_signal_mode_rollout_loses_no_request(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(replica_class=SignalledReplica), tmp_path)
    assert_no_request_lost(result)
    killed = [(c.name, c.killed) for c in result.containers]
    assert killed == [("app", False), ("drainproxy", False)], describe(result)
    proxy = next(c for c in result.containers if c.name == "drainproxy")
    assert proxy.returncode == 0, describe(result)
    deleted = result.deleted
    assert deleted.proxy_log is not None and deleted.app is not None
    await deleted.proxy_log.wait(rf"app stop plan: signal: SIGTERM to pid {deleted.app.pid} ")
    await deleted.proxy_log.wait(r"app stop: app exited after SIGTERM.*; preStop hooks released")
