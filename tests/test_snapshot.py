"""The Snapshot that /status, /metrics and the log lines render (issue 13), taken in-process from
a real lifecycle stepped by a fake clock: its deadlines (none once passed or ended: a drained
proxy has no drain.timeout to come), its drains, and that it is a read-only copy."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from drainproxy.core.lifecycle import DrainLifecycle, DrainSource, DrainTimings, Phase
from drainproxy.core.snapshot import Deadlines, Snapshot, take_snapshot
from drainproxy.core.stats import Counters, Stats

START = 1000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(min: float = 0.0) -> tuple[DrainLifecycle, FakeClock]:
    clock = FakeClock()
    timings = DrainTimings(readiness_fail_delay=0.0, propagation=2.0, min=min, timeout=8.0)
    return DrainLifecycle(timings, clock), clock


def snap(
    lifecycle: DrainLifecycle, clock: FakeClock, stats: Stats | None = None, **driver: Any
) -> Snapshot:
    """A snapshot with the driver's own numbers at neutral values unless given."""
    numbers: dict[str, Any] = {
        "ready": lifecycle.is_ready(),
        "app_reachable": True,
        "app_check_error": None,
        "in_flight": 0,
        "open_connections": 0,
        "phases_entered": {},
        "app_stop_outcome": None,
    }
    numbers.update(driver)
    return take_snapshot(lifecycle, stats or Stats(), clock(), **numbers)


def draining(
    min: float = 0.0, source: DrainSource = DrainSource.SIGNAL
) -> tuple[DrainLifecycle, FakeClock]:
    """A lifecycle that has just entered DRAINING (at START + 2)."""
    lifecycle, clock = make(min=min)
    lifecycle.request_drain(source)
    clock.advance(2.0)
    lifecycle.poll()
    assert lifecycle.phase is Phase.DRAINING
    return lifecycle, clock


def to_drained(lifecycle: DrainLifecycle) -> None:
    """From DRAINING, as an admin drain ends: quiescent, the app stopped, waiting for SIGTERM."""
    lifecycle.note_quiescent()
    lifecycle.note_app_stopped()


def test_serving_has_no_drain_and_no_deadline() -> None:
    lifecycle, clock = make()
    clock.advance(1.5)
    snapshot = snap(lifecycle, clock, in_flight=3, open_connections=2)
    assert (snapshot.phase, snapshot.seconds_in_phase, snapshot.at) == (Phase.SERVING, 1.5, 1001.5)
    assert (snapshot.in_flight, snapshot.open_connections) == (3, 2)
    assert snapshot.deadlines == Deadlines(None, None, None)
    assert snapshot.drain is None and snapshot.last_drain is None
    assert snapshot.drains_completed == 0


def test_propagating_counts_down_to_its_end_and_names_who_asked() -> None:
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.SIGNAL)
    lifecycle.request_drain(DrainSource.PRESTOP)
    lifecycle.request_drain(DrainSource.ADMIN)
    clock.advance(0.5)
    snapshot = snap(lifecycle, clock)
    assert snapshot.phase is Phase.PROPAGATING
    assert snapshot.deadlines == Deadlines(phase_ends_in=1.5)
    assert snapshot.drain is not None
    assert snapshot.drain.sources == (DrainSource.ADMIN, DrainSource.PRESTOP, DrainSource.SIGNAL)
    assert (snapshot.drain.seconds_since_start, snapshot.drain.ended) == (0.5, False)
    assert snapshot.drain.duration == 0.5
    assert snapshot.last_drain == snapshot.drain


def test_draining_counts_down_to_drain_min_and_drain_timeout() -> None:
    lifecycle, clock = draining(min=4.0)
    clock.advance(1.0)
    assert snap(lifecycle, clock).deadlines == Deadlines(
        phase_ends_in=7.0, drain_min_in=3.0, drain_timeout_in=7.0
    )


def test_a_passed_drain_min_is_none_not_zero() -> None:
    lifecycle, clock = draining(min=4.0)
    clock.advance(5.0)
    assert snap(lifecycle, clock).deadlines == Deadlines(
        phase_ends_in=3.0, drain_min_in=None, drain_timeout_in=3.0
    )


def test_a_quiescent_drain_has_no_timeout_to_come() -> None:
    """No connection left before drain.min: the drain ends at drain.min, the timeout is moot."""
    lifecycle, clock = draining(min=4.0)
    clock.advance(1.0)
    lifecycle.note_quiescent()
    assert lifecycle.phase is Phase.DRAINING
    assert snap(lifecycle, clock).deadlines == Deadlines(
        phase_ends_in=3.0, drain_min_in=3.0, drain_timeout_in=None
    )


