"""The admin API refuses requests whose framing is ambiguous (400, and the connection closes,
RFC 9112 section 6.3), where h11 alone would pick one reading: Content-Length beside
Transfer-Encoding, Content-Length repeated or listed, Transfer-Encoding in HTTP/1.0, obsolete
line folding; and 505 for a version other than HTTP/1.x. A refused POST /drain or GET /prestop
changes nothing.

In-process: the rule as a pure function, and the real admin listener in front of a hand-made
driver (an ``AdminControls`` whose state is a hand-made ``Snapshot``), which also shows that
/status and /metrics render what the driver's snapshot says. Then once through a real process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from drainproxy.config.schema import Address, AdminConfig
from drainproxy.control.admin import AdminServer, render_status, request_framing_fault
from drainproxy.control.metrics import render_metrics
from drainproxy.core.lifecycle import DrainSource, Phase
from drainproxy.core.snapshot import Snapshot
from drainproxy.core.stats import Counters
from drainproxy.sim.replica import free_port
from tests.proxy_support import RawClient, exchange, parse_responses
from tests.support import ProxyProcess

#: The listener and the process are shared by the module's tests.
module_loop = pytest.mark.asyncio(loop_scope="module")

SERVING = Snapshot(
    at=10.0,
    phase=Phase.SERVING,
    seconds_in_phase=10.0,
    ready=True,
    app_reachable=True,
    in_flight=1,
    open_connections=4,
    counters=Counters(requests_total=12),
)

#: Requests whose framing is ambiguous, each with the reason the 400 gives.
AMBIGUOUS = [
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "both Content-Length and Transfer-Encoding",
        id="content-length-then-transfer-encoding",
    ),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"content-LENGTH: 0\r\n\r\n0\r\n\r\n",
        "both Content-Length and Transfer-Encoding",
        id="transfer-encoding-then-content-length",
    ),
    pytest.param(
        b"GET /prestop HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "both Content-Length and Transfer-Encoding",
        id="prestop-with-both",
    ),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        "several Content-Length values",
        id="content-length-twice",
    ),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\nx",
        "several Content-Length values",
        id="content-length-list",
    ),
    pytest.param(
        b"POST /drain HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding in an HTTP/1.0 request",
        id="transfer-encoding-in-http-1.0",
    ),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nX-Note: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        "obsolete line folding is not accepted",
        id="obs-fold",
    ),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\t1\r\n\r\nx",
        "obsolete line folding is not accepted",
        id="obs-fold-of-content-length",
    ),
]

#: Their neighbours, whose framing is plain: accepted.
PLAIN = [
    pytest.param(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", id="empty"),
    pytest.param(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 01\r\n\r\nx", id="cl-01"),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        id="chunked",
    ),
    pytest.param(
        b"POST /drain HTTP/1.1\r\nHost: x\r\nX-Note: Content-Length: 1, 2\r\n"
        b"X-Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\nx",
        id="look-alikes-in-other-fields",
    ),
    pytest.param(b"POST /drain HTTP/1.0\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", id="http-1.0"),
]


class HandMadeDriver:
    """An ``AdminControls`` whose state is a hand-made Snapshot; records what it is asked."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.state = snapshot
        self.drains: list[DrainSource] = []
        self.probes: list[tuple[str, str, bool]] = []

    def snapshot(self) -> Snapshot:
        return self.state

    def readiness(self) -> str | None:
        return None if self.state.ready else self.state.phase.value

    def note_readiness_probe(self, address: str, user_agent: str, ready: bool) -> None:
        self.probes.append((address, user_agent, ready))

    def request_drain(self, source: DrainSource) -> bool:
        self.drains.append(source)
        return len(self.drains) == 1

    async def prestop_hook(self) -> None:
        self.request_drain(DrainSource.PRESTOP)


@pytest_asyncio.fixture(loop_scope="module")
async def admin() -> AsyncIterator[tuple[HandMadeDriver, int]]:
    """The real admin listener in this process, before a fresh hand-made driver; its port."""
    driver = HandMadeDriver(SERVING)
    port = free_port()
    server = AdminServer(driver, AdminConfig(listen=Address("127.0.0.1", port)))
    await server.start()
    yield driver, port
    await server.close()


# --- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "reason"), AMBIGUOUS)
def test_the_rule_names_what_is_ambiguous(request_bytes: bytes, reason: str) -> None:
    version = b"1.0" if b" HTTP/1.0\r" in request_bytes else b"1.1"
    assert request_framing_fault(request_bytes, version) == reason


@pytest.mark.parametrize("request_bytes", PLAIN)
def test_the_rule_passes_plain_framing(request_bytes: bytes) -> None:
    version = b"1.0" if b" HTTP/1.0\r" in request_bytes else b"1.1"
    assert request_framing_fault(request_bytes, version) is None


