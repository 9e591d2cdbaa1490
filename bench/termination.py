"""Termination time: how long a deleted pod stays after its balancer marked it DOWN, with
evidence-based propagation against the fixed ``drain.propagation``.

Two replicas behind HAProxy health-checking drainproxy's /ready; steady load with 1.5 s slow
requests, never retried; one replica deleted as the kubelet does. Both modes are given the same
maximum (fixed: all of it), long enough for the slowest balancer here, as an operator who does
not control the balancer's checks would set it. Two balancer profiles: HAProxy's default checks
(every 500 ms, DOWN after 2) and slow ones (every 2 s, DOWN after 3). Everything in one run,
interleaved round by round so machine noise hits all variants alike. Prints, per run, the time
from deletion to DOWN and to the pod gone, the failed requests, and per profile the medians and
the ratio evidence/fixed of "gone after DOWN".

    .venv/bin/python bench/termination.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from drainproxy.sim.haproxy import Backend, HAProxy
from drainproxy.sim.replica import Replica
from drainproxy.sim.rollout import Balancer, RolloutPlan, run_rollout

#: (name, check interval in seconds, fall): how HAProxy decides a server is DOWN.
PROFILES = (("default 500ms x 2", 0.5, 2), ("slow 2s x 3", 2.0, 3))
#: The longest propagation either mode may take: the slow balancer's detection (6 s) + margin.
PROPAGATION = "10s"
FIXED: dict[str, object] = {"propagation": PROPAGATION, "timeout": "10s"}


def evidence_drain(fall: int) -> dict[str, object]:
    """The documented evidence defaults (propagation_min, margin and quiet 1 s), with the
    balancer's failure count as the probers' threshold, as an operator would configure it."""
    return {**FIXED, "propagation_mode": "evidence", "default_failure_threshold": fall}


@dataclass
class Measured:
    down_after: float
    gone_after: float
    failed: int
    requests: int
    ended: str

    @property
    def gone_after_down(self) -> float:
        return self.gone_after - self.down_after


async def measure(drain: dict[str, object], interval: float, fall: int) -> Measured:
    balancers: list[HAProxy] = []

    def balancer(port: int, replicas: list[Replica]) -> Balancer:
        backends = [Backend(r.name, r.serving_port, r.check_port, r.check_path) for r in replicas]
        made = HAProxy(port, backends, check_interval=interval, fall=fall)
        balancers.append(made)
        return made

    down: list[float] = []

    async def watch() -> None:
        """When HAProxy first reports the deleted replica anything but UP."""
        while True:
            await asyncio.sleep(0.05)
            if balancers:
                with contextlib.suppress(OSError):
                    state = (await balancers[0].server_states()).get("replica-1", "UP")
                    if not state.startswith("UP") and not down:
                        down.append(time.monotonic())

    watcher = asyncio.ensure_future(watch())
    try:
        with tempfile.TemporaryDirectory() as workdir:
            plan = RolloutPlan(drain=drain, grace_period=30.0)
            result = await run_rollout(plan, Path(workdir), balancer_factory=balancer)
            assert result.deleted.proxy_log is not None
            ended = await result.deleted.proxy_log.wait(r"propagating -> draining \((\w+)")
    finally:
        watcher.cancel()
    down_at = down[0] if down else float("nan")
    return Measured(
        down_at - result.deleted_at,
        result.gone_at - result.deleted_at,
        len(result.failures),
        len(result.outcomes),
        "on evidence" if ended.group(1) == "evidence" else "at its maximum",
    )


async def main(rounds: int) -> int:
    runs: dict[tuple[str, str], list[Measured]] = {}
    failed = 0
    for round_number in range(1, rounds + 1):
        for profile, interval, fall in PROFILES:
            for mode, drain in (("fixed", FIXED), ("evidence", evidence_drain(fall))):
                measured = await measure(drain, interval, fall)
                runs.setdefault((profile, mode), []).append(measured)
                failed += measured.failed
                print(
                    f"round {round_number} {profile:18s} {mode:8s}: DOWN after "
                    f"{measured.down_after:5.2f}s, gone after {measured.gone_after:5.2f}s "
                    f"(gone - DOWN {measured.gone_after_down:5.2f}s, propagation ended "
                    f"{measured.ended}), {measured.failed} of {measured.requests} requests failed",
                    flush=True,
                )
    print()
    print("| balancer checks | mode | DOWN after deletion | pod gone after deletion | "
          "gone after DOWN | failed requests |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for profile, _, _ in PROFILES:
        medians = {}
        for mode in ("fixed", "evidence"):
            done = runs[(profile, mode)]
            medians[mode] = statistics.median(m.gone_after_down for m in done)
            print(
                f"| {profile} | {mode} | {statistics.median(m.down_after for m in done):.2f} s"
                f" | {statistics.median(m.gone_after for m in done):.2f} s"
                f" | {medians[mode]:.2f} s | {sum(m.failed for m in done)} / "
                f"{sum(m.requests for m in done)} |"
            )
        print(
            f"| {profile} | **ratio evidence/fixed** | | | "
            f"**{medians['evidence'] / medians['fixed']:.2f}** | |"
        )
    print(f"\nfailed requests in all runs: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(parser.parse_args().rounds)))
