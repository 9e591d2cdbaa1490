"""A legacy app for the app-stop and wrapper tests: a real process with configurable signal
behaviour. Starts fast (stdlib only). Every line it prints starts with "fake app", so tests can
tell its output from drainproxy's.

    python tests/fake_app.py --port N [--pidfile F] [--ignore SIG] [--exit-on SIG]
                             [--report SIG] [--marker TOKEN]

GET /          200 "hello from fake app"
GET /exit/N    answers, then exits with status N (a crash, as far as drainproxy knows)
GET /orphans/N starts N grandchildren whose parent exits at once; they exit shortly after
               (prints "fake app: left orphans PID PID ...")
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

ORPHAN_LIFETIME = "0.2"


def say(text: str) -> None:
    # One write per line: drainproxy writes to the same pipe, and an unbuffered print() writes
    # the text and its newline separately, letting a drainproxy line land in between.
    os.write(sys.stdout.fileno(), f"fake app: {text}\n".encode())


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if parts[0] == "orphans":
            count = int(parts[1])
            # sh backgrounds the sleeps and exits: they are re-parented (to PID 1 or a subreaper).
            orphan = f"sleep {ORPHAN_LIFETIME} </dev/null >/dev/null 2>&1 & echo $!; "
            started = subprocess.run(
                ["sh", "-c", orphan * count], check=True, capture_output=True, text=True
            )
            say(f"left orphans {' '.join(started.stdout.split())}")
        self._answer(b"hello from fake app\n")
        if parts[0] == "exit":
            say(f"exiting with status {parts[1]}")
            os._exit(int(parts[1]))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pidfile")
    parser.add_argument("--ignore", action="append", default=[])
    parser.add_argument("--exit-on", action="append", default=[])
    parser.add_argument("--report", action="append", default=[])
    parser.add_argument("--marker")
    args = parser.parse_args()

    def exit_on(signum: int, frame: FrameType | None) -> None:
        say(f"got {signal.Signals(signum).name}, exiting")
        os._exit(0)

    def report(signum: int, frame: FrameType | None) -> None:
        say(f"got {signal.Signals(signum).name}")

    for name in args.ignore:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    for name in args.exit_on:
        signal.signal(signal.Signals[name], exit_on)
    for name in args.report:
        signal.signal(signal.Signals[name], report)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as pidfile:
            pidfile.write(f"{os.getpid()}\n")
        os.replace(args.pidfile + ".tmp", args.pidfile)
    say(f"listening on {args.port}, pid {os.getpid()}")
    # Serve in a thread: the main thread stays free to run signal handlers at once.
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