def test_the_rule_reads_the_head_only() -> None:
    """What follows the empty line (a body, a pipelined request) is not the head's framing."""
    body = b"Transfer-Encoding: chunked\r\n X-Fold: y\r\n"
    request = b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert request_framing_fault(request + body, b"1.1") is None


# --- the listener, in-process ------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "reason"), AMBIGUOUS)
@module_loop
async def test_an_ambiguous_request_is_400_closed_and_changes_nothing(
    admin: tuple[HandMadeDriver, int], request_bytes: bytes, reason: str
) -> None:
    driver, port = admin
    raw = await exchange(port, request_bytes)  # returns once the admin closes
    (response,) = parse_responses(raw, [b"POST"])
    assert (response.status, response.body) == (400, f"400: {reason}\n".encode())
    assert response.header(b"connection") == [b"close"]
    assert driver.drains == []


@pytest.mark.parametrize("request_bytes", PLAIN)
@module_loop
async def test_a_plain_request_is_answered(
    admin: tuple[HandMadeDriver, int], request_bytes: bytes
) -> None:
    driver, port = admin
    raw = await exchange(port, request_bytes.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    (response,) = parse_responses(raw, [b"POST"])
    assert response.status == 202
    assert raw.startswith(b"HTTP/1.1 202 Accepted\r\n")  # the reason phrase, as on aiohttp
    assert driver.drains == [DrainSource.ADMIN]


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"3.1"])
@module_loop
async def test_a_request_of_another_major_version_is_505(
    admin: tuple[HandMadeDriver, int], version: bytes
) -> None:
    """h11 would read ``HTTP/2.0`` as HTTP/1.1 (RFC 9110 section 15.6.6: 505)."""
    driver, port = admin
    raw = await exchange(
        port, b"POST /drain HTTP/%s\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % version
    )
    (response,) = parse_responses(raw, [b"POST"])
    assert response.status == 505
    assert response.header(b"connection") == [b"close"]
    assert driver.drains == []


@pytest.mark.parametrize("target", [b"http://[x/drain", b"http://[::1/drain"])
@module_loop
async def test_an_absolute_form_target_urlsplit_refuses_is_400(
    admin: tuple[HandMadeDriver, int], target: bytes
) -> None:
    """An unclosed IPv6 bracket made urlsplit raise in the request reader: the connection was
    dropped with no answer and a traceback, not JSON, went to stderr."""
    driver, port = admin
    raw = await exchange(port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % target)
    (response,) = parse_responses(raw, [b"POST"])
    assert (response.status, response.body) == (400, b"400: invalid request target\n")
    assert response.header(b"connection") == [b"close"]
    assert driver.drains == []


@module_loop
async def test_an_ambiguous_request_pipelined_after_a_good_one(
    admin: tuple[HandMadeDriver, int],
) -> None:
    """The head checked is the second request's own, read from what arrived with the first."""
    driver, port = admin
    raw = await exchange(
        port,
        b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    responses = parse_responses(raw, [b"GET", b"POST", b"POST"])
    assert [response.status for response in responses] == [200, 400]
    assert driver.drains == []


@module_loop
async def test_status_metrics_and_ready_answer_from_the_drivers_snapshot(
    admin: tuple[HandMadeDriver, int],
) -> None:
    driver, port = admin
    client = await RawClient.connect(port)
    try:
        status = await client.request(b"GET", b"/status")
        assert status.body == render_status(SERVING)
        metrics = await client.request(b"GET", b"/metrics")
        assert metrics.body == render_metrics(SERVING)[0]
        driver.state = Snapshot(
            at=20.0,
            phase=Phase.PROPAGATING,
            seconds_in_phase=1.0,
            ready=False,
            app_reachable=True,
            in_flight=0,
            open_connections=0,
        )
        ready = await client.request(b"GET", b"/ready", [(b"User-Agent", b"kube-probe/1.31")])
        assert (ready.status, ready.body) == (503, b"not ready: propagating\n")
        assert driver.probes[-1] == ("127.0.0.1", "kube-probe/1.31", False)
    finally:
        await client.close()


# --- a real process ----------------------------------------------------------------------------


@module_loop
async def test_a_real_admin_refuses_a_drain_with_both_framings(proxy: ProxyProcess) -> None:
    port = int(proxy.admin_url.rpartition(":")[2])
    raw = await exchange(
        port,
        b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    (response,) = parse_responses(raw, [b"POST"])
    assert response.status == 400
    assert response.header(b"connection") == [b"close"]
    assert (await proxy.status())["drain"] is None
