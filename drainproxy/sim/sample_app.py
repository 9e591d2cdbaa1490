"""A legacy app as teams bring it to Kubernetes: no signal handling, so SIGTERM kills it at once.

``python -m drainproxy.sim.sample_app --port 8000 --name replica-1``
Paths: ``/`` answers at once, ``/slow?seconds=1.5`` after a delay, ``/healthz`` for probes.
The standard library's threaded HTTP/1.1 server, so that it runs wherever drainproxy does (in
its image too) with nothing else installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def handler_for(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive connections, as real apps serve them

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/":
                self._answer(200, f"{name}\n")
            elif url.path == "/slow":
                time.sleep(float(parse_qs(url.query).get("seconds", ["1.5"])[0]))
                self._answer(200, f"{name} slow\n")
            elif url.path == "/healthz":
                self._answer(200, "ok\n")
            else:
                self._answer(404, "not found\n")

        def _answer(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """No access log: the tests watch this app's output for its start-up line only."""

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="app")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), handler_for(args.name))
    server.daemon_threads = True
    print(f"sample app {args.name} listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
