"""What every client connection shares (``ProxyContext``), and what the driver asks of each
(``ClientSide``): below the HTTP/1.1 and HTTP/2 protocols, so both use it and neither imports
the other to reach it (issue 13)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from drainproxy.config.schema import Config, LimitsConfig
from drainproxy.core.lifecycle import DrainLifecycle
from drainproxy.core.probers import ArrivalPace
from drainproxy.core.stats import Stats
from drainproxy.dataplane.http1 import (
    CRLF,
    FORWARDED_FOR,
    FORWARDED_HOST,
    FORWARDED_PROTO,
    ForwardingPolicy,
)
from drainproxy.dataplane.upstream import UpstreamPool
from drainproxy.system.tls import ListenerTLS

log = logging.getLogger("drainproxy.proxy")


class ClientSide(Protocol):
    """What the driver and the sweep ask of a client connection, HTTP/1.1 or HTTP/2."""

    @property
    def closing(self) -> bool:
        """A close is under way: the connection no longer counts toward quiescence."""

    def is_idle(self) -> bool: ...

    def in_flight(self) -> int: ...

    def check_timeouts(self, now: float) -> None: ...

    def close_when_idle(self, grace: float) -> None: ...

    def force_close(self) -> None: ...

    def announce_drain(self) -> None: ...


@dataclass
class ProxyContext:
    """What every client connection shares."""

    config: Config
    pool: UpstreamPool
    lifecycle: DrainLifecycle
    stats: Stats
    loop: asyncio.AbstractEventLoop
    #: Called whenever a client connection closes, so the driver can notice quiescence.
    on_connection_closed: Callable[[], None]
    scheme: bytes = b"http"
    connections: set[ClientSide] = field(default_factory=set)
    #: Requests timed per client, in evidence mode (``probers.ArrivalPace``); else None.
    arrivals: ArrivalPace | None = None
    #: ``log.access_log``, read once: when off, an exchange pays one test of this flag.
    access_log: bool = field(init=False, default=False)
    #: TLS on the listener (``tls:``): its reloading context, and what the listener is given.
    tls: ListenerTLS | None = field(init=False, default=None)
    listener_ssl: ssl.SSLContext | None = field(init=False, default=None)
    #: TLS connections accepted whose handshake is not done: not yet in ``connections``, but the
    #: drain must not end under them. Weak: a failed handshake just drops its protocol.
    handshaking: weakref.WeakSet[asyncio.BaseProtocol] = field(
        init=False, default_factory=weakref.WeakSet
    )
    max_connections: int = field(init=False, default=0)
    limits: LimitsConfig = field(init=False, default_factory=LimitsConfig)
    #: Seconds between sweeps for timeouts, idle app connections and certificate files.
    tick: float = field(init=False, default=1.0)
    #: What a request for the app gets from this hop (``forwarded:``, ``limits:``), decided once.
    forwarding: ForwardingPolicy = field(init=False)
    _refused_unlogged: int = field(init=False, default=0)
    _refusals_logged_at: float = field(init=False, default=float("-inf"))
    _next_tls_check: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        config = self.config
        self.access_log = config.log.access_log
        if config.tls is not None:
            self.tls = ListenerTLS(config.tls)
            self.listener_ssl = self.tls.context
            self.scheme = b"https"
        self.limits = config.limits
        self.max_connections = config.limits.max_connections or _auto_connection_limit()
        self.forwarding = forwarding_policy(config, self.scheme)
        timeouts = config.timeouts
        limits = [
            timeouts.request_head,
            timeouts.client_idle,
            timeouts.client_body,
            config.upstream.response_timeout,
        ]
        shortest = min((seconds for seconds in limits if seconds > 0), default=1.0)
        self.tick = min(1.0, max(0.02, shortest / 10))
        _keep_freed_memory_for_reuse()
        self.loop.call_soon(self._sweep)

    def _sweep(self) -> None:
        """Expire what has waited too long; runs every ``tick`` for the life of the process."""
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        if self.listener_ssl is not None and not self.connections:
            # A failed TLS handshake ends without a callback: let the driver look again.
            self.on_connection_closed()
        expired = self.pool.expire_idle(now)
        if expired:
            log.debug("closed %d app connection(s) at the end of their reuse window", expired)
            self.stats.timeouts["upstream_idle"] = (
                self.stats.timeouts.get("upstream_idle", 0) + expired
            )
        if self._refused_unlogged and now - self._refusals_logged_at >= 10.0:
            log.warning(
                "refused %d connection(s) over limits.max_connections (%d) with 503",
                self._refused_unlogged,
                self.max_connections,
                extra={"event": "connections_refused"},
            )
            self._refused_unlogged = 0
            self._refusals_logged_at = now
        if self.tls is not None and now >= self._next_tls_check:
            self._next_tls_check = now + self.tls.config.reload_interval
            self.tls.check_files()
        self.loop.call_later(self.tick, self._sweep)

    def announce_drain(self) -> None:
        """Responses now close their connections: HTTP/2 connections are told at once."""
        for conn in list(self.connections):
            conn.announce_drain()

    def note_refused(self) -> None:
        self.stats.connections_refused += 1
        self._refused_unlogged += 1


def forwarding_policy(config: Config, scheme: bytes) -> ForwardingPolicy:
    """The ``ForwardingPolicy`` of ``config`` for a listener speaking ``scheme``."""
    forwarded = config.forwarded
    xff_append = forwarded.x_forwarded_for == "append"
    overwrite_xfp = forwarded.x_forwarded_proto == "overwrite"
    overwrite_xfh = forwarded.x_forwarded_host == "overwrite"
    drop = {FORWARDED_FOR} if xff_append else set()
    if overwrite_xfp:
        drop.add(FORWARDED_PROTO)
    if overwrite_xfh:
        drop.add(FORWARDED_HOST)
    upstream = config.upstream
    return ForwardingPolicy(
        drop=frozenset(drop),
        default_host_line=f"Host: {upstream.host}:{upstream.port}\r\n".encode(),
        forwarded_proto_line=b"X-Forwarded-Proto: " + scheme + CRLF,
        xff_append=xff_append,
        set_xfp=forwarded.x_forwarded_proto != "off",
        overwrite_xfp=overwrite_xfp,
        set_xfh=forwarded.x_forwarded_host != "off",
        overwrite_xfh=overwrite_xfh,
        get_head_body=config.limits.get_head_body == "forward",
        max_body_bytes=config.limits.max_body_bytes,
    )


# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _keep_freed_memory_for_reuse() -> None:
    """Streaming allocates a new ``bytes`` of up to 256 KiB per read (uvloop's read size). With
    glibc's defaults each one is mmapped, or the heap top is trimmed and regrown, so every read
    is copied into fresh pages that fault in: 1 MiB responses ran at half speed or less,
    depending on the process's history. Keep such blocks on the heap and the heap untrimmed
    below 64 MiB (RSS idle is unchanged; after heavy streaming freed pages stay resident)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    mallopt(_M_TOP_PAD, 1 << 20)


def _auto_connection_limit() -> int:
    """Half the open-file limit: each client connection may hold one to the app as well."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - 32) // 2)
