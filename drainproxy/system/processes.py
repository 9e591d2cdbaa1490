"""Waiting on another process without polling (used by the app stop, the wrapper and the
kubelet simulation alike)."""

from __future__ import annotations

import asyncio


async def until_exited(pidfd: int) -> None:
    """Until the process behind ``pidfd`` exits: a pidfd becomes readable then (no polling)."""
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        await exited.wait()
    finally:
        loop.remove_reader(pidfd)
