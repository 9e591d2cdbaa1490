"""The drain lifecycle: a state machine with no I/O, driven by an injected monotonic clock.

Theory of operation, in Kubernetes terms
----------------------------------------
When a pod is deleted, the kubelet handles each container in parallel: it runs that container's
preStop hook, then sends it SIGTERM, and SIGKILL when terminationGracePeriodSeconds runs out.
Meanwhile the endpoint removal (EndpointSlice, kube-proxy, ingress controllers, cloud balancers)
takes from under a second to many seconds, so new connections keep arriving for a while, and
keep-alive connections stay pinned to the pod until they close.

So a drain is a sequence of phases, each ended by a deadline or an event:

    SERVING ──drain requested──► DELAYING ──delay over──► PROPAGATING ──propagation over──►
    DRAINING ──quiescent (and drain.min passed) or drain.timeout──► STOPPING_APP ──app stopped──►
    STOPPED (a signal asked us to exit) | DRAINED (an admin drain: wait for the signal)
    | RECOVERING (only the app's preStop asked: a liveness restart) ──app ready──► SERVING

* DELAYING: still ready, for ``drain.readiness_fail_delay`` (skipped when 0).
* PROPAGATING: /ready fails, but we keep serving and accepting; every response now says
  ``Connection: close`` so keep-alive clients move to other pods.
  With ``propagation_mode: evidence`` it may end early, on evidence instead of a fixed sleep:
  once every prober still probing /ready has received its failure threshold of 503s (plus a
  margin) and traffic has stopped arriving at its usual pace (``consider_evidence``).
* DRAINING: the listener is closed, idle connections are closed, in-flight requests finish.
  It ends when no client connection is left (but not before ``drain.min``), or at
  ``drain.timeout``, when whatever remains is cut (``forced``).
* STOPPING_APP: the driver stops the app (``app.stop``), then releases the preStop hooks waiting
  for this drain (``prestop_waits_for``, ``note_app_released``); a hook called in a later drain,
  or while RECOVERING (which starts one), waits for that drain's app stop.

The driver (``server.py``) feeds events in and runs each entered phase's effects, in order, from
``pop_transitions()``. Deadlines are computed once, when a phase is entered, from the clock.
Illegal events raise LifecycleError and leave the state unchanged; a repeated drain request is
a no-op apart from recording who asked (SIGTERM and the preStop hook both arrive in a rollout).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from drainproxy.errors import LifecycleError


class Phase(enum.Enum):
    SERVING = "serving"
    DELAYING = "delaying"
    PROPAGATING = "propagating"
    DRAINING = "draining"
    STOPPING_APP = "stopping_app"
    DRAINED = "drained"
    RECOVERING = "recovering"
    STOPPED = "stopped"


class DrainSource(enum.Enum):
    """Who asked for the drain; decides what happens once the app is stopped."""

    SIGNAL = "signal"  # SIGTERM/SIGINT: exit when done
    ADMIN = "admin"  # POST /drain: stay drained until a signal
    PRESTOP = "prestop"  # the app's preStop hook alone: a liveness restart, recover after


class Event(enum.Enum):
    DRAIN_REQUESTED = "drain_requested"
    DEADLINE_REACHED = "deadline_reached"
    PROPAGATION_EVIDENCE = "propagation_evidence"
    QUIESCENT = "quiescent"
    APP_STOPPED = "app_stopped"
    APP_READY = "app_ready"
    SHUTDOWN_NOW = "shutdown_now"


_ANY_BUT_STOPPED = frozenset(Phase) - {Phase.STOPPED}

#: Where an event may lead from each phase. Guards in the methods pick among the targets.
TRANSITIONS: dict[tuple[Phase, Event], frozenset[Phase]] = {
    (Phase.SERVING, Event.DRAIN_REQUESTED): frozenset({Phase.DELAYING, Phase.PROPAGATING}),
    (Phase.RECOVERING, Event.DRAIN_REQUESTED): frozenset({Phase.DELAYING, Phase.PROPAGATING}),
    (Phase.DRAINED, Event.DRAIN_REQUESTED): frozenset({Phase.STOPPED}),
    (Phase.DELAYING, Event.DEADLINE_REACHED): frozenset({Phase.PROPAGATING}),
    (Phase.PROPAGATING, Event.DEADLINE_REACHED): frozenset({Phase.DRAINING}),
    (Phase.PROPAGATING, Event.PROPAGATION_EVIDENCE): frozenset({Phase.DRAINING}),
    (Phase.DRAINING, Event.DEADLINE_REACHED): frozenset({Phase.STOPPING_APP}),
    (Phase.DRAINING, Event.QUIESCENT): frozenset({Phase.STOPPING_APP}),
    (Phase.STOPPING_APP, Event.APP_STOPPED): frozenset(
        {Phase.STOPPED, Phase.DRAINED, Phase.RECOVERING}
    ),
    (Phase.RECOVERING, Event.APP_READY): frozenset({Phase.SERVING}),
    **{(phase, Event.SHUTDOWN_NOW): frozenset({Phase.STOPPED}) for phase in _ANY_BUT_STOPPED},
}

#: Phases in which /ready answers 200 (given the app is reachable).
_READY_PHASES = frozenset({Phase.SERVING, Phase.DELAYING})
#: Phases in which the listener accepts new connections.
_ACCEPTING_PHASES = frozenset({Phase.SERVING, Phase.DELAYING, Phase.PROPAGATING, Phase.RECOVERING})
#: Phases in which every response carries ``Connection: close``.
_CLOSING_PHASES = frozenset(
    {Phase.PROPAGATING, Phase.DRAINING, Phase.STOPPING_APP, Phase.DRAINED, Phase.STOPPED}
)


@dataclass(frozen=True)
class DrainTimings:
    readiness_fail_delay: float = 0.0
    propagation: float = 5.0
    min: float = 0.0
    timeout: float = 20.0
    #: Evidence-based propagation: may end PROPAGATING early (``consider_evidence``).
    evidence: bool = False
    propagation_min: float = 0.0
    propagation_margin: float = 0.0
    quiet: float = 0.0


@dataclass(frozen=True)
class Evidence:
    """What the driver has seen since readiness began to fail (see ``probers.py``)."""

    #: When the last counted prober received its failure threshold of 503s; None if not yet
    #: (or when nobody probes).
    probers_satisfied_at: float | None
    #: When the last request arrived; None if none ever did.
    last_arrival_at: float | None
    #: When every client requesting at a pace will have missed its next requests; None when
    #: no client has a pace.
    traffic_overdue_at: float | None
    probers: str
    traffic: str


@dataclass(frozen=True)
class Transition:
    previous: Phase
    phase: Phase
    at: float
    reason: str


@dataclass
class DrainRecord:
    """What one drain did, for the summary line and /status."""

    started_at: float
    #: 1 for the process's first drain, 2 for the next (after a recovery)...: the preStop calls
    #: made during a drain wait for that drain's app stop, not another's.
    number: int = 1
    sources: set[DrainSource] = field(default_factory=set)
    #: The waiting preStop calls were released: this drain's app stop is due or done.
    app_released: bool = False
    quiescent_at: float | None = None
    forced: bool = False
    phase_seconds: dict[Phase, float] = field(default_factory=dict)


class DrainLifecycle:
    def __init__(self, timings: DrainTimings, clock: Callable[[], float]) -> None:
        self._timings = timings
        self._clock = clock
        self.phase = Phase.SERVING
        self.phase_entered_at = clock()
        self.deadline: float | None = None
        #: The latest end of PROPAGATING (drain.propagation), while PROPAGATING.
        self.propagation_deadline: float | None = None
        #: drain.min as an absolute time, while DRAINING.
        self.min_deadline: float | None = None
        #: drain.timeout as an absolute time, while DRAINING.
        self.timeout_deadline: float | None = None
        self.exit_requested = False
        self.immediate = False
        #: In evidence mode: what the last look at the evidence found still missing.
        self.evidence_holding = "no evidence considered yet"
        self.drain: DrainRecord | None = None
        self.drains_started = 0
        self.completed_drains: list[DrainRecord] = []
        self._pending: list[Transition] = []

    # --- queries -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.phase in _READY_PHASES

    def accepts_connections(self) -> bool:
        return self.phase in _ACCEPTING_PHASES

    def should_close_connection(self) -> bool:
        """Whether a response finishing now should end its connection."""
        return self.phase in _CLOSING_PHASES

    def is_draining(self) -> bool:
        return self.drain is not None

    def seconds_in_phase(self) -> float:
        return self._clock() - self.phase_entered_at

    def time_until_deadline(self) -> float | None:
        """How long the driver may wait before calling ``poll()``; None means no deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self._clock())

    def prestop_waits_for(self) -> int | None:
        """The drain whose app stop a preStop call made now must wait for (its ``number``),
        or None when it may return at once: that drain already released the app, or the
        process is stopping. Kubernetes runs the app's preStop on every container kill and may
        repeat a hook, so a call during a recovery or a later drain belongs to that drain."""
        drain = self.drain
        if self.phase is Phase.STOPPED or drain is None or drain.app_released:
            return None
        return drain.number

    def note_app_released(self) -> int:
        """The driver released the waiting preStop calls of the drain stopping the app; returns
        that drain's number."""
        if self.phase is not Phase.STOPPING_APP or self.drain is None:
            raise LifecycleError(f"no app stop is due in phase {self.phase.value}")
        self.drain.app_released = True
        return self.drain.number

    def pop_transitions(self) -> list[Transition]:
        """The transitions since the last call, oldest first, for the driver to act on."""
        pending, self._pending = self._pending, []
        return pending

    # --- events ----------------------------------------------------------------------------

    def request_drain(self, source: DrainSource) -> bool:
        """The one entry point for every trigger. Returns True when this call started a drain."""
        if source is DrainSource.SIGNAL:
            self.exit_requested = True
            if self.phase is Phase.DRAINED:
                self._move(Event.DRAIN_REQUESTED, Phase.STOPPED, "signal after the drain")
                return False
        if self.phase not in (Phase.SERVING, Phase.RECOVERING):
            if self.drain is not None:
                self.drain.sources.add(source)
            return False
        now = self._clock()
        self.drains_started += 1
        self.drain = DrainRecord(started_at=now, number=self.drains_started, sources={source})
        reason = f"drain requested by {source.value}"
        if self._timings.readiness_fail_delay > 0:
            self._move(Event.DRAIN_REQUESTED, Phase.DELAYING, reason, now)
            self.deadline = now + self._timings.readiness_fail_delay
        else:
            self._move(Event.DRAIN_REQUESTED, Phase.PROPAGATING, reason, now)
            self._start_propagating(now)
        return True

    def poll(self) -> None:
        """Apply the deadline if it has passed. Cheap; the driver calls it whenever it wakes.

        A phase ended by a deadline is taken to end exactly at it, even when the driver wakes
        late, so a slow event loop does not stretch the shutdown budget."""
        if self.deadline is None or self._clock() < self.deadline:
            return
        due = self.deadline
        if self.phase is Phase.DELAYING:
            self._move(Event.DEADLINE_REACHED, Phase.PROPAGATING, "readiness_fail_delay over", due)
            self._start_propagating(due)
            self.poll()
        elif self.phase is Phase.PROPAGATING:
            assert self.propagation_deadline is not None
            if self._clock() >= self.propagation_deadline:
                reason = "propagation over"
                if self._timings.evidence:
                    reason = f"propagation ran to its maximum; held by {self.evidence_holding}"
                self._start_draining(Event.DEADLINE_REACHED, self.propagation_deadline, reason)
                self.poll()
        elif self.phase is Phase.DRAINING:
            assert self.drain is not None
            if self.drain.quiescent_at is not None:
                self._move(
                    Event.DEADLINE_REACHED, Phase.STOPPING_APP, "quiescent, drain.min over", due
                )
            else:
                self.drain.forced = True
                self._move(Event.DEADLINE_REACHED, Phase.STOPPING_APP, "drain.timeout reached", due)

    def consider_evidence(self, evidence: Evidence) -> None:
        """In evidence mode, end PROPAGATING once every prober still probing has marked us
        unready (plus ``propagation_margin``) and traffic has stopped: no request for ``quiet``,
        and every client with a pace overdue; never before ``propagation_min``, never after
        ``propagation``. Remembers what holds it back, for the log line that ends the phase."""
        timings = self._timings
        if not timings.evidence or self.phase is not Phase.PROPAGATING:
            return
        assert self.propagation_deadline is not None
        started = self.phase_entered_at
        last_arrival = evidence.last_arrival_at
        quiet_from = started if last_arrival is None else max(started, last_arrival)
        quiet_until = quiet_from + timings.quiet
        if evidence.traffic_overdue_at is not None:
            quiet_until = max(quiet_until, evidence.traffic_overdue_at)
        satisfied = evidence.probers_satisfied_at
        conditions = [
            (f"propagation_min {timings.propagation_min:g}s", started + timings.propagation_min),
            (
                f"probers: {evidence.probers}",
                math.inf if satisfied is None else satisfied + timings.propagation_margin,
            ),
            (f"traffic still arriving: {evidence.traffic}", quiet_until),
        ]
        earliest = max(at for _, at in conditions)
        now = self._clock()
        if earliest >= self.propagation_deadline:
            self.deadline = self.propagation_deadline
        elif now >= earliest:
            self._start_draining(
                Event.PROPAGATION_EVIDENCE,
                now,
                f"evidence: {evidence.probers}; traffic stopped: {evidence.traffic}",
            )
            return
        else:
            self.deadline = earliest
        self.evidence_holding = "; ".join(
            what for what, at in conditions if at >= min(earliest, self.propagation_deadline)
        )

    def note_quiescent(self) -> None:
        """No client connection is left open. Ends the drain now, or at drain.min."""
        self._check(Event.QUIESCENT)
        assert self.drain is not None and self.min_deadline is not None
        now = self._clock()
        if self.drain.quiescent_at is None:
            self.drain.quiescent_at = now
        if now >= self.min_deadline:
            self._move(Event.QUIESCENT, Phase.STOPPING_APP, "no connection left")
        else:
            self.deadline = self.min_deadline

    def note_app_stopped(self) -> None:
        self._check(Event.APP_STOPPED)
        assert self.drain is not None
        self.drain.app_released = True  # the driver released the preStop calls with the stop
        if self.exit_requested:
            target, reason = Phase.STOPPED, "app stopped, exit requested by signal"
        elif self.drain.sources - {DrainSource.PRESTOP}:
            target, reason = Phase.DRAINED, "app stopped, staying drained until a signal"
        else:
            target, reason = Phase.RECOVERING, "app released by preStop only: waiting for it"
        self._move(Event.APP_STOPPED, target, reason)

    def note_app_ready(self) -> None:
        self._check(Event.APP_READY)
        self._move(Event.APP_READY, Phase.SERVING, "app answers its check again")
        self.drain = None

    def shutdown_now(self, reason: str) -> None:
        """Skip to STOPPED (a second SIGINT, or SIGQUIT). A drain still under way is recorded
        ``forced``; one already over (DRAINED, RECOVERING) stays as it ended."""
        self._check(Event.SHUTDOWN_NOW)
        self.immediate = True
        self.exit_requested = True
        if self.drain is not None and self.drain not in self.completed_drains:
            self.drain.forced = True
        self._move(Event.SHUTDOWN_NOW, Phase.STOPPED, reason)

    # --- internals -----------------------------------------------------------------------

    def _start_propagating(self, at: float) -> None:
        self.evidence_holding = "no evidence considered yet"
        self.propagation_deadline = self.deadline = at + self._timings.propagation

    def _start_draining(self, event: Event, at: float, reason: str) -> None:
        self._move(event, Phase.DRAINING, reason, at)
        self.min_deadline = at + self._timings.min
        self.timeout_deadline = self.deadline = at + self._timings.timeout

    def _check(self, event: Event) -> None:
        if (self.phase, event) not in TRANSITIONS:
            raise LifecycleError(f"{event.value} is not allowed in phase {self.phase.value}")

    def _move(self, event: Event, target: Phase, reason: str, at: float | None = None) -> None:
        allowed = TRANSITIONS.get((self.phase, event), frozenset())
        if target not in allowed:
            raise LifecycleError(
                f"{event.value} cannot lead from {self.phase.value} to {target.value}"
            )
        now = self._clock() if at is None else at
        if self.drain is not None and self.phase not in (Phase.SERVING, Phase.RECOVERING):
            spent = self.drain.phase_seconds.get(self.phase, 0.0)
            self.drain.phase_seconds[self.phase] = spent + now - self.phase_entered_at
        self._clear_deadlines()
        self._pending.append(Transition(self.phase, target, now, reason))
        self.phase = target
        self.phase_entered_at = now
        drain_over = target in (Phase.STOPPED, Phase.DRAINED, Phase.RECOVERING)
        if drain_over and self.drain is not None and self.drain not in self.completed_drains:
            self.completed_drains.append(self.drain)

    def _clear_deadlines(self) -> None:
        """Leaving a phase drops its deadlines (the phase entered sets its own): one left in
        the past would make the driver's wait 0 s, a busy loop, and show in /status."""
        self.deadline = None
        if self.phase is Phase.PROPAGATING:
            self.propagation_deadline = None
        elif self.phase is Phase.DRAINING:
            self.min_deadline = self.timeout_deadline = None
