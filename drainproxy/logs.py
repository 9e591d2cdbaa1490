"""Log set-up: plain text for people, JSON lines for machines.

Records may carry ``event`` and other fields through ``extra=``; the JSON formatter keeps them as
keys. A filter adds the drain phase to every record, and the live counts to the driver's own
lines, so one JSON line can be read alone: "phase draining, 3 in flight" needs no context.
The access log (``log.access_log``) is a separate logger, ``drainproxy.access``, fed only when
enabled, so a disabled access log costs the data path one branch per exchange.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drainproxy.server import Server

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

#: The driver's logger: its lines are about the lifecycle, so they carry the counts.
_DRIVER_LOGGER = "drainproxy"
ACCESS_LOGGER = "drainproxy.access"

access_log = logging.getLogger(ACCESS_LOGGER)


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


class AccessRecord:
    """One exchange as the access log reports it; created only when the access log is on."""

    __slots__ = ("body_bytes", "phase", "started", "status", "upstream_seconds", "upstream_sent")

    def __init__(self, started: float, phase: str) -> None:
        self.started = started
        self.phase = phase
        self.status = 0
        self.body_bytes = 0
        #: When the request head went to the app, and how long the app took to answer its head.
        self.upstream_sent: float | None = None
        self.upstream_seconds: float | None = None

    def response_head(self, status: int, now: float) -> None:
        self.status = status
        if self.upstream_sent is not None:
            self.upstream_seconds = now - self.upstream_sent

    def emit(self, method: bytes, target: bytes, now: float, outcome: str = "complete") -> None:
        duration = now - self.started
        upstream = self.upstream_seconds
        method_text = method.decode("latin-1")
        target_text = target.decode("latin-1")
        access_log.info(
            "%s %s %d %.3fs %dB upstream %s phase %s%s",
            method_text,
            target_text,
            self.status,
            duration,
            self.body_bytes,
            "-" if upstream is None else f"{upstream:.3f}s",
            self.phase,
            "" if outcome == "complete" else f" ({outcome})",
            extra={
                "event": "access",
                "method": method_text,
                "target": target_text,
                "status": self.status,
                "duration_seconds": round(duration, 6),
                "bytes": self.body_bytes,
                "upstream_seconds": None if upstream is None else round(upstream, 6),
                "phase": self.phase,
                "outcome": outcome,
            },
        )
