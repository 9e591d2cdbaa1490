"""The rollout of tests/test_rollout.py with real containers: each replica a podman pod (one
network namespace) of the app's container and drainproxy's image, the kubelet simulation
driving the containers (the app's preStop httpGet sent from outside the pod, ``podman kill
--signal TERM`` to each container after its own hook, SIGKILL at the grace period), HAProxy
checking /ready through the published ports. Zero failed requests, in each way of stopping the
app."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from drainproxy.sim.haproxy import haproxy_binary
from drainproxy.sim.pods import PodReplica
from drainproxy.sim.rollout import RolloutPlan, RolloutResult, run_rollout
from tests.rollout_replicas import SignalledPod, WrappedPod
from tests.test_rollout import assert_no_request_lost, assert_slow_in_flight_answered, describe

pytestmark = [
    pytest.mark.container,
    pytest.mark.haproxy,
    pytest.mark.skipif(
        haproxy_binary() is None and not os.environ.get("CI"),
        reason="haproxy is not installed (make test installs it)",
    ),
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("drainproxy_image"),
]


def outcome(result: RolloutResult, name: str) -> tuple[bool, int | None]:
    (container,) = [c for c in result.containers if c.name == name]
    return container.killed, container.returncode


async def test_pods_rollout_loses_no_request(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(replica_class=PodReplica), tmp_path)
    assert_no_request_lost(result)
    assert_slow_in_flight_answered(result)
    app = next(c for c in result.containers if c.name == "app")
    assert app.hook_result == "httpGet /prestop: 200", describe(result)
    # Neither container needed the SIGKILL: drainproxy exited 0 after its drain, the app (no
    # handler) on the SIGTERM the kubelet sent it once its hook returned.
    assert outcome(result, "drainproxy") == (False, 0), describe(result)
    assert outcome(result, "app") == (False, 128 + signal.SIGTERM), describe(result)


async def test_without_drainproxy_the_same_pods_fail_requests(tmp_path: Path) -> None:
    """The setup can see failures: the app's pod alone, deleted the same way, fails some."""
    result = await run_rollout(
        RolloutPlan(with_drainproxy=False, replica_class=PodReplica), tmp_path
    )
    assert len(result.failures) > 0, describe(result)


async def test_shared_pid_namespace_pods_rollout_loses_no_request(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(replica_class=SignalledPod), tmp_path)
    assert_no_request_lost(result)
    assert result.deleted.proxy_log is not None
    # drainproxy found the app container's process in the pod's PID namespace and stopped it.
    await result.deleted.proxy_log.wait(r"app stop plan: signal: SIGTERM to pid \d+ ")
    await result.deleted.proxy_log.wait(r"app stop: app exited after SIGTERM.*; preStop hooks")
    assert outcome(result, "drainproxy") == (False, 0), describe(result)
    assert outcome(result, "app")[0] is False, describe(result)


async def test_wrapper_mode_pods_rollout_loses_no_request(tmp_path: Path) -> None:
    result = await run_rollout(RolloutPlan(replica_class=WrappedPod), tmp_path)
    assert_no_request_lost(result)
    # One container: drainproxy (PID 1) drained, stopped its child, exited with its status.
    assert [c.name for c in result.containers] == ["app"], describe(result)
    assert outcome(result, "app") == (False, 128 + signal.SIGTERM), describe(result)
    assert result.deleted.proxy_log is not None
    await result.deleted.proxy_log.wait(r"app stop: app exited after .*; preStop hooks released")
