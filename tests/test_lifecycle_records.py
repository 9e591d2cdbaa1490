"""Issue 17: what the lifecycle leaves behind for the driver, /status and the drain summary.

Deadline hygiene: a phase with no deadline must hold none (a stale deadline in the past makes
the driver's wait 0 s, so it spins at 100 % CPU; /status would report it), a phase's deadline
is exact (the driver sleeps exactly until it), and a late wake-up ends each phase at its
deadline, not at the wake-up. Drain records: each drain is recorded once, when it is over, with
who asked, whether anything was cut (``forced``) and the seconds spent in each phase. A fake
clock is stepped in binary-exact steps, so equalities are exact.
"""

from __future__ import annotations

import pytest

from drainproxy.core.lifecycle import (
    DrainLifecycle,
    DrainSource,
    DrainTimings,
    Evidence,
    Phase,
    Transition,
)
from drainproxy.errors import LifecycleError

START = 1000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    readiness_fail_delay: float = 0.0,
    propagation: float = 2.0,
    min: float = 0.0,
    timeout: float = 8.0,
) -> tuple[DrainLifecycle, FakeClock]:
    clock = FakeClock()
    timings = DrainTimings(readiness_fail_delay, propagation, min, timeout)
    return DrainLifecycle(timings, clock), clock


def phase_of(lifecycle: DrainLifecycle) -> Phase:
    """The phase, read through a call (so the type checker does not narrow it for good)."""
    return lifecycle.phase


#: The phases that end on a deadline; every other phase waits for an event and holds none.
_TIMED = {Phase.DELAYING, Phase.PROPAGATING, Phase.DRAINING}


def assert_deadlines_clean(lifecycle: DrainLifecycle) -> None:
    """Each deadline is set in its own phase only, and the driver is never told to wake at
    once for nothing: after ``poll()``, the wait is None (no deadline) or positive."""
    phase = lifecycle.phase
    assert (lifecycle.deadline is not None) == (phase in _TIMED), phase
    assert (lifecycle.propagation_deadline is not None) == (phase is Phase.PROPAGATING), phase
    assert (lifecycle.min_deadline is not None) == (phase is Phase.DRAINING), phase
    assert (lifecycle.timeout_deadline is not None) == (phase is Phase.DRAINING), phase
    wait = lifecycle.time_until_deadline()
    assert (wait is None) == (phase not in _TIMED), phase
    assert wait is None or wait > 0, f"a zero wait in {phase}: the driver would spin"


def settle(lifecycle: DrainLifecycle) -> list[Transition]:
    """What the driver does on waking: poll, act on the transitions, check what it waits for."""
    lifecycle.poll()
    transitions = lifecycle.pop_transitions()
    assert_deadlines_clean(lifecycle)
    return transitions


def sleep_until_deadline(lifecycle: DrainLifecycle, clock: FakeClock) -> list[Transition]:
    wait = lifecycle.time_until_deadline()
    assert wait is not None
    clock.advance(wait)
    return settle(lifecycle)


# --- deadline hygiene ------------------------------------------------------------------------


def test_a_new_lifecycle_serves_with_no_deadline_and_no_drain() -> None:
    lifecycle, clock = make()
    assert_deadlines_clean(lifecycle)
    assert phase_of(lifecycle) is Phase.SERVING
    assert lifecycle.phase_entered_at == START
    assert not lifecycle.exit_requested and not lifecycle.immediate
    assert not lifecycle.is_draining() and lifecycle.drain is None
    clock.advance(0.5)
    assert lifecycle.seconds_in_phase() == 0.5
    assert settle(lifecycle) == []


