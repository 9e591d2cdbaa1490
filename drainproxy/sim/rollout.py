"""One scale-down under load: two replicas behind a health-checking load balancer, a client that
never retries, and one replica deleted the way the kubelet deletes a pod.

Shared by the rollout tests (which assert on the outcome) and ``drainproxy demo`` (which shows it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from drainproxy.sim.haproxy import HAProxy
from drainproxy.sim.kubelet import ContainerOutcome, terminate_pod
from drainproxy.sim.load import LoadClient, Outcome
from drainproxy.sim.replica import Replica, free_port


class Balancer(Protocol):
    port: int

    def start(self) -> None: ...

    async def wait_for_states(self, wanted: dict[str, str], timeout: float = 20.0) -> None: ...

    def stop(self) -> None: ...


BalancerFactory = Callable[[int, list[Replica]], Balancer]


def haproxy_balancer(port: int, replicas: list[Replica]) -> Balancer:
    from drainproxy.sim.haproxy import Backend

    return HAProxy(
        port,
        [Backend(r.name, r.serving_port, r.check_port, r.check_path) for r in replicas],
    )


@dataclass
class RolloutPlan:
    with_drainproxy: bool = True
    rate: float = 150.0
    connections: int = 8
    slow_share: float = 0.1
    slow_seconds: float = 1.5
    #: Slow requests that must be in flight when the deletion starts.
    slow_in_flight_at_delete: int = 3
    drain: Mapping[str, Any] = field(default_factory=lambda: {"propagation": "2s", "timeout": "5s"})
    grace_period: float = 15.0
    #: Run the load this long with both replicas serving before the deletion.
    load_before: float = 0.0
    #: Keep the load running this long after the deleted replica is gone.
    load_after: float = 0.5
    #: Instead: keep the load running until this long after the deletion began (and at least
    #: until the replica is gone), so that runs compared side by side share one load window.
    load_until: float | None = None
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    #: How each replica runs (a Replica subclass: another way of stopping the app, say).
    replica_class: type[Replica] = Replica


@dataclass
class RolloutResult:
    plan: RolloutPlan
    outcomes: list[Outcome]
    containers: list[ContainerOutcome]
    load_started: float
    deleted_at: float
    gone_at: float
    deleted: Replica
    survivor: Replica
    #: When the load stopped sending.
    load_stopped: float = 0.0

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    def served_by(self, replica: Replica) -> list[Outcome]:
        prefix = replica.name.encode()
        return [o for o in self.outcomes if not o.failed and o.body.startswith(prefix)]

    @property
    def last_request_to_deleted(self) -> float | None:
        served = self.served_by(self.deleted)
        return max((o.finished for o in served), default=None)


def _replica(name: str, workdir: Path, plan: RolloutPlan) -> Replica:
    return plan.replica_class(
        name,
        workdir,
        with_drainproxy=plan.with_drainproxy,
        drain=plan.drain,
        grace_period=plan.grace_period,
        extra_config=plan.extra_config,
    )


async def run_rollout(
    plan: RolloutPlan,
    workdir: Path,
    balancer_factory: BalancerFactory = haproxy_balancer,
    on_progress: Callable[[str], None] = lambda message: None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> RolloutResult:
    """``on_outcome`` sees every request as it finishes (the demo's live progress)."""
    replicas = [_replica(f"replica-{i}", workdir, plan) for i in (1, 2)]
    balancer = balancer_factory(free_port(), replicas)
    load: LoadClient | None = None
    try:
        for replica in replicas:
            replica.start()
        await asyncio.gather(*(replica.started() for replica in replicas))
        balancer.start()
        await balancer.wait_for_states({r.name: "UP" for r in replicas})
        on_progress("both replicas up behind the balancer; starting load")

        both_served = asyncio.Event()
        seen: dict[bytes, int] = {}

        def note(outcome: Outcome) -> None:
            if on_outcome is not None:
                on_outcome(outcome)
            if not outcome.failed:
                key = outcome.body.split(b" ")[0].strip()
                seen[key] = seen.get(key, 0) + 1
                if len(seen) == 2 and min(seen.values()) >= 5:
                    both_served.set()

        load = LoadClient(
            "127.0.0.1",
            balancer.port,
            rate=plan.rate,
            connections=plan.connections,
            slow_share=plan.slow_share,
            slow_seconds=plan.slow_seconds,
            on_outcome=note,
        )
        load_started = time.monotonic()
        load.start()
        await asyncio.wait_for(both_served.wait(), 30)
        await asyncio.sleep(plan.load_before)  # steady state first, for a readable timeline
        if plan.slow_share > 0 and plan.slow_in_flight_at_delete:
            await asyncio.wait_for(load.wait_slow_in_flight(plan.slow_in_flight_at_delete), 30)
        deleted, survivor = replicas
        on_progress(f"deleting {deleted.name} the way the kubelet does")
        deleted_at = time.monotonic()
        containers = await terminate_pod(deleted.containers(), plan.grace_period)
        gone_at = time.monotonic()
        on_progress(f"{deleted.name} gone after {gone_at - deleted_at:.1f}s")
        if plan.load_until is None:
            tail = plan.load_after
        else:
            tail = max(0.0, deleted_at + plan.load_until - time.monotonic())
        await asyncio.sleep(tail)  # the survivor keeps taking load for a while
        load_stopped = time.monotonic()
        outcomes = await load.stop()
        load = None
        return RolloutResult(
            plan,
            outcomes,
            containers,
            load_started,
            deleted_at,
            gone_at,
            deleted,
            survivor,
            load_stopped,
        )
    finally:
        if load is not None:
            await load.stop()
        balancer.stop()
        for replica in replicas:
            replica.stop()
