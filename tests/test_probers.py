from __future__ import annotations

import pytest

from drainproxy.config import ProberRule
from drainproxy.probers import (
    ARRIVALS_KEPT,
    MAX_PROBERS,
    PACE_FACTOR,
    RECENT,
    ArrivalPace,
    ProberTracker,
)

KUBELET = "kube-probe/1.31"


def tracker() -> ProberTracker:
    rules = [
        ProberRule(failure_threshold=1, user_agent=r"^kube-probe/"),
        ProberRule(failure_threshold=2, address="10.0.0.9"),
    ]
    return ProberTracker(rules, default_threshold=3)


def test_thresholds_come_from_the_first_matching_rule_else_the_default() -> None:
    probers = tracker()
    assert probers.threshold_for("10.0.0.1", KUBELET) == 1
    assert probers.threshold_for("10.0.0.9", "ELB-HealthChecker/2.0") == 2
    assert probers.threshold_for("10.0.0.7", "") == 3


def test_satisfied_only_when_every_prober_saw_its_threshold_of_failures() -> None:
    probers = tracker()
    assert probers.all_satisfied_at(0.0) is None, "nobody probes: no evidence"
    for at in (0.0, 0.5):
        probers.record("10.0.0.1", KUBELET, True, at)
        probers.record("10.0.0.9", "lb", True, at)
    probers.record("10.0.0.1", KUBELET, False, 1.0)
    assert probers.all_satisfied_at(1.0) is None
    probers.record("10.0.0.9", "lb", False, 1.1)
    probers.record("10.0.0.9", "lb", False, 1.6)
    assert probers.all_satisfied_at(1.6) == 1.6
    assert "2 prober(s)" in probers.describe(1.6)
    assert "every 0.50s" in probers.describe(1.6)


def test_a_success_resets_the_count() -> None:
    probers = tracker()
    for at, ready in ((0.0, False), (1.0, False), (2.0, True), (3.0, False)):
        probers.record("10.0.0.7", "", ready, at)
    assert probers.all_satisfied_at(3.0) is None
    probers.record("10.0.0.7", "", False, 4.0)
    probers.record("10.0.0.7", "", False, 5.0)
    assert probers.all_satisfied_at(5.0) == 5.0


def test_a_caller_seen_once_is_not_a_prober() -> None:
    """Issue 12: an operator's curl a few seconds before the drain must not hold it."""
    probers = tracker()
    probers.record("10.0.0.50", "curl/8.5.0", True, 0.0)
    for at in (1.0, 1.5, 2.0, 2.5):
        probers.record("10.0.0.9", "lb", at < 2.0, at)
    assert probers.all_satisfied_at(2.5) == 2.5
    assert "curl" not in probers.describe(2.5)


def test_a_prober_that_stopped_probing_no_longer_counts() -> None:
    """A start-up wait that polled /ready every 100 ms, then stopped."""
    probers = tracker()
    for step in range(10):
        probers.record("10.0.0.50", "wait-for-it", step < 9, step * 0.1)
    for at in (3.0, 3.5, 4.0, 4.5):
        probers.record("10.0.0.9", "lb", at < 4.0, at)
    assert probers.all_satisfied_at(4.5) == 4.5, "the waiter missed many of its intervals"
    kubelet = tracker()
    for at in (0.0, 10.0, 20.0):
        kubelet.record("10.0.0.1", KUBELET, True, at)
    kubelet.record("10.0.0.9", "lb", False, 24.0)
    kubelet.record("10.0.0.9", "lb", False, 24.5)
    assert kubelet.all_satisfied_at(25.0) is None, "every 10 s: it is not late yet"


def test_a_satisfied_prober_counts_even_when_it_stops() -> None:
    probers = tracker()
    for at in (0.0, 0.5, 1.0):
        probers.record("10.0.0.9", "lb", at < 0.5, at)
    assert probers.all_satisfied_at(30.0) == 1.0
    assert probers.all_satisfied_at(1.0 + RECENT + 1) is None, "forgotten after a while"


def test_the_table_is_bounded() -> None:
    """Anyone may call the unauthenticated /ready: the table keeps at most MAX_PROBERS, the
    least recently heard forgotten first, and nothing older than RECENT."""
    probers = tracker()
    for index in range(10 * MAX_PROBERS):
        probers.record(f"10.1.{index // 256}.{index % 256}", "flood", True, index * 0.001)
    assert len(probers.probers) == MAX_PROBERS
    probers.record("10.0.0.9", "lb", True, 10.0)
    probers.record("10.0.0.9", "lb", True, 10.5)
    assert ("10.0.0.9", "lb") in probers.probers
    probers.record("10.0.0.9", "lb", True, 10.0 + RECENT)
    probers.forget_old(10.0 + RECENT)
    assert list(probers.probers) == [("10.0.0.9", "lb")]


def test_the_usual_gap_between_arrivals() -> None:
    pace = ArrivalPace()
    assert pace.usual_gap(0.0) == 0.0 and pace.last() is None
    for index in range(10):
        pace.times.append(index * 1.5)  # a router every 1.5 s
    pace.times.append(13.6)  # one late arrival: not the usual gap
    assert pace.usual_gap(14.0) == pytest.approx(1.5)
    assert pace.quiet_needed(14.0) == pytest.approx(1.5 * PACE_FACTOR)
    busy = ArrivalPace()
    for index in range(100):
        busy.times.append(index * 0.01)
    assert len(busy.times) == ARRIVALS_KEPT
    assert busy.usual_gap(1.0) == pytest.approx(0.01)
    assert pace.usual_gap(14.0 + RECENT + 14) == 0.0, "old arrivals say nothing"
