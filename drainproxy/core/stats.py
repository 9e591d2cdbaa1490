"""Plain counters the data path bumps; the metrics collector reads them only when scraped, so a
request pays one integer increment per counter, not a prometheus-client call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any


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
    #: Loop time of the last accepted client connection (evidence that someone still routes here).
    last_connection_at: float = 0.0
    bad_requests: int = 0
    tunnels_opened: int = 0
    #: Requests drainproxy refused itself, by status ("400", "408", "413", "414", "431"...).
    requests_rejected: dict[str, int] = field(default_factory=dict)
    #: Expired timeouts by kind: request_head, client_idle, client_body, connect,
    #: response_head, upstream_idle.
    timeouts: dict[str, int] = field(default_factory=dict)
    #: Connections answered 503 and closed at limits.max_connections.
    connections_refused: int = 0
    #: HTTP/2 (docs/http2.md): client connections, streams the client reset, and streams reset
    #: by drainproxy at drain.timeout.
    http2_connections: int = 0
    streams_reset_by_client: int = 0
    streams_cut: int = 0
    http2_abusive_connections: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def counters(self) -> Counters:
        """The counters as they are now, in a copy nobody can change (for a ``Snapshot``):
        every field ``Counters`` declares, each table frozen."""
        values: dict[str, Any] = {}
        for counter in fields(Counters):
            value = getattr(self, counter.name)
            values[counter.name] = _frozen(value) if isinstance(value, dict) else value
        return Counters(**values)


@dataclass(frozen=True, slots=True)
class Counters:
    """``Stats``' counters at one instant, read-only: each field means what the same field of
    ``Stats`` does (``last_connection_at``, a time, is in the ``Snapshot`` as an age)."""

    connections_accepted: int = 0
    requests_total: int = 0
    requests_by_phase: Mapping[str, int] = field(default_factory=dict)
    responses_by_class: Mapping[str, int] = field(default_factory=dict)
    upstream_errors: Mapping[str, int] = field(default_factory=dict)
    connections_closed: Mapping[str, int] = field(default_factory=dict)
    bad_requests: int = 0
    tunnels_opened: int = 0
    requests_rejected: Mapping[str, int] = field(default_factory=dict)
    timeouts: Mapping[str, int] = field(default_factory=dict)
    connections_refused: int = 0
    http2_connections: int = 0
    streams_reset_by_client: int = 0
    streams_cut: int = 0
    http2_abusive_connections: int = 0


def _frozen(table: dict[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(table))
