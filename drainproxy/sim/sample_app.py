"""A legacy app as teams bring it to Kubernetes: no signal handling, so SIGTERM kills it at once.

``python -m drainproxy.sim.sample_app --port 8000 --name replica-1``
Paths: ``/`` answers at once, ``/slow?seconds=1.5`` after a delay, ``/healthz`` for probes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import web


def make_app(name: str) -> web.Application:
    async def fast(request: web.Request) -> web.Response:
        return web.Response(text=f"{name}\n")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "1.5")))
        return web.Response(text=f"{name} slow\n")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/", fast)
    app.router.add_get("/slow", slow)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, name: str) -> None:
    runner = web.AppRunner(make_app(name), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"sample app {name} listening on {host}:{port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="app")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
