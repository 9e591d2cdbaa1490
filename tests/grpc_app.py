"""A real gRPC service (grpcio, generic handlers on raw bytes: no protoc) for the HTTP/2 tests, in
the test process or as a replica's app process (``python -m tests.grpc_app --port P --name N``,
stopping gracefully on SIGTERM as a well-behaved gRPC server does)."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "test.Echo"


def _same(data: bytes) -> bytes:
    return data


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


class GrpcApp:
    """The handlers, and what they saw (for assertions in the test process)."""

    def __init__(self, name: str = "app") -> None:
        self.name = name.encode()
        #: Hang calls begun, and those whose client went away (the deadline or the cancellation
        #: reached the app).
        self.hanging = 0
        self.cancelled = 0
        self.cancel_seen = threading.Condition()
        self.server: grpc.Server | None = None
        self.port = 0

    # --- handlers -----------------------------------------------------------------------------

    def unary(self, request: bytes, context: Any) -> bytes:
        return self.name + b":" + request

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        count, _, size = request.partition(b"x")
        payload = b"s" * int(size or b"1")
        for index in range(int(count)):
            yield b"%d:" % index + payload

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        return b"%d" % sum(len(message) for message in requests)

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for message in requests:
            yield message.upper()

    def deadline(self, request: bytes, context: Any) -> bytes:
        remaining = context.time_remaining()
        return b"none" if remaining is None else b"%.3f" % remaining

    def hang(self, request: bytes, context: Any) -> bytes:
        """Answer only when the client is gone: counts the cancellation that reached the app."""
        gone = threading.Event()
        context.add_callback(gone.set)
        with self.cancel_seen:
            self.hanging += 1
            self.cancel_seen.notify_all()
        gone.wait(60)
        with self.cancel_seen:
            self.cancelled += 1
            self.cancel_seen.notify_all()
        return b""

    def slow_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        """``count`` messages, ``pause`` seconds apart: a call still running during a drain."""
        count, _, pause = request.partition(b"/")
        for index in range(int(count)):
            yield b"%d" % index
            time.sleep(float(pause))

    def fail(self, request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        return b""

    def fail_mid_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        yield b"first"
        yield b"second"
        context.set_trailing_metadata((("why", "broken"),))
        context.abort(grpc.StatusCode.DATA_LOSS, "lost the rest")

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        streaming = grpc.unary_stream_rpc_method_handler
        handlers = {
            "Unary": unary(self.unary, _same, _same),
            "ServerStream": streaming(self.server_stream, _same, _same),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, _same, _same),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, _same, _same),
            "Deadline": unary(self.deadline, _same, _same),
            "Hang": unary(self.hang, _same, _same),
            "SlowStream": streaming(self.slow_stream, _same, _same),
            "Fail": unary(self.fail, _same, _same),
            "FailMidStream": streaming(self.fail_mid_stream, _same, _same),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def start(self, port: int) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(16))
        server.add_generic_rpc_handlers((self.handler(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        self.server = server
        self.port = port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0.5).wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="app")
    args = parser.parse_args()
    app = GrpcApp(args.name)
    app.start(args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"grpc app {args.name} serving on {args.port}", flush=True)
    stop.wait()
    assert app.server is not None
    app.server.stop(5).wait()


if __name__ == "__main__":
    main()
