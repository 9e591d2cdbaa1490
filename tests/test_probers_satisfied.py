"""Issue 17: a prober's "satisfied" state (it has seen its threshold of 503s) lasts only while it
keeps seeing failures; rules are tried in order, each one's address and User-Agent both checked."""

from __future__ import annotations

from drainproxy.config.schema import ProberRule
from drainproxy.core.probers import (
    MAX_PEERS,
    MAX_PROBERS,
    PACE_FACTOR,
    RECENT,
    SPORADIC,
    ArrivalPace,
    Prober,
    ProberTracker,
)

LB = ("10.0.0.9", "lb")


def test_a_prober_that_sees_ready_again_is_no_longer_satisfied() -> None:
    """After a recovery the balancer sees 200s again: its earlier 503s are no evidence for the
    next drain, which must wait for a fresh threshold of failures."""
    probers = ProberTracker([], default_threshold=2)
    probers.record(*LB, ready=False, now=0.0)
    probers.record(*LB, ready=False, now=1.0)
    assert probers.all_satisfied_at(1.0) == 1.0
    probers.record(*LB, ready=True, now=2.0)
    assert probers.all_satisfied_at(2.0) is None
    probers.record(*LB, ready=False, now=3.0)
    assert probers.all_satisfied_at(3.0) is None, "one failure of two since it saw ready"
    probers.record(*LB, ready=False, now=4.0)
    assert probers.all_satisfied_at(4.0) == 4.0, "satisfied again, from the new failures"


def test_more_failures_past_the_threshold_keep_the_first_moment() -> None:
    probers = ProberTracker([], default_threshold=2)
    for at in (0.0, 1.0, 2.0, 3.0):
        probers.record(*LB, ready=False, now=at)
    assert probers.all_satisfied_at(3.0) == 1.0


def test_a_rule_for_another_address_is_skipped_not_the_end_of_the_rules() -> None:
    rules = [
        ProberRule(failure_threshold=5, address="10.0.0.1"),
        ProberRule(failure_threshold=4, address="10.0.0.9", user_agent=r"^kube-probe/"),
        ProberRule(failure_threshold=2, address="10.0.0.9"),
    ]
    probers = ProberTracker(rules, default_threshold=3)
    assert probers.threshold_for("10.0.0.9", "lb") == 2
    assert probers.threshold_for("10.0.0.9", "kube-probe/1.31") == 4
    assert probers.threshold_for("10.0.0.1", "kube-probe/1.31") == 5
    assert probers.threshold_for("10.0.0.2", "kube-probe/1.31") == 3
    probers.record(*LB, ready=False, now=0.0)
    probers.record(*LB, ready=False, now=1.0)
    assert probers.all_satisfied_at(1.0) == 1.0, "the address rule's threshold of 2 applies"


def test_a_prober_describes_itself_for_the_log() -> None:
    assert Prober("10.0.0.9", "", 2, 0.0).describe() == "10.0.0.9 - (0/2 x 503)"
    prober = Prober("10.0.0.1", "kube-probe/1.31", 1, 5.0, interval=0.5, consecutive_failures=1)
    assert prober.describe() == "10.0.0.1 kube-probe/1.31 (1/1 x 503, every 0.50s)"


def test_a_satisfied_prober_counts_until_recent_has_passed() -> None:
    probers = ProberTracker([], default_threshold=2)
    probers.record(*LB, ready=False, now=0.0)
    probers.record(*LB, ready=False, now=1.0)
    assert probers.all_satisfied_at(1.0 + RECENT) == 1.0, "exactly RECENT ago still counts"
    assert probers.all_satisfied_at(1.5 + RECENT) is None


def test_the_tracker_lists_every_prober_for_the_log() -> None:
    probers = ProberTracker([], default_threshold=2)
    for at in (0.0, 1.0):
        probers.record(*LB, ready=False, now=at)
        probers.record("10.0.0.1", "", ready=False, now=at)
    text = probers.describe(1.0)
    assert text.startswith("2 prober(s): ")
    assert "10.0.0.9 lb (2/2 x 503, every 1.00s); 10.0.0.1 - (2/2 x 503, every 1.00s)" in text


def test_no_prober_is_said_so_with_the_callers_seen_once() -> None:
    probers = ProberTracker([], default_threshold=2)
    assert probers.describe(0.0) == "no prober probing /ready"
    probers.record("10.0.0.50", "curl/8.5.0", ready=True, now=0.0)
    assert probers.describe(0.0) == "no prober probing /ready (1 caller(s) not probing repeatedly)"


def test_a_prober_is_probing_until_it_missed_two_intervals_and_the_slack() -> None:
    prober = Prober("10.0.0.9", "lb", 2, last_seen=1.0, interval=1.0)
    assert prober.probing(1.0 + 2 * 1.0 + 1.0)
    assert not prober.probing(1.0 + 2 * 1.0 + 1.5)


def test_the_least_recently_heard_prober_is_forgotten_first() -> None:
    probers = ProberTracker([], default_threshold=2)
    for index in range(MAX_PROBERS):
        probers.record(f"10.0.1.{index}", "lb", ready=True, now=index * 0.001)
    probers.record("10.0.1.0", "lb", ready=True, now=1.0)  # heard again: now the most recent
    probers.record("10.0.9.9", "new", ready=True, now=1.1)
    assert ("10.0.1.0", "lb") in probers.probers
    assert ("10.0.1.1", "lb") not in probers.probers


def test_the_least_recently_heard_client_is_forgotten_first() -> None:
    pace = ArrivalPace()
    for index in range(MAX_PEERS):
        pace.note(f"10.0.1.{index}", index * 0.001)
    pace.note("10.0.1.0", 1.0)
    pace.note("10.0.9.9", 1.1)
    assert "10.0.1.0" in pace.peers and "10.0.1.1" not in pace.peers


def test_a_client_pace_is_described_and_bounded_exactly() -> None:
    pace = ArrivalPace()
    assert pace.describe(0.0) == "no request yet"
    for at in (0.0, 1.0, 2.0):
        pace.note("10.0.0.1", at)
    assert pace.describe(2.5) == "last request 0.50s ago; 10.0.0.1 every 1.00s, last 0.50s ago"
    slow = ArrivalPace()
    for at in (0.0, SPORADIC):
        slow.note("10.0.0.2", at)
    assert slow.overdue_at(SPORADIC + 1) == SPORADIC + PACE_FACTOR * SPORADIC, "at SPORADIC"
    assert slow.overdue_at(SPORADIC + RECENT) is not None, "exactly RECENT ago still counts"
    assert slow.overdue_at(SPORADIC + RECENT + 0.5) is None


def test_of_two_clients_due_together_the_first_is_named() -> None:
    pace = ArrivalPace()
    for at in (0.0, 1.0):
        pace.note("10.0.0.1", at)
        pace.note("10.0.0.2", at)
    assert "; 10.0.0.1 every" in pace.describe(1.5)
