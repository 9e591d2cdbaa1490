"""Prometheus exposition, built at scrape time from the plain counters the data path keeps.

Nothing here runs per request: the data path bumps ints in ``Stats`` and the driver keeps a few
more; a scrape renders one ``Snapshot`` of them all through a fresh registry. Known label values
are always exported (as 0 until they happen) so that ``rate()`` and alerts see a series from the
start.

prometheus_client is imported at the first scrape, not at start-up (about 1 MiB of RSS that a
sidecar nobody scrapes does not pay); the imports inside functions are there for that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from drainproxy.core.lifecycle import Phase
from drainproxy.core.snapshot import Snapshot

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
UPSTREAM_ERROR_KINDS = ("refused", "reset", "timeout", "retried", "invalid")
CLOSE_REASONS = ("idle", "after_response", "forced", "client")
TIMEOUT_KINDS = (
    "request_head",
    "client_idle",
    "client_body",
    "connect",
    "response_head",
    "upstream_idle",
)


def _counter(
    name: str, documentation: str, label: str, known: Iterable[str], values: Mapping[str, int]
) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=[label])
    for key in dict.fromkeys([*known, *values]):
        family.add_metric([key], float(values.get(key, 0)))
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, value=value)


class _SnapshotCollector:
    """A prometheus_client ``Collector`` (a Protocol: no base class, so no import needed)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        yield from self._lifecycle()
        yield from self._drain()
        yield from self._traffic()

    def _lifecycle(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        snapshot = self.snapshot
        phase = GaugeMetricFamily(
            "drainproxy_phase", "1 for the current drain phase, 0 for the others", labels=["phase"]
        )
        for each in Phase:
            phase.add_metric([each.value], 1.0 if snapshot.phase is each else 0.0)
        yield phase
        yield _counter(
            "drainproxy_phase_transitions",
            "Phase changes, by the phase entered",
            "phase",
            (phase.value for phase in Phase),
            snapshot.phases_entered,
        )
        yield _gauge(
            "drainproxy_phase_elapsed_seconds",
            "Seconds spent so far in the current phase",
            snapshot.seconds_in_phase,
        )
        yield _gauge("drainproxy_ready", "1 when /ready answers 200", float(snapshot.ready))
        yield _gauge(
            "drainproxy_app_reachable",
            "1 when the app answers its check",
            float(snapshot.app_reachable),
        )

    def _drain(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = self.snapshot
        record = snapshot.last_drain
        yield _gauge(
            "drainproxy_drain_duration_seconds",
            "Length of the current drain so far, or of the last drain once it ended; 0 before any",
            0.0 if record is None else record.duration,
        )
        per_phase = GaugeMetricFamily(
            "drainproxy_drain_phase_duration_seconds",
            "Seconds the current or last drain spent in each phase it has left",
            labels=["phase"],
        )
        for phase, seconds in (record.phase_seconds if record else {}).items():
            per_phase.add_metric([phase.value], seconds)
        yield per_phase
        yield _gauge(
            "drainproxy_drain_forced",
            "1 when the current or last drain cut connections at drain.timeout or was skipped",
            float(record is not None and record.forced),
        )
        yield CounterMetricFamily(
            "drainproxy_drains_completed",
            "Drains that reached the app's stop and ended",
            value=snapshot.drains_completed,
        )
        outcome = GaugeMetricFamily(
            "drainproxy_app_stop_outcome",
            "1 for how the last stop of the app went (absent before the first stop)",
            labels=["outcome"],
        )
        if snapshot.app_stop_outcome is not None:
            outcome.add_metric([snapshot.app_stop_outcome], 1.0)
        yield outcome

    def _traffic(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily

        snapshot = self.snapshot
        stats = snapshot.counters
        yield _gauge(
            "drainproxy_in_flight_requests",
            "Requests being exchanged with the app",
            snapshot.in_flight,
        )
        yield _gauge(
            "drainproxy_open_connections",
            "Client connections open now",
            snapshot.open_connections,
        )
        yield CounterMetricFamily(
            "drainproxy_connections_accepted",
            "Client connections accepted",
            value=stats.connections_accepted,
        )
        yield _counter(
            "drainproxy_connections_closed",
            "Client connections closed, by reason: idle (closed by the drain while idle), "
            "after_response (Connection: close), forced (cut at drain.timeout), client",
            "reason",
            CLOSE_REASONS,
            stats.connections_closed,
        )
        yield _counter(
            "drainproxy_requests",
            "Requests received, by the phase in which they started",
            "phase",
            (Phase.SERVING.value,),
            stats.requests_by_phase,
        )
        yield _counter(
            "drainproxy_responses",
            "Responses sent, by status class, including those drainproxy made up (502, 504)",
            "status_class",
            STATUS_CLASSES,
            stats.responses_by_class,
        )
        yield _counter(
            "drainproxy_upstream_errors",
            "Failed exchanges with the app by kind; retried counts a safe request resent once "
            "after a pooled connection was closed under it",
            "kind",
            UPSTREAM_ERROR_KINDS,
            stats.upstream_errors,
        )
        yield CounterMetricFamily(
            "drainproxy_bad_requests", "Malformed requests answered 400", value=stats.bad_requests
        )
        yield _counter(
            "drainproxy_requests_rejected",
            "Requests drainproxy refused itself (limits, timeouts), by status",
            "status",
            (),
            stats.requests_rejected,
        )
        yield _counter(
            "drainproxy_timeouts",
            "Expired timeouts, by kind",
            "kind",
            TIMEOUT_KINDS,
            stats.timeouts,
        )
        yield CounterMetricFamily(
            "drainproxy_connections_refused",
            "Connections answered 503 and closed at limits.max_connections",
            value=stats.connections_refused,
        )
        if snapshot.last_connection_age is not None:
            yield _gauge(
                "drainproxy_last_connection_age_seconds",
                "Seconds since the last client connection was accepted: how long ago anyone "
                "still routed here (absent before the first)",
                snapshot.last_connection_age,
            )
        yield CounterMetricFamily(
            "drainproxy_tunnels_opened", "Upgraded connections relayed", value=stats.tunnels_opened
        )
        yield CounterMetricFamily(
            "drainproxy_http2_connections",
            "Client connections that spoke HTTP/2 (prior knowledge or TLS ALPN)",
            value=stats.http2_connections,
        )
        yield CounterMetricFamily(
            "drainproxy_http2_streams_reset_by_client",
            "HTTP/2 streams the client reset (RST_STREAM) before their response ended",
            value=stats.streams_reset_by_client,
        )
        yield CounterMetricFamily(
            "drainproxy_http2_streams_cut",
            "HTTP/2 streams reset by drainproxy at drain.timeout",
            value=stats.streams_cut,
        )
        yield CounterMetricFamily(
            "drainproxy_http2_abusive_connections",
            "HTTP/2 connections closed with GOAWAY ENHANCE_YOUR_CALM (rapid reset)",
            value=stats.http2_abusive_connections,
        )


def render_metrics(snapshot: Snapshot) -> tuple[bytes, str]:
    """The exposition of ``snapshot`` in Prometheus' text format, and its Content-Type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST
