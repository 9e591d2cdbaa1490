"""`drainproxy drain` and the native-sidecar wiring of k8s/native-sidecar.yaml, with real processes
terminated the way the kubelet does it (hooks at deletion, the sidecar's SIGTERM after the app)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from drainproxy.control.admin import TOKEN_HEADER
from drainproxy.sim.kubelet import Container, ExecHook, HttpGetHook, terminate_pod
from drainproxy.sim.replica import free_port
from tests.conftest import StartProxy
from tests.support import ProxyProcess, deep_merge

TOKEN = "t0ken"
FAST_DRAIN = {"drain": {"propagation": "1s", "timeout": "5s"}, "admin": {"token": TOKEN}}


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "drainproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode().strip(), err.decode().strip()


def admin_port(proxy: ProxyProcess) -> int:
    return int(proxy.admin_url.rsplit(":", 1)[1])


def drains_started(proxy: ProxyProcess) -> int:
    return sum("-> propagating" in line for line in proxy.log.lines)


async def test_drain_wait_returns_after_the_drain_and_drainproxy_stays_drained(
    app_process: tuple[int, subprocess.Popen[bytes]], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(app_process[0], FAST_DRAIN)
    code, out, err = await run_cli("drain", "--config", str(proxy.config_path), "--wait")
    assert (code, out, err) == (0, "app released", "")
    await proxy.log.wait(r"phase stopping_app -> drained")
    status = await proxy.status()
    assert status["phase"] == "drained"
    assert status["drain"]["sources"] == ["admin", "prestop"]


async def test_drain_reports_an_unreachable_drainproxy(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    port = free_port()
    config.write_text(f"upstream: http://127.0.0.1:8000\nadmin: {{listen: 127.0.0.1:{port}}}\n")
    code, _, err = await run_cli("drain", "--config", str(config))
    assert code == 1
    assert err.startswith(f"drainproxy: drain: POST http://127.0.0.1:{port}/drain failed:")


async def _delete_pod(
    proxy: ProxyProcess, app: subprocess.Popen[bytes], sidecar_hook: ExecHook | HttpGetHook
) -> dict[str, str | None]:
    app_hook = HttpGetHook(admin_port(proxy), "/prestop", headers={TOKEN_HEADER: TOKEN})
    outcomes = await terminate_pod(
        [Container("app", app, app_hook)],
        grace_period=30,
        sidecars=[Container("drainproxy", proxy.proc, sidecar_hook)],
    )
    assert not any(outcome.killed for outcome in outcomes)
    return {outcome.name: outcome.hook_result for outcome in outcomes}


async def test_native_sidecar_as_shipped_drains_once_and_exits_0(
    app_process: tuple[int, subprocess.Popen[bytes]], start_proxy: StartProxy
) -> None:
    # The two hooks start together; `drainproxy drain` must arrive before propagation ends (5s
    # as shipped). 1s is shorter than a Python start-up on a loaded machine, so 3s here.
    proxy = await start_proxy(
        app_process[0], deep_merge(FAST_DRAIN, {"drain": {"propagation": "3s"}})
    )
    drain = [sys.executable, "-m", "drainproxy", "drain", "--config", str(proxy.config_path)]
    hooks = await _delete_pod(proxy, app_process[1], ExecHook(drain))
    assert hooks == {"app": "httpGet /prestop: 200", "drainproxy": f"exec {sys.executable}: exit 0"}
    assert proxy.proc.returncode == 0
    await proxy.log.wait(r"phase drained -> stopped")
    assert drains_started(proxy) == 1


async def test_native_sidecar_with_a_prestop_get_hook_drains_twice(
    app_process: tuple[int, subprocess.Popen[bytes]], start_proxy: StartProxy
) -> None:
    """What check's DP503 warns about: both hooks are /prestop calls, so after releasing the app
    drainproxy recovers, and the SIGTERM that follows the app's exit starts a second drain."""
    proxy = await start_proxy(app_process[0], FAST_DRAIN)
    get_prestop = HttpGetHook(admin_port(proxy), "/prestop", headers={TOKEN_HEADER: TOKEN})
    await _delete_pod(proxy, app_process[1], get_prestop)
    await proxy.log.wait(r"phase \w+ -> stopped")
    assert "phase stopping_app -> recovering" in proxy.log.text()
    assert drains_started(proxy) == 2
