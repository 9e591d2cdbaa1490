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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drainproxy.control.server import Server

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
    """Adds ``phase`` to every record and ``counts`` to the driver's records, once a server is
    bound; a field the caller passed in ``extra`` wins (a phase-change line names the phase it
    entered, even if the lifecycle has already moved on)."""

    def __init__(self) -> None:
        super().__init__()
        self.server: Server | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        server = self.server
        if server is None:
            return True
        if not hasattr(record, "phase"):
            record.phase = server.lifecycle.phase.value
        if record.name == _DRIVER_LOGGER and not hasattr(record, "counts"):
            record.counts = _counts(server)
            drain = server.lifecycle.drain
            if drain is not None and not hasattr(record, "drain_phase_seconds"):
                record.drain_phase_seconds = {
                    phase.value: round(seconds, 3) for phase, seconds in drain.phase_seconds.items()
                }
        return True


def _counts(server: Server) -> dict[str, object]:
    stats = server.stats
    return {
        "in_flight": server.in_flight(),
        "open_connections": len(server.proxy.connections),
        "requests_total": stats.requests_total,
        "requests_by_phase": dict(stats.requests_by_phase),
        "responses_by_class": dict(stats.responses_by_class),
        "upstream_errors": dict(stats.upstream_errors),
        "connections_closed": dict(stats.connections_closed),
    }


_context = DrainContext()


def bind_log_context(server: Server) -> None:
    """From now on, records carry this server's phase and counts."""
    _context.server = server


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
