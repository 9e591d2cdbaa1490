"""``drainproxy demo``: the value of drainproxy in one command, on one machine.

Two replicas of a legacy app that dies at once on SIGTERM sit behind a load balancer that
health-checks them (HAProxy when installed, else the built-in one), under steady load from a
client that never retries. One replica is deleted the way the kubelet deletes a pod, first
without drainproxy, then with it. Every number shown comes from a real request: the table, a
timeline in the terminal and the same timeline as an SVG file.

The moving parts are the rollout simulation in ``drainproxy.sim`` (shared with the rollout
tests); this module adds the choice of balancer, live progress and the reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from drainproxy.errors import DrainproxyError
from drainproxy.sim.builtin_lb import BuiltinBalancer
from drainproxy.sim.haproxy import Backend, HAProxy, haproxy_binary
from drainproxy.sim.load import Outcome
from drainproxy.sim.replica import Replica
from drainproxy.sim.rollout import Balancer, RolloutPlan, RolloutResult, run_rollout

BalancerChoice = Literal["auto", "haproxy", "builtin"]

#: How the balancer decides a replica is gone: a check every interval, DOWN after ``FALL`` misses.
CHECK_INTERVAL = 0.2
FALL = 2


class DemoError(DrainproxyError):
    """The demo cannot run as asked (e.g. HAProxy requested but not installed)."""


@dataclass(frozen=True)
class DemoOptions:
    rate: float = 150.0
    #: drainproxy's drain.propagation: the longest it keeps serving while the balancer notices.
    propagation: float = 5.0
    #: ``evidence`` leaves as soon as the balancer marked the replica down and traffic stopped.
    propagation_mode: Literal["evidence", "fixed"] = "evidence"
    slow_share: float = 0.1
    slow_seconds: float = 1.5
    balancer: BalancerChoice = "auto"
    svg_path: Path = Path("drainproxy-demo.svg")
    json_path: Path | None = None
    #: Shorter slow requests, drain timeout and tail of load: for tests and quick looks.
    short: bool = False


class _ObservedBalancer(Balancer, Protocol):
    async def server_states(self) -> dict[str, str]: ...


@dataclass
class RunReport:
    """One deletion under load, with everything the reports draw, in seconds since deletion."""

    label: str
    with_drainproxy: bool
    result: RolloutResult
    #: The deleted replica's drainproxy phases as (when entered, phase).
    phases: list[tuple[float, str]] = field(default_factory=list)
    #: When the balancer first marked the deleted replica anything but UP.
    balancer_down_at: float | None = None
    #: Why drainproxy's propagation ended (the reason in its log), and when.
    propagation_ended: tuple[float, str] | None = None

    @property
    def failed_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for outcome in self.result.failures:
            kind = failure_kind(outcome)
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    @property
    def slow_in_flight(self) -> list[Outcome]:
        """Slow requests to the deleted replica still running when the deletion began (a
        failed one is counted as the deleted replica's: the survivor fails none)."""
        deleted_at = self.result.deleted_at
        prefix = self.result.deleted.name.encode()
        return [
            o
            for o in self.result.outcomes
            if o.path.startswith("/slow")
            and o.started < deleted_at < o.finished
            and (o.failed or o.body.startswith(prefix))
        ]

    @property
    def load_window(self) -> float:
        """How long the load ran after the deletion began."""
        return self.result.load_stopped - self.result.deleted_at

    @property
    def requests(self) -> int:
        return len(self.result.outcomes)

    @property
    def failed(self) -> int:
        return len(self.result.failures)

    @property
    def failed_percent(self) -> float:
        return 100.0 * self.failed / self.requests if self.requests else 0.0

    @property
    def gone_seconds(self) -> float:
        return self.result.gone_at - self.result.deleted_at

    def since_deletion(self, moment: float) -> float:
        return moment - self.result.deleted_at

    def as_dict(self) -> dict[str, object]:
        result = self.result
        served = {
            replica.name: len(result.served_by(replica))
            for replica in (result.deleted, result.survivor)
        }
        return {
            "label": self.label,
            "with_drainproxy": self.with_drainproxy,
            "requests": self.requests,
            "failed": self.failed,
            "failed_percent": round(self.failed_percent, 3),
            "replica_gone_seconds": round(self.gone_seconds, 3),
            "load_window_seconds": round(self.load_window, 3),
            "failed_by_kind": self.failed_by_kind,
            "slow_in_flight_at_deletion": {
                "sent": len(self.slow_in_flight),
                "answered": sum(not o.failed for o in self.slow_in_flight),
                "finished_seconds": [
                    round(self.since_deletion(o.finished), 3) for o in self.slow_in_flight
                ],
            },
            "propagation_ended": None
            if self.propagation_ended is None
            else {
                "at": round(self.propagation_ended[0], 3),
                "reason": self.propagation_ended[1],
            },
            "served_by": served,
            "balancer_down_seconds": None
            if self.balancer_down_at is None
            else round(self.balancer_down_at, 3),
            "phases": [{"at": round(at, 3), "phase": phase} for at, phase in self.phases],
            "failures": [
                {
                    "at": round(self.since_deletion(o.started), 3),
                    "path": o.path,
                    "status": o.status,
                    "error": o.error,
                }
                for o in result.failures
            ],
            "containers": [
                {"name": c.name, "killed": c.killed, "returncode": c.returncode}
                for c in result.containers
            ],
        }


@dataclass
class DemoReport:
    balancer: str
    runs: list[RunReport]
    #: The load window after the deletion that both runs were given.
    load_until: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "balancer": self.balancer,
            "load_until_seconds": self.load_until,
            "runs": [run.as_dict() for run in self.runs],
        }


