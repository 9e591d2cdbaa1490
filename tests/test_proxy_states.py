"""The HTTP/1.1 client connection's named states (issue 13 item 3), in process: the transition
table itself, and the real ``ClientConnection`` and ``UpstreamConnection``, with their llhttp
parsers, driven through transports that record what is written (no sockets, no event loop
turns), so each state is reached by the bytes that reach it in production."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import pytest_asyncio

from drainproxy.config.schema import config_from_mapping
from drainproxy.core.lifecycle import DrainLifecycle, DrainTimings
from drainproxy.core.stats import Stats
from drainproxy.dataplane.context import ProxyContext
from drainproxy.dataplane.proxy import (
    TRANSITIONS,
    ClientConnection,
    ConnectionState,
    IllegalTransition,
)
from drainproxy.dataplane.upstream import UpstreamConnection, UpstreamPool

GET = b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingTransport(asyncio.Transport):
    """Keeps what is written and what is done to it."""

    def __init__(self, peer: str = "10.0.0.7") -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.eof_written = self.closed = self.aborted = self.reading_paused = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: Any) -> None:
        assert not self.eof_written and not self.closed, "written after the end"
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def take(self) -> bytes:
        data, self.written = bytes(self.written), bytearray()
        return data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


@dataclass
class Rig:
    """One client connection and one pooled connection to the app, both on recording
    transports."""

    ctx: ProxyContext
    client: ClientConnection
    to_client: RecordingTransport
    app: UpstreamConnection
    to_app: RecordingTransport

    def state(self) -> ConnectionState:
        """The client connection's state (a call: each test step reads it afresh)."""
        return self.client.state

    def lose_client(self) -> None:
        self.client.connection_lost(None)


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    config = config_from_mapping({"upstream": "http://127.0.0.1:9"})
    ctx = ProxyContext(
        config=config,
        pool=UpstreamPool(config.upstream, loop),
        lifecycle=DrainLifecycle(DrainTimings(), clock=loop.time),
        stats=Stats(),
        loop=loop,
        on_connection_closed=lambda: None,
    )
    client = ClientConnection(ctx)
    to_client = RecordingTransport()
    client.connection_made(to_client)
    app = UpstreamConnection(ctx.pool)
    to_app = RecordingTransport()
    app.connection_made(to_app)
    ctx.pool.release(app)
    yield Rig(ctx, client, to_client, app, to_app)


# --- the table --------------------------------------------------------------------------------


def test_every_state_is_reachable_from_new_and_only_closed_is_final() -> None:
    reached, frontier = {ConnectionState.NEW}, [ConnectionState.NEW]
    while frontier:
        for following in TRANSITIONS[frontier.pop()]:
            if following not in reached:
                reached.add(following)
                frontier.append(following)
    assert reached == set(ConnectionState)
    assert [state for state in ConnectionState if not TRANSITIONS[state]] == [
        ConnectionState.CLOSED
    ]
    for state in set(ConnectionState) - {ConnectionState.CLOSED}:
        assert ConnectionState.CLOSED in TRANSITIONS[state], state
    for source, targets in TRANSITIONS.items():
        assert ConnectionState.NEW not in targets and source not in targets


def test_closing_means_lingering_or_closed() -> None:
    closing = {state for state in ConnectionState if state.closing}
    assert closing == {ConnectionState.LINGERING, ConnectionState.CLOSED}


async def test_an_illegal_move_raises_and_leaves_the_state(rig: Rig) -> None:
    with pytest.raises(IllegalTransition, match="NEW to SWITCHED_PROTOCOL"):
        rig.client._enter(ConnectionState.SWITCHED_PROTOCOL)
    assert rig.state() is ConnectionState.NEW


# --- the states, reached by bytes -------------------------------------------------------------


async def test_keep_alive_exchanges_leave_the_connection_open_and_idle(rig: Rig) -> None:
    assert rig.state() is ConnectionState.NEW and rig.client.is_idle()
    for _ in range(3):
        rig.client.data_received(GET)
        assert rig.state() is ConnectionState.OPEN and not rig.client.is_idle()
        assert rig.to_app.take().startswith(b"GET /a HTTP/1.1\r\nHost: example.com\r\n")
        rig.app.data_received(OK)
        assert rig.to_client.take() == OK
        assert rig.client.is_idle() and rig.client.in_flight() == 0
        assert rig.client.active is rig.client.current is None
        assert rig.app.client is None  # back in the pool
    assert rig.ctx.stats.requests_total == 3


async def test_pipelined_requests_queue_and_are_answered_in_order(rig: Rig) -> None:
    rig.client.data_received(GET + GET.replace(b"/a", b"/b"))
    assert rig.client.queue is not None and len(rig.client.queue) == 1
    assert rig.to_client.reading_paused
    rig.app.data_received(OK)
    assert rig.to_client.take() == OK
    assert not rig.to_client.reading_paused
    assert rig.to_app.take().count(b"GET /") == 2
    rig.app.data_received(OK)
    assert rig.to_client.take() == OK and rig.client.is_idle()


