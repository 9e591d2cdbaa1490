"""Prometheus exposition, built at scrape time from the plain counters the data path keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from drainproxy.lifecycle import Phase

if TYPE_CHECKING:
    from collections.abc import Iterable

    from drainproxy.server import Server


class _ServerCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        server = self.server
        phase = GaugeMetricFamily(
            "drainproxy_phase", "1 for the current drain phase", labels=["phase"]
        )
        for each in Phase:
            phase.add_metric([each.value], 1.0 if server.lifecycle.phase is each else 0.0)
        yield phase
        yield GaugeMetricFamily(
            "drainproxy_in_flight_requests", "Requests being exchanged with the app",
            value=server.in_flight(),
        )


def render_metrics(server: Server) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServerCollector(server))
    return generate_latest(registry), CONTENT_TYPE_LATEST
