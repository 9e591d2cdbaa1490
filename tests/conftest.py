from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from drainproxy.dataplane import http1
from drainproxy.sim.podman import IMAGE, PodmanError, ensure_image, unavailable_reason
from tests.proxy_support import RawApp, launch_proxy
from tests.support import REPO, ProxyProcess, base_config, deep_merge, free_port

StartProxy = Callable[..., Awaitable[ProxyProcess]]
StartApp = Callable[[web.Application], Awaitable[int]]


@pytest.fixture
async def start_app() -> AsyncIterator[StartApp]:
    """Serve an aiohttp app on a free loopback port in the test's loop; returns the port."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def app_process() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A legacy app as its own process: SIGTERM kills it at once."""
    port = free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "drainproxy.sim.sample_app", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    yield port, app
    app.kill()
    app.wait()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.stop()


@pytest.fixture
def start_proxy(tmp_path: Path, proxies: list[ProxyProcess]) -> StartProxy:
    """Start drainproxy in front of ``upstream_port``; ``overrides`` deep-merge into the config.
    Waits until the proxy has started and has seen the app reachable."""

    async def start(
        upstream_port: int,
        overrides: Mapping[str, Any] | None = None,
        wait_ready: bool = True,
        **kwargs: Any,
    ) -> ProxyProcess:
        config = deep_merge(base_config(upstream_port), overrides or {})
        proxy = ProxyProcess(config, tmp_path, **kwargs)
        proxies.append(proxy)
        await proxy.started()
        if wait_ready:
            await proxy.ready()
        return proxy

    return start


@pytest.fixture
def fresh_http1_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """``http1``'s memo tables as at start (field kinds) or empty (hosts, status lines,
    Keep-Alive timeouts), so a test sees what the code computes, not what an earlier test (or
    mutmut's stats run, in the same process) left behind."""
    monkeypatch.setattr(http1, "_field_kinds", dict(http1._USUAL_FIELD_KINDS))
    monkeypatch.setattr(http1, "_valid_hosts", set())
    monkeypatch.setattr(http1, "_status_lines", {})
    monkeypatch.setattr(http1, "_keep_alive_timeouts", {})


# --- one raw-socket app and one proxy for a whole data-path module (tests use their own paths) ---


@pytest.fixture(scope="module")
def proxy_overrides() -> Mapping[str, Any]:
    """Config the module-wide ``proxy`` runs with; a module overrides this fixture to change it."""
    return {}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[RawApp]:
    raw_app = RawApp()
    await raw_app.start()
    yield raw_app
    await raw_app.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def proxy(
    app: RawApp, proxy_overrides: Mapping[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ProxyProcess]:
    process = await launch_proxy(app.port, tmp_path_factory.mktemp("proxy"), proxy_overrides)
    yield process
    process.stop()


@pytest.fixture
async def raw_app() -> AsyncIterator[RawApp]:
    """A raw-socket app for one test (``app`` is the one a whole module shares)."""
    one_app = RawApp()
    await one_app.start()
    yield one_app
    await one_app.stop()


# --- drainproxy's image, for the tests marked `container` ---


@pytest.fixture(scope="session")
def drainproxy_image() -> str:
    """The image's name, built once per session unless already built from this tree (CI's
    `make image` builds it before the tests). Where podman cannot run the tests are skipped,
    except in CI, which must run them."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the container tests, but {reason}")
        pytest.skip(reason)
    try:
        ensure_image(REPO)
    except PodmanError as exc:
        pytest.fail(f"drainproxy's image cannot be built: {exc}")
    return IMAGE
