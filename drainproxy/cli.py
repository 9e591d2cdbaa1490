"""Command line: ``main(argv) -> int``; errors become messages and exit codes here and only here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from drainproxy import __version__
from drainproxy.config import Config, load_config
from drainproxy.errors import ConfigError, DrainproxyError
from drainproxy.logs import setup_logging

log = logging.getLogger("drainproxy")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drainproxy", description="Graceful-shutdown reverse-proxy sidecar."
    )
    parser.add_argument("--version", action="version", version=f"drainproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    check = commands.add_parser("check", help="validate a config without serving")
    check.add_argument("--config", required=True, help="YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"drainproxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(f"{args.config}: ok")
        return 0
    return serve(config)


def serve(config: Config) -> int:
    setup_logging(config.log.format, config.log.level)
    loop_name = _install_uvloop()
    try:
        return asyncio.run(_serve(config, loop_name))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except DrainproxyError as exc:
        log.error("%s", exc)
        return 1


async def _serve(config: Config, loop_name: str) -> int:
    from drainproxy.server import Server

    return await Server(config, loop_name).run()


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not importable: using the default asyncio loop (slower)")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