# --- running ----------------------------------------------------------------------------------


def choose_balancer(choice: BalancerChoice) -> str:
    if choice == "builtin" or (choice == "auto" and haproxy_binary() is None):
        return "builtin"
    if haproxy_binary() is None:
        raise DemoError("--balancer haproxy: haproxy is not installed (apt-get install haproxy)")
    return "haproxy"


async def run_demo(options: DemoOptions, out: TextIO) -> DemoReport:
    """Both deletions, then the table and the timelines; stops everything it started, also when
    cancelled (Ctrl-C)."""
    balancer = choose_balancer(options.balancer)
    how = "HAProxy" if balancer == "haproxy" else "the built-in balancer (HAProxy is not installed)"
    _say(
        out,
        f"Load balancer: {how}, health-checking each replica every {CHECK_INTERVAL:g}s "
        f"(DOWN after {FALL} failed checks, no retries). Load: {options.rate:g} requests/s, "
        f"{options.slow_share:.0%} of them slow ({options.slow_seconds:g}s), never retried; "
        f"the same load window in both runs: {_load_until(options):g}s from the deletion.",
    )
    runs: list[RunReport] = []
    with tempfile.TemporaryDirectory(prefix="drainproxy-demo-") as workdir:
        for with_drainproxy in (False, True):
            runs.append(await _one_run(options, balancer, with_drainproxy, Path(workdir), out))
    report = DemoReport(balancer, runs, _load_until(options))
    _say(out, "")
    _say(out, format_table(runs))
    _say(out, "")
    _say(out, text_timeline(runs))
    options.svg_path.write_text(svg_timeline(runs))
    _say(out, f"\nTimeline image: {options.svg_path.resolve()}")
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(report.as_dict(), indent=2))
    return report


def _slow_seconds(options: DemoOptions) -> float:
    return min(options.slow_seconds, 1.0) if options.short else options.slow_seconds


def _load_until(options: DemoOptions) -> float:
    """The load window after the deletion, the same for both runs: long enough for the longest
    drain drainproxy is given (propagation, the slow requests, the app's stop), plus a tail."""
    return options.propagation + _slow_seconds(options) + (1.5 if options.short else 3.0)


def _drain(options: DemoOptions, drain_timeout: float) -> dict[str, object]:
    drain: dict[str, object] = {
        "propagation": f"{options.propagation}s",
        "timeout": f"{drain_timeout}s",
        "idle_grace": "200ms",
    }
    if options.propagation_mode == "evidence":
        # The balancer's checks are the evidence: DOWN after FALL failures, then a margin.
        drain.update(
            propagation_mode="evidence",
            propagation_min="200ms",
            propagation_margin="300ms",
            quiet="300ms",
            default_failure_threshold=FALL,
        )
    return drain


