"""What each command loads (issue 13): ``serve`` never imports aiohttp; ``drain`` (every exec
preStop hook) and ``check`` import neither aiohttp nor the data path nor asyncio (nor, for
``drain``, ssl). Seen from real processes
run with ``python -X importtime``, which reports every import as it happens, including the lazy
ones at run time (the first /metrics scrape, the app stop)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tomllib

from tests.conftest import StartProxy
from tests.proxy_support import AppRequest, RawApp, RawClient, response_bytes
from tests.support import REPO

IMPORTTIME = (sys.executable, "-X", "importtime", "-m", "drainproxy")
DATA_PATH = (
    "drainproxy.dataplane.proxy",
    "drainproxy.dataplane.upstream",
    "drainproxy.control.server",
    "httptools",
    "uvloop",
)


def imported(output: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {
        line.rpartition("|")[2].strip()
        for line in output.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def loaded(modules: set[str], *packages: str) -> list[str]:
    return sorted(
        name
        for name in modules
        for package in packages
        if name == package or name.startswith(package + ".")
    )


async def run_command(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *IMPORTTIME,
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_serve_and_drain_load_only_what_they_need(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    """serve with every lazy path taken: an HTTP app check, a proxied request, a scrape, a
    /status, and after `drainproxy drain --wait` the http app stop; all on the small client."""

    @raw_app.route(b"/quitquitquit")
    async def quit_app(request: AppRequest, writer: asyncio.StreamWriter) -> bool:
        await request.read_body()
        writer.write(response_bytes(202, b"bye"))
        return True

    stop_url = f"http://127.0.0.1:{raw_app.port}/quitquitquit"
    proxy = await start_proxy(
        raw_app.port,
        {
            "upstream": {"check": {"kind": "http", "path": "/health"}},
            "app": {"stop": "http", "url": stop_url, "stop_timeout": "2s"},
            "drain": {"propagation": "0s", "timeout": "1s"},
        },
        launcher=IMPORTTIME,
    )
    client = await RawClient.connect(proxy.port)
    try:
        assert (await client.request(b"GET", b"/hello")).status == 200
    finally:
        await client.close()
    assert "drainproxy_requests_total" in await proxy.metrics_text()
    assert (await proxy.status())["phase"] == "serving"

    status, out, err = await run_command("drain", "--wait", "--config", str(proxy.config_path))
    assert (status, out.strip()) == (0, "app released"), err
    proxy.send(signal.SIGTERM)  # an admin drain stays drained until the SIGTERM
    assert await proxy.exited() == 0
    await raw_app.received(b"/quitquitquit")

    serve_modules = imported(proxy.log.text())
    # The run took the lazy paths this test is about (else the check below proves nothing).
    assert {
        "drainproxy.control.admin",
        "drainproxy.control.httpclient",
        "h11",
        "prometheus_client",
    } <= (serve_modules)
    assert loaded(serve_modules, "aiohttp") == []

    drain_modules = imported(err)
    assert "drainproxy.control.drainctl" in drain_modules
    assert loaded(drain_modules, "aiohttp", *DATA_PATH, "asyncio", "ssl") == []


def test_check_loads_neither_aiohttp_nor_the_data_path() -> None:
    done = subprocess.run(
        [
            *IMPORTTIME,
            "check",
            "--config",
            "config/k8s-classic.yaml",
            "--manifest",
            "k8s/classic-sidecar.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The run went through every rule: its one finding is the examples' placeholder token.
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.endswith(": 1 error(s), 0 warning(s)\n"), done.stdout
    assert " error DP002 admin-token-placeholder: " in done.stdout
    modules = imported(done.stderr)
    assert "drainproxy.kube.k8scheck" in modules
    assert loaded(modules, "aiohttp", *DATA_PATH, "asyncio") == []


def test_demo_without_aiohttp_says_which_extra_to_install() -> None:
    """aiohttp is in the demo and webhook extras, not a core dependency."""
    script = (
        "import sys; sys.modules['aiohttp'] = None\n"  # as if not installed
        "from drainproxy.cli import main; sys.exit(main(['demo']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "pip install 'drainproxy[demo]'" in done.stderr


def test_every_module_of_the_package_sits_in_a_layer() -> None:
    """`make lint`'s layers contract (pyproject [tool.importlinter]) only constrains the modules
    it names: a module added beside the layers would escape it."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in contracts["contracts"] if c["type"] == "layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    package = REPO / "drainproxy"
    children = {
        f"drainproxy.{path.stem}"
        for path in package.iterdir()
        if (path.suffix == ".py" and path.stem not in ("__init__", "__main__"))
        or (path / "__init__.py").is_file()
    }
    assert children == named
