from __future__ import annotations

from drainproxy.config import ProberRule
from drainproxy.probers import RECENT, ProberTracker

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


def test_satisfied_only_when_every_recent_prober_saw_its_threshold_of_failures() -> None:
    probers = tracker()
    assert probers.all_satisfied_at(0.0) is None, "nobody probes: no evidence"
    probers.record("10.0.0.1", KUBELET, True, 0.0)
    probers.record("10.0.0.9", "lb", True, 0.0)
    probers.record("10.0.0.1", KUBELET, False, 1.0)
    assert probers.all_satisfied_at(1.0) is None
    probers.record("10.0.0.9", "lb", False, 1.1)
    probers.record("10.0.0.9", "lb", False, 1.6)
    assert probers.all_satisfied_at(1.6) == 1.6
    assert "2 prober(s)" in probers.describe(1.6)
    assert "every 0.50s" in probers.describe(1.6)


def test_a_success_resets_the_count_and_silent_probers_stop_counting() -> None:
    probers = tracker()
    probers.record("10.0.0.7", "", False, 0.0)
    probers.record("10.0.0.7", "", False, 1.0)
    probers.record("10.0.0.7", "", True, 2.0)
    probers.record("10.0.0.7", "", False, 3.0)
    probers.record("10.0.0.1", KUBELET, False, 3.0)
    assert probers.all_satisfied_at(3.0) is None
    assert probers.all_satisfied_at(3.0 + RECENT + 1) is None, "no recent prober at all"
    probers.record("10.0.0.1", KUBELET, False, 10.0)
    assert probers.all_satisfied_at(3.0 + RECENT + 1) == 3.0, "the silent prober no longer counts"
