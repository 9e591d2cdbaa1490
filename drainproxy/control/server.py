"""The I/O driver: owns the listeners, the app probe and the signals, feeds events into the drain
lifecycle and carries out each phase's effects, in order, from one place (``_enter``).

The layers above it see it only as ``snapshot()`` (what /status, /metrics and the log lines
report) and the admin API's ``AdminControls``, which ``Server`` provides."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable

from drainproxy import __version__
from drainproxy.config.schema import Address, Config
from drainproxy.control.admin import start_admin
from drainproxy.control.appcheck import AppProbe
from drainproxy.control.appstop import AppStopError, StopMethod, stop_method_for, stop_then_release
from drainproxy.control.logs import bind_log_context
from drainproxy.control.memory import release_freed_memory
from drainproxy.core.lifecycle import (
    DrainLifecycle,
    DrainSource,
    DrainTimings,
    Evidence,
    Phase,
    Transition,
)
from drainproxy.core.probers import ArrivalPace, ProberTracker
from drainproxy.core.snapshot import Snapshot, take_snapshot
from drainproxy.core.stats import Stats
from drainproxy.dataplane.backlog import (
    accept_queued,
    listening_sockets,
    refuse_new_handshakes,
    wait_for_handshakes,
)
from drainproxy.dataplane.context import ProxyContext
from drainproxy.dataplane.proxy import ClientConnection
from drainproxy.dataplane.upstream import UpstreamPool
from drainproxy.errors import ConfigError

log = logging.getLogger("drainproxy")

#: How the app is stopped once the drain is over; returns a one-line outcome for the logs.
AppStopper = Callable[[], Awaitable[str]]


class Server:
    def __init__(self, config: Config, loop_name: str = "asyncio") -> None:
        self.config = config
        self.loop_name = loop_name
        self.loop = asyncio.get_running_loop()
        self.lifecycle = DrainLifecycle(
            DrainTimings(
                readiness_fail_delay=config.drain.readiness_fail_delay,
                propagation=config.drain.propagation,
                min=config.drain.min,
                timeout=config.drain.timeout,
                evidence=config.drain.propagation_mode == "evidence",
                propagation_min=config.drain.propagation_min,
                propagation_margin=config.drain.propagation_margin,
                quiet=config.drain.quiet,
            ),
            clock=self.loop.time,
        )
        self.stats = Stats()
        self.probers = ProberTracker(config.drain.probers, config.drain.default_failure_threshold)
        self.pool: UpstreamPool
        max_head = config.limits.max_response_header_bytes
        if config.upstream.protocol != "http1":
            from drainproxy.dataplane.h2_upstream import H2BridgePool

            self.pool = H2BridgePool(config.upstream, self.loop, self.stats, max_head)
        else:
            self.pool = UpstreamPool(config.upstream, self.loop, max_head)
        self._evidence_mode = config.drain.propagation_mode == "evidence"
        #: Requests timed per client, for evidence mode only (it costs the data path a little).
        self.pace = ArrivalPace()
        self.proxy = ProxyContext(
            config=config,
            pool=self.pool,
            lifecycle=self.lifecycle,
            stats=self.stats,
            loop=self.loop,
            on_connection_closed=self._connection_closed,
            arrivals=self.pace if self._evidence_mode else None,
        )
        self.probe = AppProbe(config.upstream, on_checked=self._app_checked)
        #: preStop calls waiting for their drain's app stop, by drain number.
        self._prestop_waiters: dict[int, asyncio.Event] = {}
        #: app.stop's method; the preStop calls are released after it in every mode.
        self.app_stop: StopMethod = stop_method_for(config.app)
        self.app_stopper: AppStopper = lambda: stop_then_release(
            self._release_prestop_hooks, self.app_stop
        )
        self._app_stop_checked = False
        self.exit_code = 0
        #: For /metrics: phase changes by the phase entered, and how the last app stop went.
        self.phases_entered: dict[str, int] = {}
        self.app_stop_outcome: str | None = None
        self._listener: asyncio.Server | None = None
        #: The drain is closing the listener (backlog.py): not quiescent before it is closed.
        self._listener_closing = False
        #: Connections accepted from the listener's queue, not yet handed to the protocol.
        self._adopting = 0
        self._wake = asyncio.Event()
        self._signals: list[signal.Signals] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop_admin: Callable[[], Awaitable[None]] | None = None
        #: While RECOVERING: the restarted app must be seen down first, unless this passes.
        self._app_seen_down = False
        self._old_app_gone_by = 0.0
        #: The counters the drain summary reports, as they were when the current drain began:
        #: it reports that drain's share, not the process's whole life.
        self._counts_at_drain: tuple[int, dict[str, int]] = (0, {})
        bind_log_context(lambda: self.lifecycle.phase, self.snapshot)

    # --- the one entry point for every drain trigger --------------------------------------------

    def request_drain(self, source: DrainSource) -> bool:
        started = self.lifecycle.request_drain(source)
        if started:
            self._counts_at_drain = (
                self._requests_outside_serving(),
                self.stats.connections_closed.copy(),
            )
        self._wake.set()
        return started

    def shutdown_now(self, reason: str, exit_code: int) -> None:
        """Exit at once, without a drain: the app is gone, or cannot be stopped as configured."""
        if self.lifecycle.phase is not Phase.STOPPED:
            self.exit_code = exit_code
            self.lifecycle.shutdown_now(reason)
            self._wake.set()

    async def prestop_hook(self) -> None:
        """``GET /prestop``, the app container's preStop hook: start (or join) a drain and return
        once that drain's app stop is due. Each drain releases only its own calls: a hook
        repeated while recovering, or in a later drain, waits for that drain (issue 12)."""
        self.request_drain(DrainSource.PRESTOP)
        number = self.lifecycle.prestop_waits_for()
        if number is None:
            return
        await self._prestop_waiters.setdefault(number, asyncio.Event()).wait()

    def readiness(self) -> str | None:
        """None when /ready answers 200; else why not: the drain phase, or the app's check."""
        if not self.lifecycle.is_ready():
            return self.lifecycle.phase.value
        if not self.probe.reachable:
            return "app unreachable"
        return None

    def note_readiness_probe(self, address: str, user_agent: str, ready: bool) -> None:
        """A prober asked /ready; its answers are the evidence of evidence-based propagation."""
        self.probers.record(address, user_agent, ready, self.loop.time())
        if not ready and self.lifecycle.phase is Phase.PROPAGATING:
            self._wake.set()

    def _evidence(self) -> Evidence:
        now = self.loop.time()
        return Evidence(
            probers_satisfied_at=self.probers.all_satisfied_at(now),
            last_arrival_at=self.pace.last_arrival,
            traffic_overdue_at=self.pace.overdue_at(now),
            probers=self.probers.describe(now),
            traffic=self.pace.describe(now),
        )

    def in_flight(self) -> int:
        return sum(conn.in_flight() for conn in self.proxy.connections)

    def snapshot(self) -> Snapshot:
        """What /status, /metrics and the log lines report, as of now."""
        return take_snapshot(
            self.lifecycle,
            self.stats,
            self.loop.time(),
            ready=self.readiness() is None,
            app_reachable=self.probe.reachable,
            app_check_error=self.probe.last_error or None,
            in_flight=self.in_flight(),
            open_connections=len(self.proxy.connections),
            phases_entered=self.phases_entered,
            app_stop_outcome=self.app_stop_outcome,
        )

    # --- run --------------------------------------------------------------------------------

    async def run(self) -> int:
        await self._open_listener()
        try:
            self._stop_admin = await start_admin(self, self.config.admin)
        except OSError as exc:
            if self._listener is not None:
                self._listener.close()
            raise _bind_error("admin.listen", self.config.admin.listen, exc) from None
        self.probe.start()
        self._install_signal_handlers()
        self._log_start()
        release_freed_memory()
        try:
            await self._drive()
        finally:
            await self._shutdown()
        return self.exit_code

    async def _drive(self) -> None:
        while True:
            self._wake.clear()
            self._handle_signals()
            self.lifecycle.poll()
            if self.lifecycle.phase is Phase.PROPAGATING and self._evidence_mode:
                self.lifecycle.consider_evidence(self._evidence())
            for transition in self.lifecycle.pop_transitions():
                self._enter(transition)
            if self.lifecycle.phase is Phase.STOPPED:
                return
            if self._wake.is_set():
                continue
            timeout = self.lifecycle.time_until_deadline()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    # --- phase effects, in the order of the drain --------------------------------------------

    def _enter(self, transition: Transition) -> None:
        entered = transition.phase.value
        self.phases_entered[entered] = self.phases_entered.get(entered, 0) + 1
        log.info(
            "phase %s -> %s (%s)",
            transition.previous.value,
            transition.phase.value,
            transition.reason,
            extra={"event": "phase", "phase": transition.phase.value},
        )
        effects = {
            Phase.DELAYING: self._keep_ready_for_delay,
            Phase.PROPAGATING: self._fail_readiness,
            Phase.DRAINING: self._stop_accepting,
            Phase.STOPPING_APP: self._stop_app,
            Phase.DRAINED: self._stay_drained,
            Phase.RECOVERING: self._recover,
            Phase.SERVING: self._serve_again,
            Phase.STOPPED: self._stop,
        }
        effects[transition.phase]()

    def _keep_ready_for_delay(self) -> None:
        log.info("staying ready for %gs", self.config.drain.readiness_fail_delay)

    def _fail_readiness(self) -> None:
        log.info(
            "readiness now fails; still serving for %gs while endpoint removal propagates; "
            "responses carry Connection: close, HTTP/2 connections get GOAWAY",
            self.config.drain.propagation,
        )
        self.proxy.announce_drain()

    def _stop_accepting(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._listener_closing = True
            self._spawn(self._close_listener(listener))
        self._close_idle_connections()
        self._connection_closed()

    async def _close_listener(self, listener: asyncio.Server) -> None:
        """Close the listener without resetting a connection the kernel completed for it:
        complete no new handshake, let those under way finish, accept all, close (backlog.py)."""
        handles = listening_sockets(listener)
        try:
            if not all([refuse_new_handshakes(handle) for handle in handles]):
                log.warning("cannot stop new handshakes before closing the listener (no filter)")
            ports = {handle.getsockname()[1] for handle in handles}
            unfinished = await wait_for_handshakes(ports)
            backlog = [conn for handle in handles for conn in accept_queued(handle)]
        finally:
            listener.close()
            for handle in handles:
                handle.close()
        for conn in backlog:
            self._adopt(conn)
        log.info(
            "listener closed; accepted %d connection(s) left in its queue%s; %d connection(s) "
            "open, %d request(s) in flight; timeout in %gs",
            len(backlog),
            f", {unfinished} handshake(s) unfinished" if unfinished else "",
            len(self.proxy.connections) + len(backlog),
            self.in_flight(),
            self.config.drain.timeout,
            extra={"event": "listener_closed", "backlog": len(backlog)},
        )
        self._listener_closing = False
        self._connection_closed()

    def _adopt(self, conn: socket.socket) -> None:
        """Serve a connection accepted from the queue like one the listener accepted."""
        self._adopting += 1

        async def serve() -> None:
            try:
                await self.loop.connect_accepted_socket(
                    lambda: ClientConnection(self.proxy),
                    conn,
                    ssl=self.proxy.listener_ssl,
                    ssl_handshake_timeout=self._handshake_timeout(),
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log.debug("a connection accepted from the queue failed: %s", exc)
                conn.close()
            finally:
                self._adopting -= 1
                self._connection_closed()

        self._spawn(serve())

    def _close_idle_connections(self) -> None:
        """Close idle keep-alive connections, spread over drain.close_spread so their clients
        do not all reconnect to the other replicas in the same instant."""
        grace = self.config.drain.idle_grace
        idle = [conn for conn in self.proxy.connections if conn.is_idle()]
        spread = self.config.drain.close_spread
        for index, conn in enumerate(idle):
            delay = spread * index / len(idle)
            if delay:
                self.loop.call_later(delay, conn.close_when_idle, grace)
            else:
                conn.close_when_idle(grace)

    def _stop_app(self) -> None:
        self._force_close_remaining("drain.timeout")
        # If this drain ends RECOVERING, the app must first be seen gone (see _recover); the
        # probe may report before that phase's effect runs, so close the gate now.
        self._app_seen_down = False
        self._old_app_gone_by = math.inf
        self._spawn(self._run_app_stopper())

    def _stay_drained(self) -> None:
        self._log_summary()
        log.info("drained; waiting for SIGTERM")

    def _recover(self) -> None:
        self._log_summary()
        # Right after the release the old app still answers; the kubelet is about to stop it.
        self._old_app_gone_by = self.loop.time() + self.config.app.stop_timeout
        self._spawn(self._open_listener())

    def _serve_again(self) -> None:
        log.info("serving again")

    def _stop(self) -> None:
        self._force_close_remaining("immediate shutdown")
        for waiter in self._prestop_waiters.values():  # exiting: nothing is left to wait for
            waiter.set()
        self._prestop_waiters.clear()
        if self.lifecycle.immediate:
            log.warning("immediate shutdown")
        elif (
            self.lifecycle.completed_drains
            and self.lifecycle.completed_drains[-1] is self.lifecycle.drain
        ):
            self._log_summary()

    # --- helpers for the effects -------------------------------------------------------------

    async def _run_app_stopper(self) -> None:
        try:
            outcome = await self.app_stopper()
        except Exception:
            log.exception("stopping the app failed")
            outcome = "failed"
        self.app_stop_outcome = outcome
        log.info("app stop: %s", outcome, extra={"event": "app_stop", "outcome": outcome})
        if self.lifecycle.phase is Phase.STOPPING_APP:
            self.lifecycle.note_app_stopped()
            self._wake.set()

    async def _release_prestop_hooks(self) -> str:
        """Release the preStop calls of the drain stopping the app (an immediate shutdown may
        have released every call already)."""
        if self.lifecycle.phase is Phase.STOPPING_APP:
            number = self.lifecycle.note_app_released()
            waiter = self._prestop_waiters.pop(number, None)
            if waiter is not None:
                waiter.set()
            log.debug("released the preStop calls waiting for drain %d", number)
        return "preStop hooks released"

    def _force_close_remaining(self, why: str) -> None:
        remaining = [conn for conn in self.proxy.connections if not conn.closing]
        for conn in remaining:
            conn.force_close()
        if remaining:
            log.warning("%s: cut %d connection(s) still open", why, len(remaining))

    def _connection_closed(self) -> None:
        drain = self.lifecycle.drain
        if (
            self.lifecycle.phase is Phase.DRAINING
            and drain is not None
            and drain.quiescent_at is None
            and not self.proxy.connections
            and not self._listener_closing
            and not self._adopting
            and not self.proxy.handshaking
        ):
            self.lifecycle.note_quiescent()
            self._wake.set()

    def _app_checked(self, reachable: bool) -> None:
        if reachable and not self._app_stop_checked:
            self._check_app_stop()
        if self.lifecycle.phase is not Phase.RECOVERING:
            return
        if not reachable:
            self._app_seen_down = True
        elif self._app_seen_down or self.loop.time() >= self._old_app_gone_by:
            self.lifecycle.note_app_ready()
            self._wake.set()

    def _check_app_stop(self) -> None:
        """Once the app answers it must be possible to stop it: fail now, not at the rollout."""
        self._app_stop_checked = True
        try:
            log.info("app stop plan: %s", self.app_stop.check(), extra={"event": "app_stop_plan"})
        except AppStopError as exc:
            log.error("%s", exc, extra={"event": "app_stop_check_failed"})
            self.shutdown_now("the app cannot be stopped as configured", 1)

    def _log_summary(self) -> None:
        drain = self.lifecycle.drain
        if drain is None:
            return
        requests_before, closed_before = self._counts_at_drain
        closed = {
            reason: count - closed_before.get(reason, 0)
            for reason, count in self.stats.connections_closed.items()
        }
        phases = ", ".join(
            f"{phase.value} {seconds:.3f}s" for phase, seconds in drain.phase_seconds.items()
        )
        during = self._requests_outside_serving() - requests_before
        log.info(
            "drain summary: %s; requests served during the drain %d; connections closed idle %d, "
            "after a response %d, by force %d",
            phases,
            during,
            closed.get("idle", 0),
            closed.get("after_response", 0),
            closed.get("forced", 0),
            extra={"event": "drain_summary", "forced": drain.forced},
        )

    def _requests_outside_serving(self) -> int:
        serving = Phase.SERVING.value
        return sum(n for phase, n in self.stats.requests_by_phase.items() if phase != serving)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handshake_timeout(self) -> float | None:
        if self.proxy.listener_ssl is None:
            return None
        return self.config.timeouts.request_head or None

    async def _open_listener(self) -> None:
        listen = self.config.listen
        try:
            listener = await self._create_listener(listen)
        except OSError as exc:
            raise _bind_error("listen", listen, exc) from None
        if self.lifecycle.accepts_connections():
            self._listener = listener
        else:  # reopened for a recovery that a new drain overtook while it opened
            self._listener_closing = True
            await self._close_listener(listener)

    async def _create_listener(self, listen: Address) -> asyncio.Server:
        return await self.loop.create_server(
            lambda: ClientConnection(self.proxy),
            listen.host,
            listen.port,
            reuse_address=True,
            backlog=1024,
            ssl=self.proxy.listener_ssl,
            ssl_handshake_timeout=self._handshake_timeout(),
        )

    # --- signals --------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.loop.add_signal_handler(signum, self._record_signal, signum)

    def _record_signal(self, signum: signal.Signals) -> None:
        self._signals.append(signum)
        self._wake.set()

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            log.info("received %s", signum.name, extra={"event": "signal"})
            repeated_interrupt = signum is signal.SIGINT and self.lifecycle.is_draining()
            if signum is signal.SIGQUIT or repeated_interrupt:
                self.shutdown_now(f"{signum.name}: immediate shutdown", 128 + signum)
            else:
                self.request_drain(DrainSource.SIGNAL)

    # --- start and end ------------------------------------------------------------------------

    def _log_start(self) -> None:
        effective = json.dumps(_plain(self.config), separators=(",", ":"), default=str)
        log.info(
            "drainproxy %s on %s loop: proxy %s -> %s, admin %s; config %s",
            __version__,
            self.loop_name,
            self.config.listen,
            self.config.upstream.url,
            self.config.admin.listen,
            effective,
            extra={"event": "start"},
        )

    async def _shutdown(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.loop.remove_signal_handler(signum)
        if self._listener is not None:
            self._listener.close()
        self.probe.stop()
        for conn in list(self.proxy.connections):
            conn.force_close()
        self.pool.close_all()
        for task in list(self._tasks):
            task.cancel()
        if self._stop_admin is not None:
            await self._stop_admin()
        log.info("exiting with status %d", self.exit_code, extra={"event": "exit"})


def _bind_error(key: str, address: Address, exc: OSError) -> ConfigError:
    """A listener that cannot be opened, named by its config key (issue 15)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ConfigError(key, str(address), f"cannot be listened on: {reason}")


def _plain(value: object) -> object:
    """Config dataclasses as JSON-able data, with the admin token hidden."""
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        fields = value.__dataclass_fields__
        return {
            name: (
                "***" if name == "token" and getattr(value, name) else _plain(getattr(value, name))
            )
            for name in fields
        }
    return value