@pytest.mark.parametrize(
    "route",
    ["quiescent at once", "quiescent before min", "timeout", "admin then signal", "liveness"],
)
def test_no_deadline_is_left_behind_along_a_whole_drain(route: str) -> None:
    """After every step of every route, the only deadlines held are the current phase's."""
    lifecycle, clock = make(readiness_fail_delay=0.5, min=1.0)
    source = {"admin then signal": DrainSource.ADMIN, "liveness": DrainSource.PRESTOP}.get(
        route, DrainSource.SIGNAL
    )
    assert lifecycle.request_drain(source)
    assert_deadlines_clean(lifecycle)
    sleep_until_deadline(lifecycle, clock)  # DELAYING -> PROPAGATING
    sleep_until_deadline(lifecycle, clock)  # PROPAGATING -> DRAINING
    assert phase_of(lifecycle) is Phase.DRAINING
    if route == "quiescent at once":
        clock.advance(1.0)
        lifecycle.note_quiescent()
    elif route == "quiescent before min":
        clock.advance(0.5)
        lifecycle.note_quiescent()
        assert settle(lifecycle) == []
        sleep_until_deadline(lifecycle, clock)
    elif route == "timeout":
        sleep_until_deadline(lifecycle, clock)
    else:
        lifecycle.note_quiescent()
        sleep_until_deadline(lifecycle, clock)
    assert phase_of(lifecycle) is Phase.STOPPING_APP
    assert_deadlines_clean(lifecycle)
    lifecycle.pop_transitions()
    clock.advance(100.0)  # the app takes its time to stop: nothing is due meanwhile
    assert settle(lifecycle) == []
    lifecycle.note_app_stopped()
    assert_deadlines_clean(lifecycle)
    if route == "admin then signal":
        assert phase_of(lifecycle) is Phase.DRAINED
        lifecycle.request_drain(DrainSource.SIGNAL)
    elif route == "liveness":
        assert phase_of(lifecycle) is Phase.RECOVERING
        lifecycle.note_app_ready()
        assert phase_of(lifecycle) is Phase.SERVING
    else:
        assert phase_of(lifecycle) is Phase.STOPPED
    assert_deadlines_clean(lifecycle)
    assert settle(lifecycle)


@pytest.mark.parametrize("phase", [Phase.DELAYING, Phase.PROPAGATING, Phase.DRAINING])
def test_shutdown_now_leaves_no_deadline(phase: Phase) -> None:
    lifecycle, clock = make(readiness_fail_delay=0.5)
    lifecycle.request_drain(DrainSource.SIGNAL)
    while lifecycle.phase is not phase:
        sleep_until_deadline(lifecycle, clock)
    lifecycle.shutdown_now("SIGQUIT")
    assert phase_of(lifecycle) is Phase.STOPPED
    assert_deadlines_clean(lifecycle)


def test_a_second_drain_after_a_recovery_shows_none_of_the_first_ones_deadlines() -> None:
    """/status reports drain.min and drain.timeout while draining: a later drain must not show
    the first drain's (long past) ones while it is still propagating."""
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.PRESTOP)
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    lifecycle.note_app_ready()
    clock.advance(50.0)
    assert lifecycle.request_drain(DrainSource.SIGNAL)
    assert phase_of(lifecycle) is Phase.PROPAGATING
    assert_deadlines_clean(lifecycle)
    assert lifecycle.propagation_deadline == START + 2.0 + 50.0 + 2.0


def test_the_wait_ends_exactly_at_the_deadline() -> None:
    """The driver sleeps ``time_until_deadline()``: not a moment longer than what is left."""
    lifecycle, clock = make(readiness_fail_delay=0.5)
    lifecycle.request_drain(DrainSource.SIGNAL)
    lifecycle.pop_transitions()
    assert lifecycle.time_until_deadline() == 0.5
    clock.advance(0.25)
    assert lifecycle.time_until_deadline() == 0.25
    assert settle(lifecycle) == []
    clock.advance(0.25)
    assert lifecycle.time_until_deadline() == 0.0, "due now"
    assert [t.phase for t in settle(lifecycle)] == [Phase.PROPAGATING]
    assert lifecycle.time_until_deadline() == 2.0
    clock.advance(1.75)
    assert lifecycle.time_until_deadline() == 0.25
    clock.advance(0.5)
    assert lifecycle.time_until_deadline() == 0.0, "overdue: wake at once, never negative"


