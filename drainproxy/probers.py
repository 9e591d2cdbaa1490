"""Who is watching our readiness, and has each of them seen enough failures to stop routing to us?

Every load balancer and the kubelet decide a pod is unready after a number of consecutive failed
checks (``failureThreshold``). When each prober that has been probing us recently has received
that many 503s, nobody who health-checks us still believes we are ready: the evidence that
endpoint removal has begun. Probers are told apart by source address and User-Agent (the kubelet
sends ``kube-probe/<version>``). Pure bookkeeping: the caller passes the time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from drainproxy.config import ProberRule

#: A prober not heard from for this long no longer counts (the issue's "seen in the last minute").
RECENT = 60.0


@dataclass
class Prober:
    address: str
    user_agent: str
    threshold: int
    last_seen: float
    interval: float | None = None
    consecutive_failures: int = 0
    satisfied_at: float | None = None

    def describe(self) -> str:
        interval = f", every {self.interval:.2f}s" if self.interval is not None else ""
        return (
            f"{self.address} {self.user_agent or '-'} "
            f"({self.consecutive_failures}/{self.threshold} x 503{interval})"
        )


class ProberTracker:
    def __init__(self, rules: Sequence[ProberRule], default_threshold: int) -> None:
        self.rules = rules
        self.default_threshold = default_threshold
        self.probers: dict[tuple[str, str], Prober] = {}

    def threshold_for(self, address: str, user_agent: str) -> int:
        for rule in self.rules:
            if rule.address is not None and rule.address != address:
                continue
            if rule.user_agent is not None and not re.search(rule.user_agent, user_agent):
                continue
            return rule.failure_threshold
        return self.default_threshold

    def record(self, address: str, user_agent: str, ready: bool, now: float) -> None:
        key = (address, user_agent)
        prober = self.probers.get(key)
        if prober is None:
            threshold = self.threshold_for(address, user_agent)
            prober = self.probers[key] = Prober(address, user_agent, threshold, now)
        else:
            prober.interval = now - prober.last_seen
            prober.last_seen = now
        if ready:
            prober.consecutive_failures = 0
            prober.satisfied_at = None
            return
        prober.consecutive_failures += 1
        if prober.consecutive_failures == prober.threshold:
            prober.satisfied_at = now

    def recent(self, now: float) -> list[Prober]:
        return [p for p in self.probers.values() if now - p.last_seen <= RECENT]

    def all_satisfied_at(self, now: float) -> float | None:
        """When the last recent prober got its threshold of failures; None while any has not,
        or when nobody probes us (then there is no evidence, only the fixed propagation)."""
        recent = self.recent(now)
        if not recent or any(p.satisfied_at is None for p in recent):
            return None
        return max(p.satisfied_at for p in recent if p.satisfied_at is not None)

    def describe(self, now: float) -> str:
        recent = self.recent(now)
        return f"{len(recent)} prober(s): " + "; ".join(p.describe() for p in recent)
