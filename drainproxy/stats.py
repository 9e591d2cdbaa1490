"""Plain counters the data path bumps; the metrics collector reads them only when scraped, so a
request pays one integer increment per counter, not a prometheus-client call."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    connections_accepted: int = 0
    requests_total: int = 0
    #: Requests by the phase in which they started, and by status class ("2xx"...).
    requests_by_phase: dict[str, int] = field(default_factory=dict)
    responses_by_class: dict[str, int] = field(default_factory=dict)
    #: Upstream failures by kind: refused, reset, timeout, invalid, retried.
    upstream_errors: dict[str, int] = field(default_factory=dict)
    #: Client connections closed by reason: idle, after_response, forced, client.
    connections_closed: dict[str, int] = field(default_factory=dict)
    bad_requests: int = 0
    tunnels_opened: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1