def _plan(options: DemoOptions, with_drainproxy: bool) -> RolloutPlan:
    slow_seconds = _slow_seconds(options)
    drain_timeout = slow_seconds + 2
    # The client waits for each response before its next request on a connection: enough
    # connections that slow requests do not hold the rate down.
    busy = options.rate * (options.slow_share * slow_seconds + 0.02)
    return RolloutPlan(
        with_drainproxy=with_drainproxy,
        rate=options.rate,
        connections=max(8, math.ceil(2 * busy)),
        slow_share=options.slow_share,
        slow_seconds=slow_seconds,
        slow_in_flight_at_delete=1 if options.slow_share > 0 else 0,
        drain=_drain(options, drain_timeout),
        # The drain, the app's stop (3s by default) and drainproxy's 2s margin must fit.
        grace_period=max(15.0, options.propagation + drain_timeout + 6),
        load_before=1.0 if options.short else 2.0,
        load_until=_load_until(options),
        extra_config={"log": {"format": "json", "level": "info"}},
    )


async def _one_run(
    options: DemoOptions, balancer: str, with_drainproxy: bool, workdir: Path, out: TextIO
) -> RunReport:
    label = "with drainproxy" if with_drainproxy else "without drainproxy"
    _say(out, f"\n== Deleting a replica {label} ==")
    plan = _plan(options, with_drainproxy)
    replicas: list[Replica] = []
    balancers: list[_ObservedBalancer] = []
    counts = {"requests": 0, "failed": 0}

    def make_balancer(port: int, members: list[Replica]) -> Balancer:
        replicas.extend(members)
        backends = [Backend(r.name, r.serving_port, r.check_port, r.check_path) for r in members]
        kind = HAProxy if balancer == "haproxy" else BuiltinBalancer
        made: _ObservedBalancer = kind(port, backends, check_interval=CHECK_INTERVAL, fall=FALL)
        balancers.append(made)
        return made

    def count(outcome: Outcome) -> None:
        counts["requests"] += 1
        counts["failed"] += outcome.failed

    states: list[tuple[float, str, str]] = []
    started = time.monotonic()
    with _background(
        _show_progress(out, started, counts, replicas),
        _watch_balancer(balancers, states),
    ):
        try:
            result = await run_rollout(
                plan,
                workdir,
                balancer_factory=make_balancer,
                on_progress=lambda message: _say(out, f"  {message}"),
                on_outcome=count,
            )
        except (TimeoutError, AssertionError) as exc:
            # A stage that never came (a replica that did not start, load that never flowed).
            why = str(exc) or type(exc).__name__
            raise DemoError(f"the run {label} stopped: {why}") from exc
    report = RunReport(label, with_drainproxy, result)
    deleted = result.deleted.name
    report.balancer_down_at = next(
        (
            report.since_deletion(at)
            for at, name, state in states
            if name == deleted and at >= result.deleted_at and not state.startswith("UP")
        ),
        None,
    )
    if result.deleted.proxy_log is not None:
        changes = drain_changes(result.deleted)
        report.phases = [(report.since_deletion(at), phase) for at, phase, _ in changes]
        report.propagation_ended = next(
            (
                (report.since_deletion(at), reason)
                for at, phase, reason in changes
                if phase == "draining"
            ),
            None,
        )
    _say(
        out,
        f"  done: {report.requests} requests, {report.failed} failed "
        f"({report.failed_percent:.2f}%)",
    )
    for line in sequence_lines(report):
        _say(out, f"  {line}")
    return report


