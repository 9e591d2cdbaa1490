from __future__ import annotations

import pytest

from drainproxy.config.schema import ProberRule
from drainproxy.core.probers import (
    MAX_PEERS,
    MAX_PROBERS,
    MAX_UNMATCHED_PER_ADDRESS,
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


# --- a flood of /ready callers (issue 17): the real probers keep their place ------------------

BALANCER = ("10.0.0.9", "lb")


def flood_between_probes(probers: ProberTracker, prober: tuple[str, str], rounds: int) -> None:
    """``prober`` every 0.5 s, answered 200 then 503 from the third probe; between two probes,
    70 callers with made-up User-Agents from as many addresses (more than the table holds)."""
    for probe in range(rounds):
        at = probe * 0.5
        probers.record(*prober, ready=probe < 2, now=at)
        for index in range(70):
            probers.record(f"10.1.0.{index}", f"flood/{index}", ready=probe < 2, now=at + 0.001)


def test_a_flood_of_callers_does_not_push_out_a_prober_named_by_a_rule() -> None:
    """The defect: 70 User-Agents calling /ready in turn pushed the balancer out of the
    64-entry table before each of its probes, so nobody was counted and propagation ran to its
    maximum until the flood stopped. A prober matching a rule keeps its place."""
    probers = ProberTracker([ProberRule(failure_threshold=2, address="10.0.0.9")], 3)
    flood_between_probes(probers, BALANCER, rounds=4)
    assert probers.all_satisfied_at(1.5) == 1.5, "the balancer saw its 2 failures"
    assert len(probers.probers) == MAX_PROBERS
    assert probers.describe(1.5).startswith("1 prober(s): 10.0.0.9 lb (2/2 x 503")


def test_a_flood_of_callers_does_not_push_out_a_prober_already_counted() -> None:
    """Without a rule for it, a prober that has probed repeatedly before the flood began still
    keeps its place: newcomers displace only callers not counted (seen once, or stopped)."""
    probers = ProberTracker([], default_threshold=2)
    probers.record(*BALANCER, ready=True, now=-0.5)
    flood_between_probes(probers, BALANCER, rounds=4)
    assert probers.all_satisfied_at(1.5) == 1.5
    assert BALANCER in probers.probers


def test_one_client_address_holds_a_few_unmatched_callers_its_latest() -> None:
    probers = ProberTracker([ProberRule(failure_threshold=1, user_agent="^kube-probe/")], 3)
    probers.record("10.0.0.66", "kube-probe/1.31", ready=True, now=0.0)
    for index in range(70):
        probers.record("10.0.0.66", f"flood/{index}", ready=True, now=0.1 + index * 0.001)
    assert [agent for address, agent in probers.probers if address == "10.0.0.66"] == [
        "kube-probe/1.31",
        *(f"flood/{index}" for index in range(70 - MAX_UNMATCHED_PER_ADDRESS, 70)),
    ], "a matched prober is not one of the few; the oldest of the few made room"
    for index in range(MAX_PROBERS):
        probers.record(f"10.2.0.{index}", "other", ready=True, now=1.0 + index * 0.001)
    assert len(probers.probers) == MAX_PROBERS
    assert ("10.2.0.0", "other") not in probers.probers, "other clients still take turns"
    assert ("10.2.0.63", "other") in probers.probers


def test_a_client_whose_callers_all_probe_gets_no_more_places() -> None:
    """Each of its callers probes repeatedly: none of them gives way to a newcomer from that
    address, which is not tracked (a newcomer from another address is)."""
    probers = ProberTracker([], default_threshold=2)
    for at in (0.0, 0.5):
        for index in range(MAX_UNMATCHED_PER_ADDRESS):
            probers.record("10.0.0.66", f"lb/{index}", ready=True, now=at)
    probers.record("10.0.0.66", "newcomer", ready=False, now=0.6)
    probers.record("10.0.0.66", "newcomer", ready=False, now=0.7)
    assert ("10.0.0.66", "newcomer") not in probers.probers
    assert len(probers.probers) == MAX_UNMATCHED_PER_ADDRESS
    probers.record("10.0.0.67", "newcomer", ready=True, now=0.8)
    assert ("10.0.0.67", "newcomer") in probers.probers
    assert probers.all_satisfied_at(0.8) is None, "the four probing callers saw no failure"


def test_a_full_table_of_counted_callers_takes_only_probers_named_by_a_rule() -> None:
    rules = [ProberRule(failure_threshold=2, user_agent="^haproxy")]
    probers = ProberTracker(rules, default_threshold=2)
    for at in (0.0, 0.5):
        for index in range(MAX_PROBERS):
            probers.record(f"10.1.0.{index}", "lb", ready=True, now=at + index * 0.001)
    probers.record("10.0.0.1", "curl", ready=True, now=0.6)
    assert ("10.0.0.1", "curl") not in probers.probers, "no caller to displace"
    probers.record("10.0.0.1", "haproxy", ready=True, now=0.7)
    assert ("10.0.0.1", "haproxy") in probers.probers
    assert ("10.1.0.0", "lb") not in probers.probers, "the least recently heard gave way"
    assert len(probers.probers) == MAX_PROBERS


def test_a_full_table_of_probers_named_by_rules_gives_way_lowest_ranked_first() -> None:
    """Matched probers only give way to another matched one: first one not counted (the least
    recently heard), and a counted one only when every one is counted."""
    probers = ProberTracker([ProberRule(failure_threshold=2, user_agent="^lb")], 3)
    probers.record("10.0.0.1", "lb", ready=True, now=0.0)
    for index in range(1, MAX_PROBERS):
        probers.record(f"10.1.0.{index}", "lb", ready=True, now=0.1 + index * 0.001)
    probers.record("10.0.0.1", "lb", ready=True, now=0.5)  # now counted, and the latest heard
    probers.record("10.0.0.2", "curl", ready=True, now=0.6)
    assert ("10.0.0.2", "curl") not in probers.probers, "an unmatched caller displaces none"
    probers.record("10.0.0.2", "lb", ready=True, now=0.6)
    assert ("10.1.0.1", "lb") not in probers.probers and ("10.0.0.2", "lb") in probers.probers
    counted = ProberTracker([ProberRule(failure_threshold=2, user_agent="^lb")], 3)
    for at in (0.0, 0.5):
        for index in range(MAX_PROBERS):
            counted.record(f"10.1.0.{index}", "lb", ready=True, now=at + index * 0.001)
    counted.record("10.0.0.2", "lb", ready=True, now=0.6)
    assert ("10.1.0.0", "lb") not in counted.probers and ("10.0.0.2", "lb") in counted.probers
    assert len(counted.probers) == MAX_PROBERS


def test_a_prober_named_by_a_rule_displaces_unmatched_callers_even_counted_ones() -> None:
    probers = ProberTracker([ProberRule(failure_threshold=2, address="10.0.0.9")], 3)
    probers.record("10.1.0.0", "counted", ready=True, now=0.0)
    probers.record("10.1.0.0", "counted", ready=True, now=0.5)
    for index in range(1, MAX_PROBERS):
        probers.record(f"10.1.0.{index}", "lb", ready=True, now=0.6)
        probers.record(f"10.1.0.{index}", "lb", ready=True, now=0.7)
    probers.record("10.0.0.8", "curl", ready=True, now=0.8)
    assert ("10.0.0.8", "curl") not in probers.probers
    probers.record(*BALANCER, ready=True, now=0.8)
    assert BALANCER in probers.probers and ("10.1.0.0", "counted") not in probers.probers


def test_a_client_that_sent_two_requests_at_once_is_described_with_its_pace() -> None:
    pace = ArrivalPace()
    pace.note("10.0.0.1", 1.0)
    pace.note("10.0.0.1", 1.0)
    assert pace.describe(1.0) == "last request 0.00s ago; 10.0.0.1 every 0.00s, last 0.00s ago"


def test_a_flood_of_new_addresses_does_not_push_out_a_router_at_its_pace() -> None:
    """A router every 1.5 s; between its requests, more new addresses than the table holds,
    each seen once. Pushed out, the router would look new at its next request, with no pace,
    and propagation could end before its next one."""
    pace = ArrivalPace()
    for at in (0.0, 1.5, 3.0, 4.5):
        pace.note("10.0.0.2", at)
        if at >= 3.0:
            for index in range(MAX_PEERS + 10):
                pace.note(f"10.{at:.0f}.{index // 256}.{index % 256}", at + index * 0.0001)
    assert pace.overdue_at(4.6) == pytest.approx(4.5 + 1.5 * PACE_FACTOR)
    assert len(pace.peers) == MAX_PEERS


def test_when_every_client_has_a_pace_the_least_recently_heard_gives_way() -> None:
    pace = ArrivalPace()
    for at in (0.0, 1.0):
        for index in range(MAX_PEERS):
            pace.note(f"10.0.{index // 256}.{index % 256}", at + index * 0.001)
    pace.note("10.9.9.9", 2.0)
    assert "10.0.0.0" not in pace.peers and "10.0.0.1" in pace.peers
    assert len(pace.peers) == MAX_PEERS
    sporadic = ArrivalPace()
    sporadic.note("10.0.0.0", 0.0)
    sporadic.note("10.0.0.0", SPORADIC + 1)  # no pace: it gives way before the older ones
    for index in range(1, MAX_PEERS):
        for at in (SPORADIC + 2, SPORADIC + 3):
            sporadic.note(f"10.0.{index // 256}.{index % 256}", at)
    sporadic.note("10.0.0.0", SPORADIC + 4)  # heard again: the latest, still without a pace
    sporadic.note("10.9.9.9", SPORADIC + 5)
    assert "10.0.0.0" not in sporadic.peers and "10.0.0.1" in sporadic.peers
