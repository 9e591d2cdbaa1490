"""What `drainproxy inject` writes, run for real: drainproxy with the injected config, the app as
its own process (SIGTERM kills it at once), and the pod deleted the way the kubelet does it with
the hooks exactly as the injected pod spec has them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from drainproxy.kube.inject import CONFIG_PATH, InjectOptions, inject_documents, parse_text
from drainproxy.sim.kubelet import Container, ExecHook, Hook, HttpGetHook, terminate_pod
from drainproxy.sim.replica import free_port
from tests.support import ProxyProcess
from tests.test_inject import drainproxy_container, template

Obj = dict[str, Any]


def manifest(
    app_port: int, listen: int, admin: int, style: str, propagation: str, app_hook: str
) -> str:
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
  annotations:
    drainproxy.io/style: {style}
    drainproxy.io/listen-port: "{listen}"
    drainproxy.io/admin-port: "{admin}"
    drainproxy.io/propagation: {propagation}
    drainproxy.io/drain-timeout: 5s
spec:
  selector: {{matchLabels: {{app: shop}}}}
  template:
    metadata: {{labels: {{app: shop}}}}
    spec:
      containers:
        - name: app
          image: registry.example.com/shop:1
          ports: [{{name: http, containerPort: {app_port}}}]
{app_hook}
"""


def hook_of(handler: Obj, config_path: Path) -> Hook:
    """A pod spec's hook as the kubelet runs it; drainproxy's own commands run from here."""
    if "httpGet" in handler:
        get = handler["httpGet"]
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        return HttpGetHook(int(get["port"]), get["path"], headers=headers)
    command = list(handler["exec"]["command"])
    if command[:1] == ["drainproxy"]:
        assert command[-1] == CONFIG_PATH
        command = [sys.executable, "-m", *command[:-1], str(config_path)]
    return ExecHook(command)


@pytest.mark.parametrize(
    ("style", "existing_hook", "propagation"),
    [("classic", False, "1s"), ("classic", True, "1s"), ("native", False, "5s")],
    ids=["classic, httpGet hook", "classic, the app's own exec hook", "native, httpGet hook"],
)
async def test_the_injected_pod_drains_once_then_releases_the_app_and_exits_0(
    style: str,
    existing_hook: bool,
    propagation: str,
    app_process: tuple[int, subprocess.Popen[bytes]],
    tmp_path: Path,
    proxies: list[ProxyProcess],
) -> None:
    """A native sidecar's drain starts from its own exec hook (`drainproxy drain`), which races
    the app's /prestop: a drain started by /prestop alone ends in recovery, and a late
    `drainproxy drain` then starts a second one. The default propagation (5s) leaves the exec
    time to start; the classic style has no such race (the kubelet signals drainproxy)."""
    port, app = app_process
    marker = tmp_path / "app-hook-ran"
    app_hook = (
        "          lifecycle:\n            preStop:\n              exec:\n"
        f"                command: [sh, -c, 'echo stopped > {marker}']\n"
        if existing_hook
        else ""
    )
    text = manifest(port, free_port(), free_port(), style, propagation, app_hook)
    docs, _ = parse_text(text, "shop.yaml")
    inject_documents(docs, InjectOptions())
    config_map, deployment = docs[0].before[0], docs[0].body
    spec = template(deployment)["spec"]
    config = yaml.safe_load(config_map["data"]["drainproxy.yaml"])
    proxy = ProxyProcess(config, tmp_path)
    proxies.append(proxy)
    await proxy.started()
    await proxy.ready()

    proxy_container = drainproxy_container(spec)
    app_container = spec["containers"][0]
    app_hook_run = hook_of(app_container["lifecycle"]["preStop"], proxy.config_path)
    own = proxy_container.get("lifecycle", {}).get("preStop")
    drainproxy = Container("drainproxy", proxy.proc, own and hook_of(own, proxy.config_path))
    outcomes = await terminate_pod(
        [Container("app", app, app_hook_run)] + ([drainproxy] if style == "classic" else []),
        grace_period=spec["terminationGracePeriodSeconds"],
        sidecars=[drainproxy] if style == "native" else [],
    )

    results = {outcome.name: outcome for outcome in outcomes}
    assert not any(outcome.killed for outcome in outcomes)
    assert results["drainproxy"].returncode == 0
    if existing_hook:
        assert results["app"].hook_result == "exec sh: exit 0"
        assert marker.read_text() == "stopped\n"
    else:
        assert results["app"].hook_result == "httpGet /prestop: 200"
    log = proxy.log.text()
    assert log.count("-> propagating") == 1
    assert "-> stopping_app" in log
