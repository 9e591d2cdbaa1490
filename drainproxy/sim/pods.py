"""Pods of real containers: a podman pod per replica, as close to a Kubernetes pod as one
machine gets without a cluster.

A pod is one network namespace (and, with ``share_pid``, one PID namespace, as
``shareProcessNamespace: true``) held by its infra container; its containers join it. The ports
clients, the balancer and the kubelet's hooks use are published on the host's loopback, so every
one of them comes from outside the pod, as from the node in a cluster. Each container is a
:class:`drainproxy.sim.podman.PodmanRun`, a process for the kubelet simulation: its SIGTERM and
SIGKILL go through ``podman kill``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Sequence
from typing import Any, ClassVar

from drainproxy.sim.podman import IMAGE, PodmanRun, podman
from drainproxy.sim.process import LogWatcher
from drainproxy.sim.replica import Replica

#: Where drainproxy's image reads its config (the Dockerfile's CMD; the manifests mount there).
CONFIG_PATH = "/etc/drainproxy/drainproxy.yaml"


class Pod:
    """A podman pod named ``name`` (plus a random suffix, so that runs never collide)."""

    def __init__(self, name: str, published: Sequence[int], share_pid: bool = False) -> None:
        self.name = f"drainproxy-{name}-{secrets.token_hex(3)}"
        self.published = list(published)
        self.share_pid = share_pid
        self.created = False

    def create(self) -> None:
        args = ["pod", "create", "--name", self.name]
        for port in self.published:
            args += ["--publish", f"127.0.0.1:{port}:{port}"]
        if self.share_pid:
            args += ["--share", "ipc,net,uts,pid"]
        podman(*args)
        self.created = True

    def run(
        self, container: str, image: str, command: Sequence[str], options: Sequence[str] = ()
    ) -> tuple[PodmanRun, LogWatcher]:
        """Start ``command`` (entrypoint and arguments) in a new container of the pod."""
        process = PodmanRun(
            f"{self.name}-{container}",
            ["--pod", self.name, *options, "--entrypoint", json.dumps(list(command)), image],
        )
        return process, LogWatcher(process.stdout)

    def remove(self) -> None:
        podman("pod", "rm", "--force", "--time", "0", self.name, check=False)


class PodReplica(Replica):
    """A replica as a pod: the app container and drainproxy's image (classic sidecar), both
    from :data:`IMAGE`, which has Python and so runs the sample app too."""

    image: ClassVar[str] = IMAGE
    share_pid: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        published = [self.proxy_port, self.admin_port] if self.with_drainproxy else [self.app_port]
        self.pod = Pod(self.name, published, share_pid=self.share_pid)

    def proxy_config(self) -> dict[str, Any]:
        # The published ports reach the pod's own interface, not its loopback; the app is
        # reached on the loopback the pod's containers share.
        config = super().proxy_config()
        config["listen"] = f"0.0.0.0:{self.proxy_port}"
        config["admin"] = {**config["admin"], "listen": f"0.0.0.0:{self.admin_port}"}
        return config

    def app_command(self) -> list[str]:
        host = "127.0.0.1" if self.with_drainproxy else "0.0.0.0"
        module = "drainproxy.sim.sample_app"
        return ["python", "-m", module, "--port", str(self.app_port), "--name", self.name,
                "--host", host]  # fmt: skip

    def drainproxy_command(self, mode: str) -> list[str]:
        return ["drainproxy", mode, "--config", CONFIG_PATH]

    def launch(self, role: str, command: list[str]) -> tuple[subprocess.Popen[bytes], LogWatcher]:
        if role == "drainproxy":
            options = ["--volume", f"{self.write_config()}:{CONFIG_PATH}:ro"]
        elif self.share_pid:
            options = []
        else:
            # Its own PID namespace would make the app PID 1, which ignores SIGTERM unless it
            # handles it: a legacy app's image starts it under an init (tini, catatonit).
            options = ["--init"]
        if not self.pod.created:
            self.pod.create()
        return self.pod.run(role, self.image, command, options)

    async def started(self, timeout: float = 60.0) -> None:
        await super().started(timeout)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.pod.remove()
