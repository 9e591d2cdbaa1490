"""drainproxy's image in a real container runtime (podman with runc, as root): who it runs as,
``serve`` in a pod beside an app, the drain on ``podman kill --signal TERM``, and ``wrap`` as
PID 1. The image is built once per session (the ``drainproxy_image`` fixture)."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from drainproxy import __version__
from drainproxy.sim.kubelet import Container, terminate_pod
from drainproxy.sim.podman import PodmanRun, podman
from drainproxy.sim.pods import CONFIG_PATH, PodReplica
from drainproxy.sim.process import LogWatcher

pytestmark = [pytest.mark.container, pytest.mark.timeout(180)]


def run_image(image: str, *args: str, entrypoint: str | None = None) -> tuple[int, str]:
    """Run the image once in a throwaway container: its exit status and output."""
    options = ["--network", "none"]
    if entrypoint is not None:
        options += ["--entrypoint", entrypoint]
    process = PodmanRun(f"drainproxy-test-{secrets.token_hex(3)}", [*options, image, *args])
    output, _ = process.communicate(timeout=120)
    return process.returncode, output.decode()


def test_image_runs_as_uid_10001(drainproxy_image: str) -> None:
    user = podman("image", "inspect", "--format", "{{.Config.User}}", drainproxy_image)
    assert user.strip() == "10001:10001"  # numeric, so that runAsNonRoot can verify it
    assert run_image(drainproxy_image, "-u", entrypoint="id") == (0, "10001\n")
    assert run_image(drainproxy_image, "-g", entrypoint="id") == (0, "10001\n")


def test_image_says_its_version(drainproxy_image: str) -> None:
    assert run_image(drainproxy_image, "--version") == (0, f"drainproxy {__version__}\n")


async def get(port: int, path: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def test_serve_with_a_mounted_config_proxies_to_the_app_and_drains_on_sigterm(
    drainproxy_image: str, tmp_path: Path
) -> None:
    """A pod of the sample app and drainproxy (its config mounted); ``podman kill --signal
    TERM``, the kubelet's SIGTERM, gives the whole drain, a request in flight is answered and
    drainproxy exits 0 on its own."""
    drain = {"propagation": "1s", "timeout": "10s"}
    replica = PodReplica("serve", tmp_path, drain=drain, grace_period=20.0)
    try:
        replica.start()
        await replica.started()
        assert await get(replica.proxy_port, "/") == (200, "serve\n")
        assert (await get(replica.admin_port, "/ready"))[0] == 200
        status = json.loads((await get(replica.admin_port, "/status"))[1])
        assert status["phase"] == "serving", status

        in_flight = asyncio.create_task(get(replica.proxy_port, "/slow?seconds=2"))
        assert replica.proxy is not None and replica.proxy_log is not None
        log = replica.proxy_log
        await wait_in_flight(replica.admin_port)
        replica.proxy.terminate()  # podman kill --signal TERM
        for phase in (
            r"received SIGTERM",
            r"phase serving -> propagating",
            r"phase propagating -> draining",
            r"phase draining -> stopping_app",
            r"phase stopping_app -> stopped",
            r"exiting with status 0",
        ):
            await log.wait(phase)
        assert await in_flight == (200, "serve slow\n")
        assert await asyncio.to_thread(replica.proxy.wait, 30) == 0, log.text()
        assert replica.app is not None and replica.app.poll() is None  # the app is not ours
    finally:
        replica.stop()


async def wait_in_flight(admin_port: int) -> None:
    """Until drainproxy's /status counts a request in flight."""
    async with asyncio.timeout(30):
        while True:
            status = json.loads((await get(admin_port, "/status"))[1])
            if status.get("in_flight", 0) > 0:
                return
            await asyncio.sleep(0.05)


def test_wrap_as_pid_1_reaps_orphans_and_exits_with_the_childs_status(
    drainproxy_image: str, tmp_path: Path
) -> None:
    config = tmp_path / "wrap.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:8080",
                "upstream": "http://127.0.0.1:8000",
                "admin": {"listen": "127.0.0.1:9901"},
                "log": {"level": "debug"},
            }
        )
    )
    # The child leaves an orphan (the inner shell exits before its background sleep), which
    # the kernel hands to PID 1; then it waits for a line on stdin and exits 7.
    script = 'sh -c "sleep 0.2 & echo orphan \\$!"; read -r line; exit 7'
    name = f"drainproxy-wrap-{secrets.token_hex(3)}"
    process = PodmanRun(
        name,
        ["--interactive", "--network", "none", "--volume", f"{config}:{CONFIG_PATH}:ro",
         drainproxy_image, "wrap", "--config", CONFIG_PATH, "--", "sh", "-c", script],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    log = LogWatcher(process.stdout)
    try:
        orphan = log.wait_sync(r"^orphan (\d+)$").group(1)
        log.wait_sync(rf"reaped orphan pid {orphan} ")
        states = podman("exec", name, "sh", "-c", "cat /proc/[0-9]*/stat").splitlines()
        assert [line for line in states if line.split()[2] == "Z"] == [], states
        assert not [line for line in states if line.split()[0] == orphan], states
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.close()
        assert process.wait(30) == 7, log.text()
        log.wait_sync(r"the app \(pid \d+\) exited on its own with status 7")
        log.wait_sync(r"exiting with status 7")
    finally:
        process.kill()
        process.wait(30)
        log.join()
        assert process.stdout is not None
        process.stdout.close()


@pytest.mark.parametrize(
    ("options", "command", "started"),
    [
        # Ignores SIGTERM on purpose.
        (["--init"], ["sh", "-c", 'trap "" TERM; echo ignoring; while :; do sleep 1; done'],
         r"^ignoring$"),
        # A legacy app with no SIGTERM handler, as PID 1 of its container: the kernel delivers
        # a namespace's init only the signals it handles (docs/kubernetes.md).
        ([], ["python", "-m", "drainproxy.sim.sample_app", "--port", "8000"], r"listening on"),
    ],
    ids=["ignores-sigterm", "app-as-pid-1"],
)  # fmt: skip
async def test_the_kubelet_kills_a_container_that_outlives_the_grace_period(
    drainproxy_image: str, options: list[str], command: list[str], started: str
) -> None:
    """The kubelet simulation's SIGTERM and SIGKILL reach a container through ``podman kill``:
    one that does not exit on SIGTERM is killed at the grace period (exit status 137)."""
    stubborn = PodmanRun(
        f"drainproxy-stubborn-{secrets.token_hex(3)}",
        ["--network", "none", *options, "--entrypoint", json.dumps(command), drainproxy_image],
    )
    log = LogWatcher(stubborn.stdout)
    try:
        await log.wait(started)
        [outcome] = await terminate_pod([Container("stubborn", stubborn)], grace_period=1.0)
        assert outcome.sigterm_after is not None and outcome.killed, outcome
        assert outcome.returncode == 128 + signal.SIGKILL, outcome
    finally:
        stubborn.kill()
        stubborn.wait(30)
        log.join()
        assert stubborn.stdout is not None
        stubborn.stdout.close()