def test_a_late_wake_up_ends_each_phase_at_its_own_deadline() -> None:
    lifecycle, clock = make(readiness_fail_delay=1.0, propagation=2.0, timeout=4.0)
    lifecycle.request_drain(DrainSource.SIGNAL)
    clock.advance(100.0)
    assert settle(lifecycle) == [
        Transition(Phase.SERVING, Phase.DELAYING, START, "drain requested by signal"),
        Transition(Phase.DELAYING, Phase.PROPAGATING, START + 1.0, "readiness_fail_delay over"),
        Transition(Phase.PROPAGATING, Phase.DRAINING, START + 3.0, "propagation over"),
        Transition(Phase.DRAINING, Phase.STOPPING_APP, START + 7.0, "drain.timeout reached"),
    ]
    assert lifecycle.phase_entered_at == START + 7.0
    assert lifecycle.seconds_in_phase() == 93.0
    drain = lifecycle.drain
    assert drain is not None and drain.forced
    assert drain.phase_seconds == {Phase.DELAYING: 1.0, Phase.PROPAGATING: 2.0, Phase.DRAINING: 4.0}


def test_a_late_wake_up_after_quiescence_ends_the_drain_at_drain_min() -> None:
    lifecycle, clock = make(min=3.0)
    lifecycle.request_drain(DrainSource.SIGNAL)
    sleep_until_deadline(lifecycle, clock)
    clock.advance(1.0)
    lifecycle.note_quiescent()
    assert lifecycle.time_until_deadline() == 2.0
    clock.advance(10.0)
    assert settle(lifecycle) == [
        Transition(Phase.DRAINING, Phase.STOPPING_APP, START + 5.0, "quiescent, drain.min over")
    ]


# --- drain records -----------------------------------------------------------------------------


def test_a_signal_drain_is_recorded_once_when_over_with_every_transition() -> None:
    lifecycle, clock = make()
    assert lifecycle.request_drain(DrainSource.SIGNAL) is True
    assert lifecycle.is_draining()
    drain = lifecycle.drain
    assert drain is not None and drain.started_at == START and drain.sources == {DrainSource.SIGNAL}
    assert lifecycle.exit_requested
    clock.advance(2.0)
    lifecycle.poll()
    clock.advance(0.5)
    lifecycle.note_quiescent()
    assert lifecycle.completed_drains == [], "not over while the app is being stopped"
    clock.advance(0.25)
    lifecycle.note_app_stopped()
    assert lifecycle.pop_transitions() == [
        Transition(Phase.SERVING, Phase.PROPAGATING, START, "drain requested by signal"),
        Transition(Phase.PROPAGATING, Phase.DRAINING, START + 2.0, "propagation over"),
        Transition(Phase.DRAINING, Phase.STOPPING_APP, START + 2.5, "no connection left"),
        Transition(
            Phase.STOPPING_APP, Phase.STOPPED, START + 2.75, "app stopped, exit requested by signal"
        ),
    ]
    assert lifecycle.completed_drains == [drain]
    assert lifecycle.completed_drains[0] is drain
    assert not drain.forced and drain.quiescent_at == START + 2.5
    assert drain.phase_seconds == {
        Phase.PROPAGATING: 2.0,
        Phase.DRAINING: 0.5,
        Phase.STOPPING_APP: 0.25,
    }
    assert lifecycle.is_draining()


def test_per_phase_seconds_with_a_readiness_delay() -> None:
    lifecycle, clock = make(readiness_fail_delay=1.5, propagation=2.0)
    lifecycle.request_drain(DrainSource.PRESTOP)
    clock.advance(0.5)
    assert lifecycle.request_drain(DrainSource.SIGNAL) is False, "joins the drain under way"
    clock.advance(1.0)
    lifecycle.poll()
    clock.advance(2.0)
    lifecycle.poll()
    clock.advance(0.75)
    lifecycle.note_quiescent()
    clock.advance(0.25)
    lifecycle.note_app_stopped()
    (drain,) = lifecycle.completed_drains
    assert drain.started_at == START
    assert drain.sources == {DrainSource.PRESTOP, DrainSource.SIGNAL}
    assert drain.phase_seconds == {
        Phase.DELAYING: 1.5,
        Phase.PROPAGATING: 2.0,
        Phase.DRAINING: 0.75,
        Phase.STOPPING_APP: 0.25,
    }
    assert not drain.forced
    assert phase_of(lifecycle) is Phase.STOPPED


