"""The evidence of evidence-based propagation: who is watching our readiness (and has each of them
seen enough failures to stop routing to us?), and is traffic still arriving at its usual pace?
Pure bookkeeping: the caller passes the time.

Probers. Every load balancer and the kubelet decide a pod is unready after a number of
consecutive failed checks (``failureThreshold``). When each prober that is still probing us has
received that many 503s, nobody who health-checks us still believes we are ready. Probers are
told apart by source address and User-Agent (the kubelet sends ``kube-probe/<version>``). A
prober is one that probes *repeatedly*: a caller seen once (an operator's curl, a start-up wait)
is not one, and neither is one that stopped probing, i.e. that missed two of its own intervals
(issue 12). A prober that received its threshold stays counted if it then stops. The table is
bounded: at most ``MAX_PROBERS``, each forgotten ``RECENT`` seconds after it was last heard.

Traffic. Probe failures say nothing about the routers that never probe (kube-proxy, ingress
controllers and service meshes follow the EndpointSlice, which the kubelet's verdict updates
later): only their traffic shows they have not caught up. So arrivals (requests and new
connections) are timed, and propagation may not end while traffic still comes at its usual
pace: until no arrival for ``PACE_FACTOR`` times the usual gap between arrivals (the second
longest of the last ``ARRIVALS_KEPT``, so one pause is not taken for the pace).
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from drainproxy.config import ProberRule

#: A prober not heard from for this long is forgotten.
RECENT = 60.0
#: At most this many probers are tracked; the least recently heard is forgotten first. The
#: endpoint is unauthenticated: anyone may call it from anywhere, any number of times.
MAX_PROBERS = 64
#: A prober that missed this many of its own intervals (plus ``LATE_SLACK``) stopped probing.
MISSED_INTERVALS = 2.0
LATE_SLACK = 1.0
#: Arrivals kept for the pace, and the quiet asked for, in usual gaps.
ARRIVALS_KEPT = 32
PACE_FACTOR = 1.5


@dataclass
class Prober:
    address: str
    user_agent: str
    threshold: int
    last_seen: float
    interval: float | None = None
    consecutive_failures: int = 0
    satisfied_at: float | None = None

    def probing(self, now: float) -> bool:
        """Seen at least twice, and not late by more than its own rhythm allows."""
        if self.interval is None:
            return False
        return now - self.last_seen <= MISSED_INTERVALS * self.interval + LATE_SLACK

    def counts(self, now: float) -> bool:
        return self.satisfied_at is not None or self.probing(now)

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
        #: Least recently heard first.
        self.probers: OrderedDict[tuple[str, str], Prober] = OrderedDict()

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
            self._make_room(now)
            threshold = self.threshold_for(address, user_agent)
            prober = self.probers[key] = Prober(address, user_agent, threshold, now)
        else:
            self.probers.move_to_end(key)
            prober.interval = now - prober.last_seen
            prober.last_seen = now
        if ready:
            prober.consecutive_failures = 0
            prober.satisfied_at = None
            return
        prober.consecutive_failures += 1
        if prober.consecutive_failures == prober.threshold:
            prober.satisfied_at = now

    def _make_room(self, now: float) -> None:
        self.forget_old(now)
        while len(self.probers) >= MAX_PROBERS:
            self.probers.popitem(last=False)

    def forget_old(self, now: float) -> None:
        """Drop the probers not heard from for ``RECENT`` (they are the first ones)."""
        while self.probers:
            oldest = next(iter(self.probers.values()))
            if now - oldest.last_seen <= RECENT:
                return
            self.probers.popitem(last=False)

    def counted(self, now: float) -> list[Prober]:
        self.forget_old(now)
        return [p for p in self.probers.values() if p.counts(now)]

    def all_satisfied_at(self, now: float) -> float | None:
        """When the last counted prober got its threshold of failures; None while any has not,
        or when nobody probes us (then there is no evidence, only the fixed propagation)."""
        counted = self.counted(now)
        if not counted or any(p.satisfied_at is None for p in counted):
            return None
        return max(p.satisfied_at for p in counted if p.satisfied_at is not None)

    def describe(self, now: float) -> str:
        counted = self.counted(now)
        if not counted:
            ignored = len(self.probers)
            return "no prober probing /ready" + (
                f" ({ignored} caller(s) not probing repeatedly)" if ignored else ""
            )
        return f"{len(counted)} prober(s): " + "; ".join(p.describe() for p in counted)


class ArrivalPace:
    """When requests and new connections arrived lately, to tell traffic still coming at its
    usual pace from traffic that stopped. ``times`` is appended to by the data path (one
    ``deque.append`` per arrival); the rest runs only while evidence is considered."""

    def __init__(self, times: deque[float] | None = None) -> None:
        self.times = deque(maxlen=ARRIVALS_KEPT) if times is None else times

    def last(self) -> float | None:
        return self.times[-1] if self.times else None

    def usual_gap(self, now: float) -> float:
        """The second longest gap between the recent arrivals (0 with fewer than three)."""
        recent = [at for at in self.times if now - at <= RECENT]
        gaps = sorted(later - earlier for earlier, later in itertools.pairwise(recent))
        return gaps[-2] if len(gaps) >= 2 else 0.0

    def quiet_needed(self, now: float) -> float:
        return PACE_FACTOR * self.usual_gap(now)

    def describe(self, now: float) -> str:
        last = self.last()
        if last is None:
            return "no request yet"
        return f"last arrival {now - last:.2f}s ago, usual gap {self.usual_gap(now):.2f}s"
