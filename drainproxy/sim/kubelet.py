"""The kubelet's pod termination sequence, reproduced for processes on this machine (a container
is one too: :class:`drainproxy.sim.podman.PodmanRun` signals it through ``podman kill``).

What the kubelet does on pod deletion (and what this module does, no more, no less):

1. Every regular container is handled in parallel and independently: run its preStop hook if it
   has one, then send it SIGTERM. A container without a hook gets SIGTERM at once.
2. httpGet hooks are GET requests that may carry headers and have no timeout of their own; exec
   hooks run a command. A failing hook is logged and the container still gets SIGTERM.
3. When ``terminationGracePeriodSeconds`` has passed since deletion began, whatever still runs
   gets SIGKILL, hook or no hook.
4. Native sidecars (restartable init containers): their preStop hooks run at deletion too, but
   their SIGTERM comes only once every regular container has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from drainproxy.system.processes import until_exited


@dataclass(frozen=True)
class HttpGetHook:
    port: int
    path: str
    host: str = "127.0.0.1"
    headers: dict[str, str] = field(default_factory=dict)

    async def run(self) -> str:
        # The kubelet applies no timeout of its own: only the grace period bounds a hook.
        timeout = aiohttp.ClientTimeout(total=None)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                f"http://{self.host}:{self.port}{self.path}", headers=self.headers
            ) as response,
        ):
            await response.read()
            return f"httpGet {self.path}: {response.status}"


@dataclass(frozen=True)
class ExecHook:
    command: Sequence[str]

    async def run(self) -> str:
        process = await asyncio.create_subprocess_exec(*self.command)
        return f"exec {self.command[0]}: exit {await process.wait()}"


Hook = HttpGetHook | ExecHook


@dataclass
class Container:
    name: str
    process: subprocess.Popen[bytes]
    pre_stop: Hook | None = None


@dataclass
class ContainerOutcome:
    name: str
    hook_result: str | None = None
    sigterm_after: float | None = None
    exited_after: float | None = None
    killed: bool = False
    returncode: int | None = None


async def wait_for_exit(process: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Await the process's exit as an event (a pidfd), without reaping anything but it."""
    if process.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process.wait()
        return True
    try:
        await asyncio.wait_for(until_exited(pidfd), timeout)
    except TimeoutError:
        return False
    finally:
        os.close(pidfd)
    process.wait()
    return True


class _Termination:
    def __init__(self, grace_period: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + grace_period

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def run_hook(self, container: Container, outcome: ContainerOutcome) -> None:
        if container.pre_stop is None:
            return
        try:
            outcome.hook_result = await asyncio.wait_for(container.pre_stop.run(), self.remaining())
        except TimeoutError:
            outcome.hook_result = "preStop still running at the grace period"
        except (aiohttp.ClientError, OSError) as exc:
            outcome.hook_result = f"preStop failed: {exc}"

    async def stop(self, container: Container, outcome: ContainerOutcome) -> None:
        """SIGTERM now; SIGKILL at the grace period."""
        if container.process.poll() is None:
            container.process.send_signal(signal.SIGTERM)
            outcome.sigterm_after = self.elapsed()
        if not await wait_for_exit(container.process, self.remaining()):
            container.process.kill()
            outcome.killed = True
            await wait_for_exit(container.process, None)
        outcome.exited_after = self.elapsed()
        outcome.returncode = container.process.returncode

    async def regular(self, container: Container) -> ContainerOutcome:
        outcome = ContainerOutcome(container.name)
        await self.run_hook(container, outcome)
        await self.stop(container, outcome)
        return outcome

    async def sidecar(self, container: Container, regulars_done: asyncio.Event) -> ContainerOutcome:
        outcome = ContainerOutcome(container.name)
        await self.run_hook(container, outcome)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(regulars_done.wait(), self.remaining())
        await self.stop(container, outcome)
        return outcome


async def terminate_pod(
    containers: Sequence[Container],
    grace_period: float,
    sidecars: Sequence[Container] = (),
) -> list[ContainerOutcome]:
    """Delete a pod: returns one outcome per container, regular ones first."""
    termination = _Termination(grace_period)
    regulars_done = asyncio.Event()

    async def regulars() -> list[ContainerOutcome]:
        outcomes = await asyncio.gather(*(termination.regular(c) for c in containers))
        regulars_done.set()
        return list(outcomes)

    regular_outcomes, sidecar_outcomes = await asyncio.gather(
        regulars(), asyncio.gather(*(termination.sidecar(c, regulars_done) for c in sidecars))
    )
    return regular_outcomes + list(sidecar_outcomes)
