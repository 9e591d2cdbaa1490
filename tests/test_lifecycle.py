"""The drain lifecycle as a pure state machine: a fake clock is stepped, nothing sleeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from drainproxy.core.lifecycle import (
    TRANSITIONS,
    DrainLifecycle,
    DrainSource,
    DrainTimings,
    Event,
    Evidence,
    Phase,
)
from drainproxy.errors import LifecycleError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


TIMINGS = DrainTimings(readiness_fail_delay=0.0, propagation=5.0, min=0.0, timeout=20.0)


def make(timings: DrainTimings = TIMINGS) -> tuple[DrainLifecycle, FakeClock]:
    clock = FakeClock()
    return DrainLifecycle(timings, clock), clock


def phases(lifecycle: DrainLifecycle) -> list[Phase]:
    return [t.phase for t in lifecycle.pop_transitions()]


def _step(lifecycle: DrainLifecycle, clock: FakeClock) -> None:
    """Move one phase further along the drain, by its deadline or its event."""
    if lifecycle.phase in (Phase.DELAYING, Phase.PROPAGATING):
        wait = lifecycle.time_until_deadline()
        assert wait is not None
        clock.advance(wait)
        lifecycle.poll()
    elif lifecycle.phase is Phase.DRAINING:
        lifecycle.note_quiescent()
    elif lifecycle.phase is Phase.STOPPING_APP:
        lifecycle.note_app_stopped()
    else:
        raise AssertionError(f"no step from {lifecycle.phase}")


def drive_to(phase: Phase, timings: DrainTimings = TIMINGS) -> tuple[DrainLifecycle, FakeClock]:
    """A lifecycle brought to ``phase`` by the shortest legal route."""
    if phase is Phase.DELAYING:
        timings = replace(timings, readiness_fail_delay=1.0)
    lifecycle, clock = make(timings)
    if phase is Phase.STOPPED:
        lifecycle.shutdown_now("test")
    elif phase is not Phase.SERVING:
        # An admin drain ends DRAINED; a preStop-only drain ends RECOVERING.
        lifecycle.request_drain(
            DrainSource.ADMIN if phase is Phase.DRAINED else DrainSource.PRESTOP
        )
        while lifecycle.phase is not phase:
            _step(lifecycle, clock)
    lifecycle.pop_transitions()
    return lifecycle, clock


def test_sigterm_runs_the_whole_sequence_and_exits() -> None:
    lifecycle, clock = make()
    assert lifecycle.is_ready() and lifecycle.accepts_connections()
    assert not lifecycle.should_close_connection()

    assert lifecycle.request_drain(DrainSource.SIGNAL) is True
    assert phases(lifecycle) == [Phase.PROPAGATING]
    assert not lifecycle.is_ready()
    assert lifecycle.accepts_connections()
    assert lifecycle.should_close_connection()
    assert lifecycle.time_until_deadline() == 5.0

    clock.advance(4.999)
    lifecycle.poll()
    assert lifecycle.phase is Phase.PROPAGATING
    clock.advance(0.001)
    lifecycle.poll()
    assert phases(lifecycle) == [Phase.DRAINING]
    assert not lifecycle.accepts_connections()
    assert lifecycle.time_until_deadline() == 20.0

    clock.advance(1.5)
    lifecycle.note_quiescent()
    assert phases(lifecycle) == [Phase.STOPPING_APP]
    lifecycle.note_app_stopped()
    assert phases(lifecycle) == [Phase.STOPPED]
    drain = lifecycle.completed_drains[-1]
    assert not drain.forced
    assert drain.phase_seconds == {
        Phase.PROPAGATING: 5.0,
        Phase.DRAINING: 1.5,
        Phase.STOPPING_APP: 0.0,
    }


def test_readiness_fail_delay_keeps_ready_first() -> None:
    lifecycle, clock = make(DrainTimings(readiness_fail_delay=2.0, propagation=5.0, timeout=20.0))
    lifecycle.request_drain(DrainSource.SIGNAL)
    assert phases(lifecycle) == [Phase.DELAYING]
    assert lifecycle.is_ready()
    assert not lifecycle.should_close_connection()
    clock.advance(2.0)
    lifecycle.poll()
    assert phases(lifecycle) == [Phase.PROPAGATING]
    assert lifecycle.time_until_deadline() == 5.0


def test_late_poll_applies_every_passed_deadline_in_order() -> None:
    lifecycle, clock = make(DrainTimings(readiness_fail_delay=1.0, propagation=1.0, timeout=20.0))
    lifecycle.request_drain(DrainSource.SIGNAL)
    clock.advance(10.0)
    lifecycle.poll()
    assert phases(lifecycle) == [Phase.DELAYING, Phase.PROPAGATING, Phase.DRAINING]
    # Deadlines chain from when each phase was due, not from the late wake-up.
    assert lifecycle.timeout_deadline == 1000.0 + 1.0 + 1.0 + 20.0


def test_quiescent_before_drain_min_waits_for_it() -> None:
    lifecycle, clock = drive_to(
        Phase.DRAINING, DrainTimings(propagation=5.0, min=3.0, timeout=20.0)
    )
    clock.advance(1.0)
    lifecycle.note_quiescent()
    assert lifecycle.phase is Phase.DRAINING
    assert lifecycle.time_until_deadline() == 2.0
    clock.advance(2.0)
    lifecycle.poll()
    assert phases(lifecycle) == [Phase.STOPPING_APP]
    lifecycle.note_app_stopped()
    assert phases(lifecycle) == [Phase.RECOVERING]
    (drain,) = lifecycle.completed_drains
    assert not drain.forced, "it went quiet: nothing was cut"
    assert drain.quiescent_at == clock.now - 2.0


def test_drain_timeout_forces_the_end() -> None:
    lifecycle, clock = drive_to(Phase.DRAINING)
    clock.advance(19.9)
    lifecycle.poll()
    assert lifecycle.phase is Phase.DRAINING
    clock.advance(0.1)
    lifecycle.poll()
    assert phases(lifecycle) == [Phase.STOPPING_APP]
    assert lifecycle.drain is not None and lifecycle.drain.forced


def test_repeated_triggers_start_no_second_drain() -> None:
    lifecycle, clock = make()
    assert lifecycle.request_drain(DrainSource.PRESTOP)
    deadline = lifecycle.deadline
    clock.advance(1.0)
    assert not lifecycle.request_drain(DrainSource.SIGNAL)
    assert not lifecycle.request_drain(DrainSource.PRESTOP)
    assert phases(lifecycle) == [Phase.PROPAGATING]
    assert lifecycle.deadline == deadline
    assert lifecycle.drain is not None
    assert lifecycle.drain.sources == {DrainSource.PRESTOP, DrainSource.SIGNAL}


def test_prestop_only_recovers_when_the_app_is_back() -> None:
    lifecycle, _ = drive_to(Phase.STOPPING_APP)
    lifecycle.note_app_stopped()
    assert phases(lifecycle) == [Phase.RECOVERING]
    assert not lifecycle.is_ready()
    assert lifecycle.accepts_connections()
    lifecycle.note_app_ready()
    assert phases(lifecycle) == [Phase.SERVING]
    assert lifecycle.is_ready() and not lifecycle.should_close_connection()
    assert lifecycle.drain is None


def test_signal_during_a_prestop_drain_makes_it_exit() -> None:
    lifecycle, _ = drive_to(Phase.DRAINING)
    lifecycle.request_drain(DrainSource.SIGNAL)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    assert phases(lifecycle) == [Phase.STOPPING_APP, Phase.STOPPED]


def test_admin_drain_stays_drained_until_a_signal() -> None:
    lifecycle, _ = drive_to(Phase.DRAINED)
    assert not lifecycle.is_ready() and not lifecycle.accepts_connections()
    assert not lifecycle.request_drain(DrainSource.PRESTOP)
    assert lifecycle.phase is Phase.DRAINED
    lifecycle.request_drain(DrainSource.SIGNAL)
    assert phases(lifecycle) == [Phase.STOPPED]


def test_signal_while_recovering_starts_a_new_drain() -> None:
    lifecycle, _ = drive_to(Phase.RECOVERING)
    assert lifecycle.request_drain(DrainSource.SIGNAL)
    assert phases(lifecycle) == [Phase.PROPAGATING]
    assert lifecycle.exit_requested


def test_each_drain_releases_only_its_own_prestop_calls() -> None:
    """Issue 12: a preStop call while recovering, or in a later drain, waits for that drain."""
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.PRESTOP)
    assert lifecycle.prestop_waits_for() == 1
    while lifecycle.phase is not Phase.STOPPING_APP:
        _step(lifecycle, clock)
    assert lifecycle.prestop_waits_for() == 1, "due, not yet released"
    assert lifecycle.note_app_released() == 1
    assert lifecycle.prestop_waits_for() is None, "a repeat after the release returns at once"
    lifecycle.pop_transitions()
    lifecycle.note_app_stopped()
    assert phases(lifecycle) == [Phase.RECOVERING]
    assert lifecycle.prestop_waits_for() is None
    lifecycle.request_drain(DrainSource.PRESTOP)  # the hook again, while recovering
    assert phases(lifecycle) == [Phase.PROPAGATING]
    assert lifecycle.prestop_waits_for() == 2
    with pytest.raises(LifecycleError):
        lifecycle.note_app_released()
    while lifecycle.phase is not Phase.STOPPING_APP:
        _step(lifecycle, clock)
    assert lifecycle.note_app_released() == 2
    lifecycle.note_app_stopped()
    lifecycle.note_app_ready()
    lifecycle.request_drain(DrainSource.SIGNAL)
    assert lifecycle.prestop_waits_for() == 3, "a later drain started by SIGTERM"


def test_prestop_returns_at_once_when_stopping_or_already_released() -> None:
    drained, _ = drive_to(Phase.DRAINED)
    drained.request_drain(DrainSource.PRESTOP)
    assert drained.prestop_waits_for() is None, "the admin drain already stopped the app"
    stopped, _ = drive_to(Phase.STOPPED)
    assert stopped.prestop_waits_for() is None


@pytest.mark.parametrize("phase", [p for p in Phase if p is not Phase.STOPPED])
def test_shutdown_now_from_any_phase(phase: Phase) -> None:
    lifecycle, _ = drive_to(phase)
    lifecycle.shutdown_now("SIGQUIT")
    assert phases(lifecycle) == [Phase.STOPPED]
    assert lifecycle.immediate


_EVENT_CALLS: dict[Event, Callable[[DrainLifecycle], None]] = {
    Event.QUIESCENT: DrainLifecycle.note_quiescent,
    Event.APP_STOPPED: DrainLifecycle.note_app_stopped,
    Event.APP_READY: DrainLifecycle.note_app_ready,
    Event.SHUTDOWN_NOW: lambda lifecycle: lifecycle.shutdown_now("test"),
}

_ILLEGAL = [
    (phase, event)
    for phase in (
        Phase.SERVING,
        Phase.PROPAGATING,
        Phase.DRAINING,
        Phase.STOPPING_APP,
        Phase.RECOVERING,
        Phase.DRAINED,
        Phase.STOPPED,
    )
    for event in _EVENT_CALLS
    if (phase, event) not in TRANSITIONS
]


@pytest.mark.parametrize(("phase", "event"), _ILLEGAL, ids=lambda v: getattr(v, "value", v))
def test_illegal_events_raise_and_change_nothing(phase: Phase, event: Event) -> None:
    lifecycle, _ = drive_to(phase)
    before = (lifecycle.phase, lifecycle.deadline, lifecycle.phase_entered_at)
    with pytest.raises(LifecycleError, match=event.value):
        _EVENT_CALLS[event](lifecycle)
    assert (lifecycle.phase, lifecycle.deadline, lifecycle.phase_entered_at) == before
    assert lifecycle.pop_transitions() == []


def test_every_move_is_checked_against_the_table() -> None:
    """The table binds the methods too: a move it does not list (a driver or method bug) raises,
    naming the event and both phases, and changes nothing."""
    lifecycle, _ = drive_to(Phase.DRAINING)
    with pytest.raises(LifecycleError, match=r"^app_ready cannot lead from draining to serving$"):
        lifecycle._move(Event.APP_READY, Phase.SERVING, "a bug")
    assert lifecycle.phase is Phase.DRAINING and lifecycle.pop_transitions() == []


def test_every_transition_target_is_reachable_in_the_table() -> None:
    targets = {phase for allowed in TRANSITIONS.values() for phase in allowed}
    assert targets | {Phase.SERVING} == set(Phase)


# --- evidence-based propagation ----------------------------------------------------------------

EVIDENCE = DrainTimings(
    propagation=10.0,
    timeout=20.0,
    evidence=True,
    propagation_min=1.0,
    propagation_margin=0.5,
    quiet=0.3,
)


def evidence(
    satisfied: float | None, arrival: float | None = None, overdue: float | None = None
) -> Evidence:
    return Evidence(
        probers_satisfied_at=satisfied,
        last_arrival_at=arrival,
        traffic_overdue_at=overdue,
        probers="P",
        traffic="T",
    )


def test_evidence_ends_propagation_after_margin_and_quiet() -> None:
    lifecycle, clock = drive_to(Phase.PROPAGATING, EVIDENCE)
    start = clock.now
    lifecycle.consider_evidence(evidence(None))
    assert lifecycle.deadline == start + 10.0, "no evidence yet: the fixed maximum"
    clock.advance(1.2)
    lifecycle.consider_evidence(evidence(start + 1.2, arrival=start + 1.1))
    assert lifecycle.phase is Phase.PROPAGATING
    assert lifecycle.deadline == pytest.approx(start + 1.7), "satisfied + margin"
    clock.advance(0.5)
    lifecycle.consider_evidence(evidence(start + 1.2, arrival=start + 1.6))
    assert lifecycle.deadline == pytest.approx(start + 1.9), "a new connection: wait for quiet"
    clock.advance(0.2)
    lifecycle.consider_evidence(evidence(start + 1.2, arrival=start + 1.6))
    transitions = lifecycle.pop_transitions()
    assert [t.phase for t in transitions] == [Phase.DRAINING]
    assert transitions[0].reason.startswith("evidence: ")


def test_evidence_never_ends_propagation_before_its_minimum() -> None:
    lifecycle, clock = drive_to(Phase.PROPAGATING, EVIDENCE)
    start = clock.now
    clock.advance(0.6)
    lifecycle.consider_evidence(evidence(start))
    assert lifecycle.phase is Phase.PROPAGATING
    assert lifecycle.deadline == start + 1.0


def test_evidence_never_extends_propagation_past_its_maximum() -> None:
    lifecycle, clock = drive_to(Phase.PROPAGATING, EVIDENCE)
    start = clock.now
    clock.advance(9.9)
    lifecycle.consider_evidence(evidence(start + 9.8))
    assert lifecycle.deadline == start + 10.0
    clock.advance(0.1)
    lifecycle.poll()
    transitions = lifecycle.pop_transitions()
    assert [(t.phase, t.reason) for t in transitions] == [
        (Phase.DRAINING, "propagation ran to its maximum; held by probers: P")
    ]


def test_traffic_at_its_usual_pace_holds_propagation() -> None:
    """Issue 12: probers all satisfied, but a router still arrives every 1.5 s."""
    lifecycle, clock = drive_to(Phase.PROPAGATING, EVIDENCE)
    start = clock.now
    clock.advance(2.8)
    lifecycle.consider_evidence(evidence(start + 2.0, start + 2.5, overdue=start + 4.75))
    assert lifecycle.phase is Phase.PROPAGATING
    assert lifecycle.deadline == pytest.approx(start + 4.75), "until the router is overdue"
    assert lifecycle.evidence_holding == "traffic still arriving: T"
    clock.advance(1.2)  # 4.0: it came again at 4.0
    lifecycle.consider_evidence(evidence(start + 2.0, start + 4.0, overdue=start + 6.25))
    assert lifecycle.deadline == pytest.approx(start + 6.25)
    clock.advance(2.25)
    lifecycle.consider_evidence(evidence(start + 2.0, start + 4.0, overdue=start + 6.25))
    transitions = lifecycle.pop_transitions()
    assert [t.phase for t in transitions] == [Phase.DRAINING]
    assert transitions[0].reason == "evidence: P; traffic stopped: T"


def test_traffic_that_never_stops_holds_to_the_maximum_and_says_so() -> None:
    lifecycle, clock = drive_to(Phase.PROPAGATING, EVIDENCE)
    start = clock.now
    clock.advance(9.5)
    lifecycle.consider_evidence(evidence(start + 2.0, start + 9.4, overdue=start + 10.9))
    clock.advance(0.5)
    lifecycle.poll()
    (transition,) = lifecycle.pop_transitions()
    assert transition.reason == (
        "propagation ran to its maximum; held by traffic still arriving: T"
    )


def test_evidence_is_ignored_in_fixed_mode() -> None:
    lifecycle, clock = drive_to(Phase.PROPAGATING)
    clock.advance(4.0)
    lifecycle.consider_evidence(evidence(clock.now - 3.0))
    assert lifecycle.phase is Phase.PROPAGATING
    assert lifecycle.deadline == clock.now + 1.0


def test_evidence_complete_only_at_the_maximum_leaves_the_end_to_the_maximum() -> None:
    """propagation_min equal to propagation: evidence can never end the phase early. Considered
    at the maximum (the driver's clock moved on after its poll), the phase still ends at the
    maximum, and the log says what held it, not "evidence"."""
    lifecycle, clock = drive_to(Phase.PROPAGATING, replace(EVIDENCE, propagation_min=10.0))
    start = clock.now
    clock.advance(10.0)
    lifecycle.consider_evidence(evidence(start + 1.0))
    assert lifecycle.pop_transitions() == []
    assert lifecycle.deadline == start + 10.0
    lifecycle.poll()
    (transition,) = lifecycle.pop_transitions()
    assert (transition.phase, transition.at, transition.reason) == (
        Phase.DRAINING,
        start + 10.0,
        "propagation ran to its maximum; held by propagation_min 10s",
    )