@contextlib.contextmanager
def _background(*coroutines: Coroutine[Any, Any, None]) -> Iterator[None]:
    tasks = [asyncio.ensure_future(coro) for coro in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()


async def _show_progress(
    out: TextIO, started: float, counts: dict[str, int], replicas: Sequence[Replica]
) -> None:
    """A status line every second: the load's running totals and the deleted replica's phase."""
    while True:
        await asyncio.sleep(1.0)
        if not counts["requests"]:
            continue
        phase = ""
        if replicas and replicas[0].proxy_log is not None:
            latest = drain_phases(replicas[0])
            phase = f", {replicas[0].name} drainproxy: {latest[-1][1] if latest else 'serving'}"
        _say(
            out,
            f"  +{time.monotonic() - started:4.1f}s  {counts['requests']} requests, "
            f"{counts['failed']} failed{phase}",
        )


async def _watch_balancer(
    balancers: Sequence[_ObservedBalancer], states: list[tuple[float, str, str]]
) -> None:
    """Records when the balancer's view of each replica changes (HAProxy can only be asked)."""
    last: dict[str, str] = {}
    while True:
        await asyncio.sleep(CHECK_INTERVAL / 4)
        if not balancers:
            continue
        try:
            current = await balancers[0].server_states()
        except OSError:
            continue  # HAProxy's stats socket is not up yet
        now = time.monotonic()
        for name, state in current.items():
            if last.get(name) != state:
                states.append((now, name, state))
                last[name] = state


def drain_phases(replica: Replica) -> list[tuple[float, str]]:
    """(monotonic time, phase entered) from a replica's drainproxy JSON log."""
    return [(at, phase) for at, phase, _ in drain_changes(replica)]


def drain_changes(replica: Replica) -> list[tuple[float, str, str]]:
    """(monotonic time, phase entered, why) from a replica's drainproxy JSON log."""
    assert replica.proxy_log is not None
    wall_minus_monotonic = time.time() - time.monotonic()
    changes = []
    for line in list(replica.proxy_log.lines):
        if '"event": "phase"' not in line:
            continue
        entry = json.loads(line)
        stamp = datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        why = str(entry.get("msg", "")).partition(" (")[2].removesuffix(")")
        changes.append((stamp.timestamp() - wall_minus_monotonic, str(entry["phase"]), why))
    return changes


def failure_kind(outcome: Outcome) -> str:
    """What the client saw: the balancer's own error status, or how the connection failed."""
    if outcome.status is not None:
        return f"{outcome.status} from the balancer"
    error = (outcome.error or "").partition(":")[0]
    return {
        "ConnectionResetError": "connection reset",
        "EOFError": "closed without a response",
        "ConnectionRefusedError": "connection refused",
        "TimeoutError": "timed out",
    }.get(error, error or "no response")


def sequence_lines(run: RunReport) -> list[str]:
    """The deleted replica's story, in the order it happened, in seconds since the deletion."""
    events: list[tuple[float, str]] = []
    if run.balancer_down_at is not None:
        events.append((run.balancer_down_at, "the balancer marks the replica DOWN"))
    if run.propagation_ended is not None:
        at, reason = run.propagation_ended
        why = "on evidence" if reason.startswith("evidence") else f"({reason})"
        events.append((at, f"drainproxy ends propagation {why}: stops accepting, drains"))
    for outcome in run.slow_in_flight:
        what = "fails" if outcome.failed else "is answered"
        events.append((run.since_deletion(outcome.finished), f"a slow request in flight {what}"))
    events.append((run.gone_seconds, "the replica is gone"))
    lines = [f"+{at:4.1f}s  {text}" for at, text in sorted(events)]
    if run.failed:
        kinds = ", ".join(f"{count} {kind}" for kind, count in run.failed_by_kind.items())
        lines.append(f"failed: {kinds}")
    return lines


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


# --- reports ----------------------------------------------------------------------------------


def format_table(runs: Sequence[RunReport]) -> str:
    kinds = sorted({kind for run in runs for kind in run.failed_by_kind})

    def ended(run: RunReport) -> str:
        if run.propagation_ended is None:
            return "-"
        at, reason = run.propagation_ended
        return f"{'evidence' if reason.startswith('evidence') else 'maximum'} {at:.1f}s"

    rows = [
        ("", [run.label for run in runs]),
        ("load after deletion", [f"{run.load_window:.1f}s" for run in runs]),
        ("requests", [str(run.requests) for run in runs]),
        ("failed", [str(run.failed) for run in runs]),
        *[(f"  {kind}", [str(run.failed_by_kind.get(kind, 0)) for run in runs]) for kind in kinds],
        ("failed %", [f"{run.failed_percent:.2f}%" for run in runs]),
        (
            "slow in flight answered",
            [
                f"{sum(not o.failed for o in run.slow_in_flight)}/{len(run.slow_in_flight)}"
                for run in runs
            ],
        ),
        ("propagation ended", [ended(run) for run in runs]),
        ("replica gone after", [f"{run.gone_seconds:.1f}s" for run in runs]),
    ]
    first = max(len(name) for name, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(runs))]
    return "\n".join(
        name.ljust(first)
        + "".join("   " + cell.rjust(w) for cell, w in zip(cells, widths, strict=True))
        for name, cells in rows
    )


