"""Log set-up: plain text for people, JSON lines for machines.

Records may carry ``event`` and other fields through ``extra=``; the JSON formatter keeps them as
keys. A filter adds the drain phase to every record, and the live counts to the driver's own
lines, so one JSON line can be read alone: "phase draining, 3 in flight" needs no context.
The access log is a child logger, ``drainproxy.access``, fed by the data plane
(``dataplane/access.py``) only when ``log.access_log`` is on.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from drainproxy.core.lifecycle import Phase
from drainproxy.core.snapshot import Snapshot

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

#: The driver's logger: its lines are about the lifecycle, so they carry the counts.
_DRIVER_LOGGER = "drainproxy"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class DrainContext(logging.Filter):
    """Adds ``phase`` to every record and ``counts`` to the driver's records, once a source is
    bound; a field the caller passed in ``extra`` wins (a phase-change line names the phase it
    entered, even if the lifecycle has already moved on). Every record reads the phase alone
    (the access log may write one per request); only the driver's take a whole ``Snapshot``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase: Callable[[], Phase] | None = None
        self.snapshot: Callable[[], Snapshot] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.phase is None or self.snapshot is None:
            return True
        if not hasattr(record, "phase"):
            record.phase = self.phase().value
        if record.name == _DRIVER_LOGGER and not hasattr(record, "counts"):
            snapshot = self.snapshot()
            record.counts = _counts(snapshot)
            drain = snapshot.drain
            if drain is not None and not hasattr(record, "drain_phase_seconds"):
                record.drain_phase_seconds = {
                    phase.value: round(seconds, 3) for phase, seconds in drain.phase_seconds.items()
                }
        return True


def _counts(snapshot: Snapshot) -> dict[str, object]:
    counters = snapshot.counters
    return {
        "in_flight": snapshot.in_flight,
        "open_connections": snapshot.open_connections,
        "requests_total": counters.requests_total,
        "requests_by_phase": dict(counters.requests_by_phase),
        "responses_by_class": dict(counters.responses_by_class),
        "upstream_errors": dict(counters.upstream_errors),
        "connections_closed": dict(counters.connections_closed),
    }


_context = DrainContext()


def bind_log_context(phase: Callable[[], Phase], snapshot: Callable[[], Snapshot]) -> None:
    """From now on, records carry the phase ``phase()`` returns, and the driver's records the
    counts of ``snapshot()`` (the driver's current phase and state)."""
    _context.phase = phase
    _context.snapshot = snapshot


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s drainproxy %(levelname)s %(message)s"))
    handler.addFilter(_context)
    root = logging.getLogger("drainproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
