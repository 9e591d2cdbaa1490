"""The admin listener (aiohttp): probes, status, metrics and the two drain triggers.

``/ready``, ``/live``, ``/status`` and ``/metrics`` are open to probes. ``POST /drain`` and
``GET /prestop`` change state, so they are accepted from loopback, or from elsewhere only with
``admin.token`` in ``X-Drainproxy-Token`` (kubelet httpGet hooks come to the pod IP, not loopback).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from drainproxy.lifecycle import DrainSource
from drainproxy.metrics import render_metrics

if TYPE_CHECKING:
    from drainproxy.server import Server

log = logging.getLogger("drainproxy.admin")

TOKEN_HEADER = "X-Drainproxy-Token"
SERVER_KEY = web.AppKey("server", object)


def _server(request: web.Request) -> Server:
    server: Server = request.app[SERVER_KEY]  # type: ignore[assignment]
    return server


def _is_loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _authorized(request: web.Request) -> bool:
    if _is_loopback(request.remote):
        return True
    token = _server(request).config.admin.token
    given = request.headers.get(TOKEN_HEADER)
    return token is not None and given is not None and hmac.compare_digest(token, given)


def _forbidden(request: web.Request) -> web.Response:
    token_set = _server(request).config.admin.token is not None
    why = "missing or wrong " + TOKEN_HEADER if token_set else "admin.token is not set"
    log.warning(
        "403 for %s %s from %s: %s; nothing changed",
        request.method,
        request.path,
        request.remote,
        why,
        extra={"event": "admin_forbidden"},
    )
    return web.Response(status=403, text=f"forbidden: {why}\n")


async def live(request: web.Request) -> web.Response:
    return web.Response(text="live\n")


async def ready(request: web.Request) -> web.Response:
    server = _server(request)
    is_ready = server.is_ready()
    server.note_readiness_probe(
        request.remote or "-", request.headers.get("User-Agent", ""), is_ready
    )
    if is_ready:
        return web.Response(text="ready\n")
    reason = server.lifecycle.phase.value if not server.lifecycle.is_ready() else "app unreachable"
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def status(request: web.Request) -> web.Response:
    server = _server(request)
    lifecycle = server.lifecycle
    now = server.loop.time()

    def until(deadline: float | None) -> float | None:
        return None if deadline is None else round(max(0.0, deadline - now), 3)

    drain = lifecycle.drain
    body = {
        "phase": lifecycle.phase.value,
        "seconds_in_phase": round(lifecycle.seconds_in_phase(), 3),
        "ready": server.is_ready(),
        "app_reachable": server.probe.reachable,
        "app_check_error": server.probe.last_error or None,
        "in_flight": server.in_flight(),
        "open_connections": len(server.proxy.connections),
        "deadlines": {
            "phase_ends_in": until(lifecycle.deadline),
            "drain_min_in": until(lifecycle.min_deadline) if drain else None,
            "drain_timeout_in": until(lifecycle.timeout_deadline) if drain else None,
        },
        "drain": None
        if drain is None
        else {
            "sources": sorted(source.value for source in drain.sources),
            "seconds_since_start": round(now - drain.started_at, 3),
            "forced": drain.forced,
        },
        "requests_total": server.stats.requests_total,
    }
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = render_metrics(_server(request))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def drain(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _forbidden(request)
    started = _server(request).request_drain(DrainSource.ADMIN)
    return web.Response(
        status=202, text="drain started\n" if started else "drain already under way\n"
    )


async def prestop(request: web.Request) -> web.Response:
    """The app container's preStop hook: start the drain, answer when the app may stop."""
    if not _authorized(request):
        return _forbidden(request)
    server = _server(request)
    server.request_drain(DrainSource.PRESTOP)
    released = server.app_released
    await released.wait()
    return web.Response(text="app released\n")


async def start_admin(server: Server) -> Callable[[], Awaitable[None]]:
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/drain", drain)
    app.router.add_get("/prestop", prestop)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    listen = server.config.admin.listen
    await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
    return runner.cleanup
