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
bounded: at most ``MAX_PROBERS``, each forgotten ``RECENT`` seconds after it was last heard. Since
anyone may call /ready, a flood of callers must not push the real probers out (then nobody would
be counted and only the maximum propagation would apply): a caller matching no ``drain.probers``
rule never displaces one that matches a rule, nor a caller still counted, and one client address
holds at most ``MAX_UNMATCHED_PER_ADDRESS`` of them.

Traffic. Probe failures say nothing about the routers that never probe (kube-proxy, ingress
controllers and service meshes follow the EndpointSlice, which the kubelet's verdict updates
later): only their traffic shows they have not caught up. So requests are timed per client
address, and propagation may not end while a client still comes at its usual pace: until each
one has missed ``PACE_FACTOR`` of its own intervals (a busy balancer that stopped is overdue at
once; a router requesting every 1.5 s, only after 2.25 s without a request).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from drainproxy.config.schema import ProberRule

#: A prober not heard from for this long is forgotten.
RECENT = 60.0
#: At most this many probers are tracked. The endpoint is unauthenticated: anyone may call it
#: from anywhere, any number of times, so a newcomer displaces the least recently heard of the
#: callers ranked lowest: matching no rule before matching one, not counted before counted.
MAX_PROBERS = 64
#: Callers matching no ``drain.probers`` rule, per client address: a node's kubelet and a
#: balancer or two, and no client can fill the table with made-up User-Agents.
MAX_UNMATCHED_PER_ADDRESS = 4
#: A prober that missed this many of its own intervals (plus ``LATE_SLACK``) stopped probing.
MISSED_INTERVALS = 2.0
LATE_SLACK = 1.0
#: Client addresses tracked for their pace, and how many of its intervals a client may miss
#: before it counts as gone.
MAX_PEERS = 256
PACE_FACTOR = 1.5
#: A client requesting less often than this has no pace a propagation could wait for.
SPORADIC = 40.0


@dataclass
class Prober:
    address: str
    user_agent: str
    threshold: int
    last_seen: float
    interval: float | None = None
    consecutive_failures: int = 0
    satisfied_at: float | None = None
    #: It matches a ``drain.probers`` rule: a prober the operator named, kept in the table.
    matched: bool = False

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

    def rule_for(self, address: str, user_agent: str) -> ProberRule | None:
        """The first ``drain.probers`` rule matching this caller, if any."""
        for rule in self.rules:
            if rule.address is not None and rule.address != address:
                continue
            if rule.user_agent is not None and not re.search(rule.user_agent, user_agent):
                continue
            return rule
        return None

    def threshold_for(self, address: str, user_agent: str) -> int:
        rule = self.rule_for(address, user_agent)
        return self.default_threshold if rule is None else rule.failure_threshold

    def record(self, address: str, user_agent: str, ready: bool, now: float) -> None:
        key = (address, user_agent)
        prober = self.probers.get(key)
        if prober is None:
            rule = self.rule_for(address, user_agent)
            if not self._make_room(address, rule is not None, now):
                return
            threshold = self.default_threshold if rule is None else rule.failure_threshold
            prober = Prober(address, user_agent, threshold, now, matched=rule is not None)
            self.probers[key] = prober
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

    def _make_room(self, address: str, matched: bool, now: float) -> bool:
        """Room for a new caller, displacing another if need be; False when it is not tracked:
        a caller matching no rule may displace only another such caller that is not counted,
        of its own address once that address holds ``MAX_UNMATCHED_PER_ADDRESS``."""
        self.forget_old(now)
        if matched:
            if len(self.probers) >= MAX_PROBERS:
                lowest = min(self.probers.values(), key=lambda p: (p.matched, p.counts(now)))
                del self.probers[lowest.address, lowest.user_agent]
            return True
        unmatched = [p for p in self.probers.values() if not p.matched]
        own = [p for p in unmatched if p.address == address]
        if len(own) >= MAX_UNMATCHED_PER_ADDRESS:
            rivals = own
        elif len(self.probers) >= MAX_PROBERS:
            rivals = unmatched
        else:
            return True
        for rival in rivals:
            if not rival.counts(now):
                del self.probers[rival.address, rival.user_agent]
                return True
        return False

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


@dataclass(slots=True)
class Peer:
    """One client address's recent requests."""

    last: float
    gap: float | None = None
    previous_gap: float | None = None

    def interval(self) -> float | None:
        """Its usual time between requests: the longer of its last two gaps (one quick
        request after another does not make a slow router look fast)."""
        if self.gap is None:
            return None
        return self.gap if self.previous_gap is None else max(self.gap, self.previous_gap)

    def pace(self, now: float) -> float | None:
        """Its interval, when it is a pace a propagation could wait for: None for a client
        seen once, one requesting less often than ``SPORADIC``, or not heard for ``RECENT``."""
        interval = self.interval()
        if interval is None or interval > SPORADIC or now - self.last > RECENT:
            return None
        return interval


class ArrivalPace:
    """Requests by client address (a router, a balancer node, an ingress controller pod), to
    tell a client still arriving at its usual pace from one that stopped. ``note`` runs on the
    data path, only in evidence mode. The table is bounded like the probers', and a flood of
    new addresses must not push out the routers whose pace holds propagation: a new address
    displaces the least recently heard client without a pace, and only when every one has a
    pace, the least recently heard."""

    def __init__(self) -> None:
        #: Least recently heard first.
        self.peers: OrderedDict[str, Peer] = OrderedDict()
        self.last_arrival: float | None = None

    def note(self, address: str, now: float) -> None:
        self.last_arrival = now
        peer = self.peers.get(address)
        if peer is None:
            if len(self.peers) >= MAX_PEERS:
                unpaced = next((a for a, p in self.peers.items() if p.pace(now) is None), None)
                if unpaced is None:
                    self.peers.popitem(last=False)
                else:
                    del self.peers[unpaced]
            self.peers[address] = Peer(now)
            return
        self.peers.move_to_end(address)
        peer.previous_gap, peer.gap = peer.gap, now - peer.last
        peer.last = now

    def _paced(self, now: float) -> tuple[float, str, float, float] | None:
        """The client whose next request, at its pace, is due last: when it becomes overdue
        (``PACE_FACTOR`` intervals after its last request), its address, interval and last
        request."""
        latest: tuple[float, str, float, float] | None = None
        for address, peer in self.peers.items():
            interval = peer.pace(now)
            if interval is None:
                continue
            overdue_at = peer.last + PACE_FACTOR * interval
            if latest is None or overdue_at > latest[0]:
                latest = (overdue_at, address, interval, peer.last)
        return latest

    def overdue_at(self, now: float) -> float | None:
        """When every client arriving at a pace will have missed its next request; None when
        no client has one."""
        paced = self._paced(now)
        return None if paced is None else paced[0]

    def describe(self, now: float) -> str:
        if self.last_arrival is None:
            return "no request yet"
        text = f"last request {now - self.last_arrival:.2f}s ago"
        paced = self._paced(now)
        if paced is not None:
            _, address, interval, last = paced
            text += f"; {address} every {interval:.2f}s, last {now - last:.2f}s ago"
        return text
