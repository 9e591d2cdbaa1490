"""Termination time: evidence-based propagation against the fixed ``drain.propagation``.

Both variants run the same rollout (two replicas behind HAProxy checking /ready every 200 ms,
fall 2; steady load with 1.5 s slow requests; one replica deleted as the kubelet does),
interleaved round by round so machine noise hits both alike. Prints the time from deletion until
the replica was gone, the failed requests, and the ratio evidence/fixed of the same run.

    .venv/bin/python bench/termination.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from drainproxy.sim.rollout import RolloutPlan, run_rollout

FIXED: dict[str, object] = {"propagation": "5s", "timeout": "10s"}
EVIDENCE: dict[str, object] = {
    **FIXED,
    "propagation_mode": "evidence",
    "propagation_min": "200ms",
    "propagation_margin": "300ms",
    "quiet": "300ms",
    "default_failure_threshold": 2,
}


async def measure(drain: dict[str, object]) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as workdir:
        result = await run_rollout(RolloutPlan(drain=drain, grace_period=20.0), Path(workdir))
    return result.gone_at - result.deleted_at, len(result.failures), len(result.outcomes)


async def main(rounds: int) -> int:
    gone: dict[str, list[float]] = {"fixed": [], "evidence": []}
    failed = 0
    for round_number in range(1, rounds + 1):
        for name, drain in (("fixed", FIXED), ("evidence", EVIDENCE)):
            seconds, failures, requests = await measure(drain)
            gone[name].append(seconds)
            failed += failures
            print(
                f"round {round_number} {name:8s}: gone after {seconds:6.2f}s, "
                f"{failures} of {requests} requests failed",
                flush=True,
            )
    fixed, evidence = statistics.median(gone["fixed"]), statistics.median(gone["evidence"])
    print(f"\nmedian time to gone: fixed {fixed:.2f}s, evidence {evidence:.2f}s")
    print(f"ratio evidence/fixed: {evidence / fixed:.2f}  (failed requests in all runs: {failed})")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(parser.parse_args().rounds)))
