"""The shipped manifests (k8s/*.yaml) under ``podman kube play``, as far as podman 4 supports
them: it creates the Deployment's pods (every replica) and mounts the ConfigMap, and runs
``shareProcessNamespace``, ``securityContext`` (user, read-only root filesystem, capabilities)
and the container commands; it skips preStop hooks, readiness and startup probes, Services and
PodDisruptionBudgets, runs a livenessProbe only as a podman healthcheck (under systemd), and
refuses the native sidecar (an init container with a preStop hook and probes).

Every container starts, drainproxy reads the mounted config, /ready answers on the pod's own IP
(from outside the pod, as the kubelet's probe) and a request reaches the app through it. The
manifests are played as shipped but for two changes where podman differs from a cluster:

- the Deployment and ConfigMap get a unique name per run (podman keeps the ConfigMap as a named
  volume on the machine, and pod names come from the Deployment's);
- containerPorts are dropped: podman publishes each on every interface of the host, where
  Kubernetes publishes none (the pods are reached on their IPs instead).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from drainproxy.config.schema import load_config
from drainproxy.sim.podman import (
    BASE_LABEL,
    build_lock,
    environment,
    image_id,
    image_labels,
    podman,
    podman_command,
    remove_if_untagged,
)
from drainproxy.sim.process import LogWatcher
from tests.support import REPO

pytestmark = [pytest.mark.container, pytest.mark.timeout(180)]

#: The app images the manifests name (their ``image:`` of the app containers).
APP_IMAGES = (
    "registry.example.com/legacy-app:1.0",
    "registry.example.com/legacy-app-drainproxy:1.0",
)
#: The app's original entrypoint, as k8s/wrapper.yaml calls it; "legacy-app" in its command
#: line is what k8s/shared-process-namespace.yaml's app.process finds.
RUN_SH = """#!/bin/sh
exec python -m drainproxy.sim.sample_app --host 0.0.0.0 --port 8000 --name legacy-app
"""


@pytest.fixture(scope="module")
def app_images(drainproxy_image: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The legacy app the manifests expect, listening on 8000, as ``/app/run.sh``: drainproxy's
    image (it has Python, and drainproxy for the wrapper manifest) with the sample app as its
    entrypoint. Built once per drainproxy image."""
    base_id = image_id(drainproxy_image)
    with build_lock():
        if all((image_labels(i) or {}).get(BASE_LABEL) == base_id for i in APP_IMAGES):
            return
        previous = image_id(APP_IMAGES[0])
        context = tmp_path_factory.mktemp("legacy-app")
        (context / "run.sh").write_text(RUN_SH)
        (context / "Containerfile").write_text(
            f"FROM {drainproxy_image}\n"
            "COPY --chmod=755 run.sh /app/run.sh\n"
            'ENTRYPOINT ["/app/run.sh"]\n'
            "CMD []\n"
        )
        tags = [arg for image in APP_IMAGES for arg in ("--tag", image)]
        subprocess.run(
            ["buildah", "bud", "--isolation", "chroot", "--label", f"{BASE_LABEL}={base_id}",
             *tags, str(context)],
            env=environment(), check=True, capture_output=True,
        )  # fmt: skip
        remove_if_untagged(previous)


def playable(manifest: Path, name: str) -> tuple[str, str]:
    """The manifest with the two changes podman needs (see the module docstring), and the
    drainproxy config its ConfigMap holds."""
    documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap"]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    config_map["metadata"]["name"] = f"{name}-config"
    deployment["metadata"]["name"] = name
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["containers"]:
        container.pop("ports", None)
    for volume in pod["volumes"]:
        volume["configMap"]["name"] = f"{name}-config"
    return yaml.safe_dump_all(documents), config_map["data"]["drainproxy.yaml"]


def pod_ip(pod: str) -> str:
    infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod).strip()
    template = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    return podman("inspect", "--format", template, infra).strip()


@contextlib.contextmanager
def follow_logs(container: str) -> Iterator[LogWatcher]:
    process = subprocess.Popen(
        podman_command("logs", "--follow", container),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(),
    )  # fmt: skip
    watcher = LogWatcher(process.stdout)
    try:
        yield watcher
    finally:
        process.kill()
        process.wait()
        watcher.join()
        assert process.stdout is not None
        process.stdout.close()


def get(ip: str, port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


@pytest.mark.usefixtures("app_images")
@pytest.mark.parametrize(
    ("manifest", "drainproxy_container"),
    [
        ("classic-sidecar.yaml", "drainproxy"),
        ("shared-process-namespace.yaml", "drainproxy"),
        ("wrapper.yaml", "app"),
    ],
)
def test_manifest_plays_under_podman(
    manifest: str, drainproxy_container: str, tmp_path: Path
) -> None:
    name = f"drainproxy-kube-{secrets.token_hex(3)}"
    text, config_text = playable(REPO / "k8s" / manifest, name)
    played = tmp_path / manifest
    played.write_text(text)
    (tmp_path / "drainproxy.yaml").write_text(config_text)
    config = load_config(tmp_path / "drainproxy.yaml")
    (deployment,) = [d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment"]
    containers = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    try:
        podman("kube", "play", str(played))
        for index in range(deployment["spec"]["replicas"]):
            pod = f"{name}-pod-{index}"
            with follow_logs(f"{pod}-{drainproxy_container}") as log:
                start = log.wait_sync(r" loop: .*; config (\{.*\})$")
                log.wait_sync(r"app reachable")
            # The config drainproxy runs with is the ConfigMap's, not the image's default.
            effective = json.loads(start.group(1))
            assert effective["listen"] == str(config.listen)
            assert effective["admin"]["listen"] == str(config.admin.listen)
            assert (effective["admin"]["token"] is None) == (config.admin.token is None)
            assert effective["drain"]["timeout"] == config.drain.timeout  # 15s, not 20s
            assert effective["app"]["stop"] == config.app.stop
            assert effective["app"]["stop_timeout"] == config.app.stop_timeout  # 5s, not 3s
            for container in containers:
                state = podman("inspect", "--format", "{{.State.Status}}", f"{pod}-{container}")
                assert state.strip() == "running", container
            ip = pod_ip(pod)
            assert get(ip, config.admin.listen.port, "/ready")[0] == 200
            assert get(ip, config.listen.port, "/") == (200, "legacy-app\n")
    finally:
        podman("kube", "down", str(played), check=False)
        podman("volume", "rm", "--force", f"{name}-config", check=False)