def test_a_deadline_the_driver_has_not_acted_on_yet_is_none() -> None:
    lifecycle, clock = draining()
    clock.advance(8.5)  # past drain.timeout; poll() not called yet
    assert lifecycle.phase is Phase.DRAINING
    assert snap(lifecycle, clock).deadlines == Deadlines(None, None, None)


def test_a_drained_proxy_has_no_deadline() -> None:
    lifecycle, clock = draining(source=DrainSource.ADMIN)
    clock.advance(1.0)
    to_drained(lifecycle)
    assert lifecycle.phase is Phase.DRAINED
    clock.advance(1.0)
    snapshot = snap(lifecycle, clock)
    assert snapshot.deadlines == Deadlines(None, None, None)
    assert snapshot.drain is not None and snapshot.drain.ended


@pytest.mark.parametrize("phase", [Phase.STOPPING_APP, Phase.DRAINED, Phase.STOPPED])
def test_drain_deadlines_are_reported_only_while_draining(phase: Phase) -> None:
    """Whatever the lifecycle still holds (its own hygiene is tested in
    test_lifecycle_records): a drain deadline is about DRAINING, and a finished drain has none
    to come."""
    lifecycle, clock = draining(min=4.0)
    lifecycle.phase = phase  # the timed fields left as DRAINING set them
    clock.advance(1.0)
    deadlines = snap(lifecycle, clock).deadlines
    assert (deadlines.drain_min_in, deadlines.drain_timeout_in) == (None, None)


def test_after_a_recovery_the_last_drain_is_still_reported() -> None:
    """The preStop hook alone: RECOVERING, then SERVING; /metrics still shows that drain."""
    lifecycle, clock = make()
    lifecycle.request_drain(DrainSource.PRESTOP)
    clock.advance(2.0)
    lifecycle.poll()
    clock.advance(0.25)
    lifecycle.note_quiescent()
    clock.advance(0.5)
    lifecycle.note_app_stopped()
    assert lifecycle.phase is Phase.RECOVERING
    clock.advance(3.0)
    lifecycle.note_app_ready()
    clock.advance(10.0)
    snapshot = snap(lifecycle, clock)
    assert snapshot.drain is None
    last = snapshot.last_drain
    assert last is not None and last.ended and not last.forced
    assert dict(last.phase_seconds) == {
        Phase.PROPAGATING: 2.0,
        Phase.DRAINING: 0.25,
        Phase.STOPPING_APP: 0.5,
    }
    assert last.duration == 2.75  # its phases, not the time since it began
    assert last.seconds_since_start == 15.75
    assert snapshot.drains_completed == 1


def test_a_forced_drain_is_reported_forced() -> None:
    lifecycle, clock = draining()
    clock.advance(8.0)
    lifecycle.poll()
    assert lifecycle.phase is Phase.STOPPING_APP
    drain = snap(lifecycle, clock).drain
    assert drain is not None and drain.forced and not drain.ended


def test_the_counters_are_a_copy_that_cannot_change() -> None:
    lifecycle, clock = make()
    stats = Stats(requests_total=2, connections_accepted=1)
    stats.count(stats.responses_by_class, "2xx")
    phases_entered = {"propagating": 1}
    snapshot = snap(lifecycle, clock, stats, phases_entered=phases_entered)
    stats.requests_total += 1
    stats.count(stats.responses_by_class, "2xx")
    phases_entered["draining"] = 1
    assert snapshot.counters.requests_total == 2
    assert dict(snapshot.counters.responses_by_class) == {"2xx": 1}
    assert dict(snapshot.phases_entered) == {"propagating": 1}
    with pytest.raises(TypeError):
        snapshot.counters.responses_by_class["2xx"] = 5  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.in_flight = 1  # type: ignore[misc]


def test_the_counters_are_every_count_of_stats() -> None:
    """A counter added to Stats must reach the snapshot (and so /metrics): the two agree."""
    stats_fields = {f.name for f in dataclasses.fields(Stats)}
    assert {f.name for f in dataclasses.fields(Counters)} == stats_fields - {"last_connection_at"}
    stats = Stats()
    for field in dataclasses.fields(Counters):
        table = getattr(stats, field.name)
        if isinstance(table, dict):
            table["x"] = 7
        else:
            setattr(stats, field.name, 7)
    counters = stats.counters()
    for field in dataclasses.fields(Counters):
        value = getattr(counters, field.name)
        assert value == 7 or dict(value) == {"x": 7}, field.name


def test_last_connection_age_is_none_before_the_first_connection() -> None:
    lifecycle, clock = make()
    stats = Stats()
    assert snap(lifecycle, clock, stats).last_connection_age is None
    stats.last_connection_at = clock()
    clock.advance(4.0)
    assert snap(lifecycle, clock, stats).last_connection_age == 4.0
