"""The small client of the app check and the ``http`` app stop, against a raw-socket app: the
status of any valid head, and one clear reason for everything else."""

from __future__ import annotations

import asyncio

import pytest

from drainproxy.control.httpclient import HttpCallError, request_status
from tests.proxy_support import AppRequest, RawApp, response_bytes
from tests.support import free_port

Writer = asyncio.StreamWriter


async def test_status_of_a_valid_head_and_what_was_sent(raw_app: RawApp) -> None:
    @raw_app.route(b"/busy")
    async def busy(request: AppRequest, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + response_bytes(503, b"later"))
        return False

    assert await request_status("127.0.0.1", raw_app.port, "GET", "/ok?x=1", 5.0) == 200
    assert await request_status("127.0.0.1", raw_app.port, "POST", "/busy", 5.0) == 503
    sent = {request.path: request for request in raw_app.requests}
    assert sent[b"/ok"].target == b"/ok?x=1"
    assert sent[b"/ok"].header(b"host") == [b"127.0.0.1:%d" % raw_app.port]
    assert sent[b"/ok"].header(b"connection") == [b"close"]
    assert sent[b"/busy"].header(b"content-length") == [b"0"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 abc Nope\r\n\r\n", "invalid response: "),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "invalid response: "),
        (b"", "invalid response: "),  # closed without an answer
    ],
)
async def test_an_invalid_answer_is_named(raw_app: RawApp, answer: bytes, reason: str) -> None:
    @raw_app.route(b"/bad")
    async def bad(request: AppRequest, writer: Writer) -> bool:
        writer.write(answer)
        return False

    with pytest.raises(HttpCallError, match=reason) as caught:
        await request_status("127.0.0.1", raw_app.port, "GET", "/bad", 5.0)
    assert not caught.value.timed_out


async def test_refused_and_timed_out(raw_app: RawApp) -> None:
    with pytest.raises(HttpCallError, match="Connection refused"):
        await request_status("127.0.0.1", free_port(), "GET", "/", 5.0)

    @raw_app.route(b"/hang")
    async def hang(request: AppRequest, writer: Writer) -> bool:
        await asyncio.Event().wait()
        return False

    with pytest.raises(HttpCallError, match="timed out") as caught:
        await request_status("127.0.0.1", raw_app.port, "GET", "/hang", 0.3)
    assert caught.value.timed_out