@dataclass(frozen=True)
class _Axis:
    """The shared time axis of every timeline, in seconds since the deletion."""

    start: float
    end: float
    columns: int

    @property
    def step(self) -> float:
        return (self.end - self.start) / self.columns

    def column(self, at: float) -> int:
        return min(self.columns - 1, max(0, int((at - self.start) / self.step)))

    @classmethod
    def covering(cls, runs: Sequence[RunReport], columns: int, min_step: float) -> _Axis:
        """At most ``columns`` columns of at least ``min_step`` seconds: finer buckets would
        show the load's jitter rather than its rate."""
        start = min(run.since_deletion(run.result.load_started) for run in runs)
        end = max(
            run.since_deletion(max((o.finished for o in run.result.outcomes), default=0.0))
            for run in runs
        )
        end = max(end, start + min_step)
        return cls(start, end, min(columns, math.ceil((end - start) / min_step)))


@dataclass
class _Series:
    """Per column: requests finished, failures, and the drain phase in force."""

    done: list[int]
    failed: list[int]
    phase: list[str | None]

    @classmethod
    def of(cls, run: RunReport, axis: _Axis) -> _Series:
        done = [0] * axis.columns
        failed = [0] * axis.columns
        for outcome in run.result.outcomes:
            column = axis.column(run.since_deletion(outcome.finished))
            done[column] += 1
            failed[column] += outcome.failed
        phase: list[str | None] = [None] * axis.columns
        if run.with_drainproxy:
            for column in range(axis.columns):
                middle = axis.start + (column + 0.5) * axis.step
                phase[column] = next(
                    (name for at, name in reversed(run.phases) if at <= middle), "serving"
                )
        return cls(done, failed, phase)


_BARS = " ▁▂▃▄▅▆▇█"
_PHASE_LETTERS = {
    "serving": "s",
    "delaying": "y",
    "propagating": "p",
    "draining": "d",
    "stopping_app": "a",
    "drained": "x",
    "stopped": "x",
    "recovering": "r",
}


def text_timeline(runs: Sequence[RunReport], columns: int = 64) -> str:
    axis = _Axis.covering(runs, columns, min_step=0.25)
    series = [_Series.of(run, axis) for run in runs]
    peak = max(max(s.done) for s in series) or 1
    lines = [
        f"Timeline, one column = {axis.step:.2f}s, from {axis.start:+.1f}s to {axis.end:+.1f}s "
        f"around the deletion (peak {peak / axis.step:.0f} requests/s)"
    ]
    for run, s in zip(runs, series, strict=True):
        events = [" "] * axis.columns
        marks = [(0.0, "D"), (run.balancer_down_at, "B"), (run.gone_seconds, "G")]
        for at, mark in marks:
            if at is not None:
                # Events closer than a column apart are shown side by side, in order.
                column = axis.column(at)
                while events[column] != " " and column < axis.columns - 1:
                    column += 1
                events[column] = mark
        lines.append(f"{run.label}:")
        lines.append("  req/s  " + "".join(_BARS[round(8 * d / peak)] for d in s.done))
        lines.append("  failed " + "".join(_count_cell(f) for f in s.failed))
        if run.with_drainproxy:
            lines.append("  phase  " + "".join(_PHASE_LETTERS.get(p or "", "?") for p in s.phase))
        lines.append("  events " + "".join(events))
    lines.append(
        "events: D deletion starts, B balancer marks the replica DOWN, G replica gone; "
        "phase: s serving, p propagating (not ready, still serving), d draining, "
        "a stopping the app, x stopped"
    )
    return "\n".join(lines)


def _count_cell(count: int) -> str:
    if count == 0:
        return "·"
    return str(count) if count < 10 else "+"


_PHASE_COLOURS = {
    "serving": "#eef6ee",
    "delaying": "#fff8dc",
    "propagating": "#fdebd0",
    "draining": "#f9d5c6",
    "stopping_app": "#e8daef",
    "stopped": "#e5e5e5",
    "drained": "#e5e5e5",
    "recovering": "#d6eaf8",
}


