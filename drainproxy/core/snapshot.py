"""What the proxy reports about itself at one instant, read-only: ``/status``, ``/metrics`` and
the context of the driver's log lines all render one ``Snapshot``, so they agree, and can be
rendered (and tested) from a hand-made one. ``take_snapshot`` computes it, in one place, from
the lifecycle and the counters plus the few numbers only the driver knows (connections, the app
check, the app stop).

Units: every time is in seconds. ``at`` is a reading of the driver's monotonic clock (the
event loop's ``time()``), meaningful only against another; every other time is a duration or a
count-down from ``at``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from drainproxy.core.lifecycle import DrainLifecycle, DrainRecord, DrainSource, Phase
from drainproxy.core.stats import Counters, Stats


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds from the snapshot to each deadline still to come; None when there is none: not
    set in this phase, already passed, or moot. drain.min and drain.timeout exist only while
    DRAINING (a finished drain has none to come), and drain.timeout is moot once the drain is
    quiescent (it then ends at drain.min at the latest)."""

    phase_ends_in: float | None = None
    drain_min_in: float | None = None
    drain_timeout_in: float | None = None


@dataclass(frozen=True, slots=True)
class DrainView:
    """One drain (``lifecycle.DrainRecord``) as the snapshot saw it."""

    #: Who asked for it, in the order of their names.
    sources: tuple[DrainSource, ...]
    #: It reached the app's stop and ended (DRAINED, RECOVERING or STOPPED after it).
    ended: bool
    #: It cut connections at drain.timeout, or was skipped by an immediate shutdown.
    forced: bool
    #: Seconds spent in each phase it has left, in the order it left them.
    phase_seconds: Mapping[Phase, float]
    #: Seconds from its request to the snapshot.
    seconds_since_start: float

    @property
    def duration(self) -> float:
        """Its length so far, or, once it ended, the sum of its phases."""
        return sum(self.phase_seconds.values()) if self.ended else self.seconds_since_start


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The proxy at one instant (see the module's docstring for units). The defaults are those
    of a proxy to which nothing has happened yet."""

    #: Clock reading when it was taken.
    at: float
    phase: Phase
    seconds_in_phase: float
    #: /ready would answer 200.
    ready: bool
    #: The app answers its check.
    app_reachable: bool
    #: Requests (HTTP/2: streams) being exchanged with the app, and client connections open.
    in_flight: int
    open_connections: int
    #: Why the last app check failed; None when it did not.
    app_check_error: str | None = None
    deadlines: Deadlines = Deadlines()
    #: The drain under way, or over and not yet recovered from; None while serving.
    drain: DrainView | None = None
    #: ``drain``, or else the last drain that ended: what /metrics reports.
    last_drain: DrainView | None = None
    drains_completed: int = 0
    #: Phase changes, by the value of the phase entered.
    phases_entered: Mapping[str, int] = field(default_factory=dict)
    #: How the last stop of the app went; None before the first.
    app_stop_outcome: str | None = None
    counters: Counters = field(default_factory=Counters)
    #: Seconds since the last client connection was accepted; None before the first.
    last_connection_age: float | None = None


def take_snapshot(
    lifecycle: DrainLifecycle,
    stats: Stats,
    now: float,
    *,
    ready: bool,
    app_reachable: bool,
    app_check_error: str | None,
    in_flight: int,
    open_connections: int,
    phases_entered: Mapping[str, int],
    app_stop_outcome: str | None,
) -> Snapshot:
    """The snapshot at ``now`` (a reading of ``lifecycle``'s clock)."""
    drain = lifecycle.drain
    completed = lifecycle.completed_drains
    last = drain if drain is not None else (completed[-1] if completed else None)
    return Snapshot(
        at=now,
        phase=lifecycle.phase,
        seconds_in_phase=now - lifecycle.phase_entered_at,
        ready=ready,
        app_reachable=app_reachable,
        app_check_error=app_check_error,
        in_flight=in_flight,
        open_connections=open_connections,
        deadlines=_deadlines(lifecycle, now),
        drain=None if drain is None else _drain_view(drain, lifecycle, now),
        last_drain=None if last is None else _drain_view(last, lifecycle, now),
        drains_completed=len(completed),
        phases_entered=MappingProxyType(dict(phases_entered)),
        app_stop_outcome=app_stop_outcome,
        counters=stats.counters(),
        last_connection_age=now - stats.last_connection_at if stats.last_connection_at else None,
    )


def _deadlines(lifecycle: DrainLifecycle, now: float) -> Deadlines:
    def until(deadline: float | None) -> float | None:
        return None if deadline is None or deadline <= now else deadline - now

    drain = lifecycle.drain
    if lifecycle.phase is not Phase.DRAINING or drain is None:
        return Deadlines(phase_ends_in=until(lifecycle.deadline))
    quiescent = drain.quiescent_at is not None
    return Deadlines(
        phase_ends_in=until(lifecycle.deadline),
        drain_min_in=until(lifecycle.min_deadline),
        drain_timeout_in=None if quiescent else until(lifecycle.timeout_deadline),
    )


def _drain_view(record: DrainRecord, lifecycle: DrainLifecycle, now: float) -> DrainView:
    completed = lifecycle.completed_drains
    return DrainView(
        sources=tuple(sorted(record.sources, key=lambda source: source.value)),
        ended=any(each is record for each in completed),
        forced=record.forced,
        phase_seconds=MappingProxyType(dict(record.phase_seconds)),
        seconds_since_start=now - record.started_at,
    )
