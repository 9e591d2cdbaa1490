"""gRPC end to end through drainproxy (``upstream.protocol: h2c``): a real grpcio client and server,
streaming both ways, statuses in trailers, deadlines and cancellation carried to the app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
import pytest_asyncio

from tests.grpc_app import GrpcApp, method
from tests.proxy_support import launch_proxy
from tests.support import ProxyProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1 << 20


def _same(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def grpc_app() -> Iterator[GrpcApp]:
    app = GrpcApp("a")
    app.start(free_port())
    yield app
    app.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def proxy(
    grpc_app: GrpcApp, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ProxyProcess]:
    process = await launch_proxy(
        grpc_app.port,
        tmp_path_factory.mktemp("proxy"),
        {"upstream": {"protocol": "h2c"}, "log": {"access_log": True}},
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(proxy: ProxyProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as chan:
        yield chan


def unary(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method(name), _same, _same)


def server_streaming(channel: grpc.Channel, name: str) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(method(name), _same, _same)


async def test_unary(channel: grpc.Channel) -> None:
    reply = await asyncio.to_thread(unary(channel, "Unary"), b"hello", timeout=10)
    assert reply == b"a:hello"


async def test_server_streaming_larger_than_the_windows(channel: grpc.Channel) -> None:
    call = server_streaming(channel, "ServerStream")
    replies = await asyncio.to_thread(lambda: list(call(b"64x65536", timeout=30)))
    assert len(replies) == 64
    assert replies[-1] == b"63:" + b"s" * 65536


async def test_client_streaming_larger_than_the_windows(channel: grpc.Channel) -> None:
    call = channel.stream_unary(method("ClientStream"), _same, _same)
    messages = [b"c" * MiB] * 8
    reply = await asyncio.to_thread(call, iter(messages), timeout=30)
    assert reply == b"%d" % (8 * MiB)


async def test_bidi_streaming_interleaves(channel: grpc.Channel) -> None:
    """Each reply comes back before the next message is sent: nothing waits for the end of the
    request stream."""
    call = channel.stream_stream(method("Bidi"), _same, _same)

    def ping_pong() -> list[bytes]:
        import queue

        outgoing: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outgoing.get()) is not None:
                yield item

        replies = []
        responses = call(requests(), timeout=30)
        for word in (b"one", b"two", b"three"):
            outgoing.put(word)
            replies.append(next(responses))
        outgoing.put(None)
        assert list(responses) == []
        return replies

    assert await asyncio.to_thread(ping_pong) == [b"ONE", b"TWO", b"THREE"]


async def test_error_status_in_a_trailers_only_response(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        await asyncio.to_thread(unary(channel, "Fail"), b"x", timeout=10)
    error = failure.value
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing: x"


async def test_error_status_in_trailers_after_messages(channel: grpc.Channel) -> None:
    call = server_streaming(channel, "FailMidStream")

    def collect() -> tuple[list[bytes], grpc.RpcError]:
        received: list[bytes] = []
        try:
            for reply in call(b"", timeout=10):
                received.append(reply)
        except grpc.RpcError as exc:
            return received, exc
        raise AssertionError("no error status")

    received, error = await asyncio.to_thread(collect)
    assert received == [b"first", b"second"]
    assert error.code() is grpc.StatusCode.DATA_LOSS
    assert ("why", "broken") in error.trailing_metadata()


async def test_deadline_reaches_the_app(channel: grpc.Channel) -> None:
    """grpc-timeout passes through: the app knows the client's deadline (without the field it
    would have none; the client rounds the field up a little)."""
    remaining = await asyncio.to_thread(unary(channel, "Deadline"), b"", timeout=7)
    assert remaining != b"none"
    assert 0 < float(remaining) < 7.5


async def test_expired_deadline_cancels_the_app_call(
    channel: grpc.Channel, grpc_app: GrpcApp
) -> None:
    before = grpc_app.cancelled
    with pytest.raises(grpc.RpcError) as failure:
        await asyncio.to_thread(unary(channel, "Hang"), b"", timeout=0.5)
    assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.to_thread(wait_for_cancellations, grpc_app, before + 1)


async def test_client_cancellation_reaches_the_app(
    channel: grpc.Channel, grpc_app: GrpcApp
) -> None:
    before = grpc_app.cancelled
    hanging = grpc_app.hanging
    future = unary(channel, "Hang").future(b"", timeout=30)
    await asyncio.to_thread(wait_for, grpc_app, lambda: grpc_app.hanging > hanging)
    future.cancel()
    await asyncio.to_thread(wait_for_cancellations, grpc_app, before + 1)


async def test_many_concurrent_calls_on_one_connection(channel: grpc.Channel) -> None:
    call = unary(channel, "Unary")
    futures = [call.future(b"%d" % n, timeout=30) for n in range(200)]
    replies = await asyncio.to_thread(lambda: [future.result() for future in futures])
    assert replies == [b"a:%d" % n for n in range(200)]


async def test_calls_are_counted_and_logged(channel: grpc.Channel, proxy: ProxyProcess) -> None:
    before = (await proxy.status())["requests_total"]
    await asyncio.to_thread(unary(channel, "Unary"), b"counted", timeout=10)
    assert (await proxy.status())["requests_total"] == before + 1
    await proxy.log.wait(r"POST /test\.Echo/Unary 200 ")


def wait_for(app: GrpcApp, predicate: Callable[[], bool]) -> None:
    with app.cancel_seen:
        assert app.cancel_seen.wait_for(predicate, timeout=10)


def wait_for_cancellations(app: GrpcApp, count: int) -> None:
    wait_for(app, lambda: app.cancelled >= count)


async def test_curl_prior_knowledge_to_an_h2c_app(proxy: ProxyProcess) -> None:
    """curl speaking HTTP/2 through to the gRPC server: a gRPC-shaped request for a method the
    app lacks gets its trailers-only answer, carried through as it was sent."""
    process = await asyncio.create_subprocess_exec(
        *("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "-X", "POST"),
        *("-H", "content-type: application/grpc", "-H", "te: trailers", proxy.url + "/x.Y/Z"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert out.startswith(b"HTTP/2 200")
    assert b"grpc-status: 12" in out