def svg_timeline(runs: Sequence[RunReport], columns: int = 120) -> str:
    """Requests per second (failures in red) with the drain phases behind, one panel per run."""
    axis = _Axis.covering(runs, columns, min_step=0.1)
    series = [_Series.of(run, axis) for run in runs]
    peak_rate = _round_up(max(max(s.done) for s in series) / axis.step)
    width, left, right, panel, gap, top = 960, 70, 20, 190, 60, 50
    plot_width = width - left - right
    height = top + len(runs) * (panel + gap) + 10

    def x(at: float) -> float:
        return left + (at - axis.start) / (axis.end - axis.start) * plot_width

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="10" y="24" font-size="16" font-weight="bold">Deleting one of two replicas '
        "under load: requests per second, failures in red</text>",
    ]
    for index, (run, s) in enumerate(zip(runs, series, strict=True)):
        y0 = top + index * (panel + gap) + 20
        bottom = y0 + panel

        def y(rate: float, bottom: float = bottom) -> float:
            return bottom - rate / peak_rate * panel

        title = (
            f"{run.label}: {run.requests} requests, {run.failed} failed "
            f"({run.failed_percent:.2f}%), replica gone after {run.gone_seconds:.1f}s"
        )
        parts.append(f'<text x="{left}" y="{y0 - 8}" font-weight="bold">{escape(title)}</text>')
        for start, end, phase in _phase_spans(run, axis):
            colour = _PHASE_COLOURS.get(phase, "#eeeeee")
            parts.append(
                f'<rect x="{x(start):.1f}" y="{y0}" width="{x(end) - x(start):.1f}" '
                f'height="{panel}" fill="{colour}"/>'
            )
            if phase != "serving":
                parts.append(
                    f'<text x="{x(start) + 3:.1f}" y="{y0 + 14}" fill="#555">{escape(phase)}</text>'
                )
        bar = plot_width / axis.columns
        for column, (done, failed) in enumerate(zip(s.done, s.failed, strict=True)):
            left_edge = left + column * bar
            ok_rate, failed_rate = (done - failed) / axis.step, failed / axis.step
            if ok_rate:
                parts.append(
                    f'<rect x="{left_edge:.1f}" y="{y(ok_rate):.1f}" width="{bar * 0.9:.1f}" '
                    f'height="{bottom - y(ok_rate):.1f}" fill="#4a7ab5"/>'
                )
            if failed_rate:
                tall = failed_rate / peak_rate * panel
                parts.append(
                    f'<rect x="{left_edge:.1f}" y="{y(ok_rate) - tall:.1f}" '
                    f'width="{bar * 0.9:.1f}" height="{tall:.1f}" fill="#d62728"/>'
                )
        marks = [
            (0.0, "deletion", "#000"),
            (run.balancer_down_at, "balancer: DOWN", "#e67e22"),
            (run.gone_seconds, "replica gone", "#7f7f7f"),
        ]
        for offset, (at, name, colour) in enumerate(marks):
            if at is None:
                continue
            parts.append(
                f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{y0}" y2="{bottom}" '
                f'stroke="{colour}" stroke-dasharray="4 3"/>'
            )
            parts.append(
                f'<text x="{x(at) + 3:.1f}" y="{y0 + 30 + 14 * offset}" fill="{colour}">'
                f"{escape(name)}</text>"
            )
        parts.append(
            f'<line x1="{left}" x2="{left + plot_width}" y1="{bottom}" y2="{bottom}" '
            'stroke="#333"/>'
        )
        for fraction in (0.0, 0.5, 1.0):
            rate = peak_rate * fraction
            parts.append(
                f'<text x="{left - 6}" y="{y(rate) + 4:.1f}" text-anchor="end">{rate:.0f}/s</text>'
            )
        for second in range(int(axis.start), int(axis.end) + 1):
            if axis.start <= second <= axis.end:
                parts.append(
                    f'<text x="{x(second):.1f}" y="{bottom + 16}" text-anchor="middle">'
                    f"{second:+d}s</text>"
                )
    parts.append(
        f'<text x="{left + plot_width / 2}" y="{height - 12}" text-anchor="middle" fill="#555">'
        "seconds since the deletion started</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _round_up(value: float) -> float:
    """The next 1, 2, 2.5 or 5 times a power of ten: axis labels people can read."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def _phase_spans(run: RunReport, axis: _Axis) -> list[tuple[float, float, str]]:
    if not run.with_drainproxy:
        return []
    changes = [(axis.start, "serving"), *[(at, p) for at, p in run.phases if at > axis.start]]
    spans = []
    for (start, phase), (end, _) in zip(changes, [*changes[1:], (axis.end, "")], strict=True):
        if end > start:
            spans.append((start, min(end, axis.end), phase))
    return spans
