"""The access log: one line per exchange on the ``drainproxy.access`` logger (a child of the
``drainproxy`` logger that ``control.logs`` formats). Fed only when ``log.access_log`` is on, so a
disabled access log costs the data path one branch per exchange."""

from __future__ import annotations

import logging

access_log = logging.getLogger("drainproxy.access")


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