async def test_a_refused_request_answers_those_before_it_then_closes(rig: Rig) -> None:
    rig.client.data_received(GET + b"GET /b HTTP/1.1\r\n\r\n")  # HTTP/1.1 without Host
    assert rig.state() is ConnectionState.MUST_CLOSE
    rig.client.data_received(GET)  # nothing more is parsed
    rig.app.data_received(OK)
    answer = rig.to_client.take()
    assert answer.startswith(OK + b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close\r\n" in answer[len(OK) :]
    assert rig.state() is ConnectionState.LINGERING and rig.client.closing
    assert rig.to_client.eof_written and not rig.to_client.closed
    assert rig.to_app.take().count(b"GET /") == 1
    rig.lose_client()
    assert rig.ctx.stats.connections_closed == {"after_response": 1}


async def test_a_request_for_close_ends_the_connection_after_its_answer(rig: Rig) -> None:
    rig.client.data_received(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    rig.app.data_received(OK)
    assert rig.to_client.take().startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    # The client said it sends nothing more: no linger.
    assert rig.state() is ConnectionState.CLOSED and rig.to_client.closed


async def test_a_half_close_during_the_answer_ends_the_input(rig: Rig) -> None:
    rig.client.data_received(GET)
    rig.app.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    assert rig.client.eof_received() is True
    assert rig.state() is ConnectionState.INPUT_ENDED
    rig.app.data_received(b"!!")
    assert rig.to_client.take().endswith(b"ok!!")
    assert rig.state() is ConnectionState.CLOSED and rig.to_client.closed
    assert not rig.to_client.eof_written


async def test_a_half_close_before_the_answer_aborts_the_exchange(rig: Rig) -> None:
    rig.client.data_received(GET)
    assert rig.client.eof_received() is False  # the transport closes; nothing more is read
    rig.lose_client()
    assert rig.to_app.aborted
    assert rig.ctx.stats.connections_closed == {"client": 1}


async def test_an_upgrade_holds_input_then_relays_both_ways(rig: Rig) -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    rig.client.data_received(upgrade + b"early")
    assert rig.state() is ConnectionState.MIGHT_SWITCH_PROTOCOL
    rig.client.data_received(b"-more")
    assert rig.to_client.reading_paused
    assert b"\r\nUpgrade: websocket\r\n" in rig.to_app.take()
    rig.app.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert rig.state() is ConnectionState.SWITCHED_PROTOCOL
    assert rig.to_app.take() == b"early-more"
    assert not rig.to_client.reading_paused
    assert rig.to_client.take().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    rig.client.data_received(b"ping")
    rig.app.data_received(b"pong")
    assert (rig.to_app.take(), rig.to_client.take()) == (b"ping", b"pong")
    assert not rig.client.is_idle()  # the tunnel's exchange stays active
    rig.app.connection_lost(None)
    assert rig.state() is ConnectionState.LINGERING


async def test_an_upgrade_the_app_declines_is_answered_then_closed(rig: Rig) -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    rig.client.data_received(upgrade)
    rig.app.data_received(OK)
    assert rig.to_client.take().startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    assert rig.state() is ConnectionState.LINGERING
    assert rig.to_app.aborted  # the app may have switched: never reused


async def test_the_http2_preface_hands_the_connection_over(rig: Rig) -> None:
    rig.client.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert rig.state() is ConnectionState.CLOSED
    assert rig.client not in rig.ctx.connections
    (successor,) = rig.ctx.connections
    assert type(successor).__name__ == "H2ClientConnection"
    assert rig.to_client.protocol is cast(asyncio.BaseProtocol, successor)
    assert not rig.to_client.is_closing()


async def test_a_connection_over_the_limit_is_refused_and_never_counted(rig: Rig) -> None:
    rig.ctx.max_connections = 1
    extra = ClientConnection(rig.ctx)
    transport = RecordingTransport()
    extra.connection_made(transport)
    assert transport.take().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert extra.state is ConnectionState.LINGERING and extra not in rig.ctx.connections
    extra.data_received(GET)  # discarded while the close lingers
    assert transport.take() == b""
    extra.force_close()
    extra.connection_lost(None)
    assert rig.ctx.stats.connections_closed == {"refused": 1}
    assert rig.ctx.stats.connections_refused == 1


async def test_a_forced_close_keeps_a_lingering_close_reason(rig: Rig) -> None:
    rig.client.close_when_idle(0.0)
    assert rig.state() is ConnectionState.LINGERING
    rig.client.force_close()
    assert rig.state() is ConnectionState.CLOSED and rig.to_client.aborted
    rig.lose_client()
    assert rig.ctx.stats.connections_closed == {"idle": 1}


async def test_a_forced_close_of_a_busy_connection_counts_as_forced(rig: Rig) -> None:
    rig.client.data_received(GET)
    rig.client.force_close()
    rig.lose_client()
    assert rig.to_app.aborted
    assert rig.ctx.stats.connections_closed == {"forced": 1}


async def test_a_close_delimited_body_cut_short_ends_with_a_reset(rig: Rig) -> None:
    """An HTTP/1.0 client delimits a body without length by the close: a cut must not look
    like its end (issue 11)."""
    rig.client.data_received(b"GET /a HTTP/1.0\r\n\r\n")
    rig.app.data_received(b"HTTP/1.1 200 OK\r\n\r\npartial")
    assert rig.to_client.take().endswith(b"\r\nConnection: close\r\n\r\npartial")
    rig.app.connection_lost(ConnectionResetError())
    assert rig.state() is ConnectionState.CLOSED
    assert rig.to_client.aborted and not rig.to_client.closed
    rig.lose_client()
    assert rig.ctx.stats.connections_closed == {"cut": 1}
