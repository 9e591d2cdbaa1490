from __future__ import annotations

import pytest

from drainproxy.config.schema import ProberRule
from drainproxy.core.probers import (
    MAX_PEERS,
    MAX_PROBERS,
    PACE_FACTOR,
    RECENT,
    SPORADIC,
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


def test_a_client_still_arriving_at_its_pace_holds_and_then_is_overdue() -> None:
    pace = ArrivalPace()
    assert pace.overdue_at(0.0) is None and pace.describe(0.0) == "no request yet"
    for index in range(200):  # a busy balancer, until 2.0
        pace.note("10.0.0.1", index * 0.01)
    for at in (0.5, 2.0, 3.5):  # a router every 1.5 s
        pace.note("10.0.0.2", at)
    pace.note("10.0.0.3", 3.0)  # seen once: no pace
    assert pace.overdue_at(3.6) == pytest.approx(3.5 + 1.5 * PACE_FACTOR)
    assert "10.0.0.2 every 1.50s" in pace.describe(3.6)
    pace.note("10.0.0.2", 3.6)  # one quick request does not make it fast
    assert pace.overdue_at(3.7) == pytest.approx(3.6 + 1.5 * PACE_FACTOR)


def test_sporadic_and_old_clients_have_no_pace_and_the_table_is_bounded() -> None:
    pace = ArrivalPace()
    pace.note("10.0.0.9", 0.0)
    pace.note("10.0.0.9", SPORADIC + 1)
    assert pace.overdue_at(SPORADIC + 2) is None, "no pace a propagation could wait for"
    pace.note("10.0.0.2", 100.0)
    pace.note("10.0.0.2", 101.0)
    assert pace.overdue_at(101.0 + RECENT + 1) is None
    for index in range(3 * MAX_PEERS):
        pace.note(f"10.1.{index // 256}.{index % 256}", 200.0 + index * 0.001)
    assert len(pace.peers) == MAX_PEERS