def test_quiescent_before_drain_min_is_not_forced() -> None:
    lifecycle, clock = make(min=3.0, timeout=8.0)
    lifecycle.request_drain(DrainSource.SIGNAL)
    sleep_until_deadline(lifecycle, clock)
    clock.advance(1.0)
    lifecycle.note_quiescent()
    assert phase_of(lifecycle) is Phase.DRAINING
    clock.advance(0.5)
    lifecycle.note_quiescent()  # told again: the first moment counts
    assert lifecycle.time_until_deadline() == 1.5
    assert [t.reason for t in sleep_until_deadline(lifecycle, clock)] == [
        "quiescent, drain.min over"
    ]
    lifecycle.note_app_stopped()
    (drain,) = lifecycle.completed_drains
    assert not drain.forced
    assert drain.quiescent_at == START + 2.0 + 1.0
    assert drain.phase_seconds[Phase.DRAINING] == 3.0


@pytest.mark.parametrize("phase", [Phase.DELAYING, Phase.PROPAGATING, Phase.DRAINING])
@pytest.mark.parametrize("why", ["second SIGINT", "SIGQUIT"])
def test_shutdown_now_during_a_drain_records_it_forced(phase: Phase, why: str) -> None:
    lifecycle, clock = make(readiness_fail_delay=0.5)
    lifecycle.request_drain(DrainSource.SIGNAL)
    while lifecycle.phase is not phase:
        sleep_until_deadline(lifecycle, clock)
    lifecycle.pop_transitions()
    clock.advance(0.25)
    lifecycle.shutdown_now(why)
    assert lifecycle.pop_transitions() == [Transition(phase, Phase.STOPPED, clock.now, why)]
    assert lifecycle.immediate and lifecycle.exit_requested
    (drain,) = lifecycle.completed_drains
    assert drain is lifecycle.drain
    assert drain.forced
    assert drain.phase_seconds[phase] == 0.25


def test_shutdown_now_while_the_app_stops_records_the_drain_forced() -> None:
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.ADMIN)
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    assert not lifecycle.exit_requested, "an admin drain alone does not exit"
    lifecycle.shutdown_now("SIGQUIT")
    (drain,) = lifecycle.completed_drains
    assert drain.forced and lifecycle.exit_requested


def test_shutdown_now_without_a_drain_records_none() -> None:
    lifecycle, _ = make()
    lifecycle.shutdown_now("SIGQUIT")
    assert phase_of(lifecycle) is Phase.STOPPED
    assert lifecycle.immediate and lifecycle.exit_requested
    assert lifecycle.completed_drains == []


def test_shutdown_now_after_a_finished_drain_does_not_rewrite_it() -> None:
    """A SIGQUIT while DRAINED cuts nothing of that drain: its record stays as it was."""
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.ADMIN)
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    assert lifecycle.pop_transitions()[-1] == Transition(
        Phase.STOPPING_APP,
        Phase.DRAINED,
        START + 2.0,
        "app stopped, staying drained until a signal",
    )
    lifecycle.shutdown_now("SIGQUIT")
    assert phase_of(lifecycle) is Phase.STOPPED
    (drain,) = lifecycle.completed_drains
    assert not drain.forced


def test_an_admin_drain_ended_by_a_signal_is_recorded_once() -> None:
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.ADMIN)
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    lifecycle.pop_transitions()
    clock.advance(30.0)
    assert lifecycle.request_drain(DrainSource.SIGNAL) is False, "no new drain: it exits"
    assert lifecycle.pop_transitions() == [
        Transition(Phase.DRAINED, Phase.STOPPED, START + 32.0, "signal after the drain")
    ]
    (drain,) = lifecycle.completed_drains
    assert drain.sources == {DrainSource.ADMIN}
    assert drain.phase_seconds[Phase.DRAINED] == 30.0


def test_a_liveness_restart_drain_is_recorded_and_a_later_drain_gets_its_own_record() -> None:
    lifecycle, clock = make()
    assert lifecycle.request_drain(DrainSource.PRESTOP)
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    clock.advance(0.5)
    lifecycle.note_app_stopped()
    assert [(t.phase, t.reason) for t in lifecycle.pop_transitions()][-1] == (
        Phase.RECOVERING,
        "app released by preStop only: waiting for it",
    )
    (first,) = lifecycle.completed_drains
    assert first.sources == {DrainSource.PRESTOP} and not first.forced
    assert first.phase_seconds == {
        Phase.PROPAGATING: 2.0,
        Phase.DRAINING: 0.0,
        Phase.STOPPING_APP: 0.5,
    }
    assert not lifecycle.exit_requested
    clock.advance(4.0)
    lifecycle.note_app_ready()
    assert lifecycle.pop_transitions() == [
        Transition(Phase.RECOVERING, Phase.SERVING, START + 6.5, "app answers its check again")
    ]
    assert not lifecycle.is_draining()
    assert first.phase_seconds.get(Phase.RECOVERING) is None, "the drain was over"

    clock.advance(10.0)
    assert lifecycle.request_drain(DrainSource.SIGNAL)
    second = lifecycle.drain
    assert second is not None and second is not first
    assert second.started_at == START + 16.5 and second.sources == {DrainSource.SIGNAL}
    assert lifecycle.completed_drains == [first], "the second is not over yet"
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    assert lifecycle.completed_drains == [first, second]
    assert phase_of(lifecycle) is Phase.STOPPED


def test_a_signal_while_recovering_starts_a_drain_that_exits() -> None:
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.PRESTOP)
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    lifecycle.pop_transitions()
    assert lifecycle.request_drain(DrainSource.SIGNAL) is True
    assert lifecycle.pop_transitions() == [
        Transition(Phase.RECOVERING, Phase.PROPAGATING, START + 2.0, "drain requested by signal")
    ]
    assert len(lifecycle.completed_drains) == 1


def test_evidence_that_holds_exactly_now_ends_propagation_now() -> None:
    """Every condition met at this very moment: the phase ends now, not at a deadline of now
    (a zero wait, on which the driver would spin until the clock ticks)."""
    clock = FakeClock()
    timings = DrainTimings(
        propagation=8.0, timeout=8.0, evidence=True, propagation_min=1.0,
        propagation_margin=0.5, quiet=0.25,
    )  # fmt: skip
    lifecycle = DrainLifecycle(timings, clock)
    lifecycle.request_drain(DrainSource.SIGNAL)
    lifecycle.pop_transitions()
    clock.advance(1.0)
    lifecycle.consider_evidence(
        Evidence(
            probers_satisfied_at=START + 0.5,
            last_arrival_at=START + 0.75,
            traffic_overdue_at=None,
            probers="P",
            traffic="T",
        )
    )
    assert lifecycle.pop_transitions() == [
        Transition(
            Phase.PROPAGATING, Phase.DRAINING, START + 1.0, "evidence: P; traffic stopped: T"
        )
    ]
    assert_deadlines_clean(lifecycle)


def test_a_drain_starts_at_the_one_clock_reading_of_its_request() -> None:
    ticks = iter(START + 0.25 * step for step in range(100))
    lifecycle = DrainLifecycle(DrainTimings(readiness_fail_delay=0.0), lambda: next(ticks))
    lifecycle.request_drain(DrainSource.SIGNAL)
    (transition,) = lifecycle.pop_transitions()
    assert lifecycle.drain is not None and transition.at == lifecycle.drain.started_at
    delayed = DrainLifecycle(DrainTimings(readiness_fail_delay=1.0), lambda: next(ticks))
    delayed.request_drain(DrainSource.SIGNAL)
    (transition,) = delayed.pop_transitions()
    assert delayed.drain is not None and transition.at == delayed.drain.started_at


def test_releasing_the_app_outside_its_stop_is_refused_by_name() -> None:
    lifecycle, _ = make()
    with pytest.raises(LifecycleError, match=r"^no app stop is due in phase serving$"):
        lifecycle.note_app_released()


def test_propagation_held_to_its_maximum_says_what_held_it() -> None:
    clock = FakeClock()
    lifecycle = DrainLifecycle(DrainTimings(propagation=2.0, evidence=True), clock)
    lifecycle.request_drain(DrainSource.PRESTOP)
    (_, drain) = sleep_until_deadline(lifecycle, clock)
    assert drain.reason == "propagation ran to its maximum; held by no evidence considered yet"
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    lifecycle.note_app_ready()
    lifecycle.request_drain(DrainSource.SIGNAL)
    lifecycle.pop_transitions()
    lifecycle.consider_evidence(
        Evidence(None, clock.now, clock.now + 9.0, probers="P", traffic="T")
    )
    assert lifecycle.evidence_holding == "probers: P; traffic still arriving: T"
    sleep_until_deadline(lifecycle, clock)
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()
    assert phase_of(lifecycle) is Phase.STOPPED
