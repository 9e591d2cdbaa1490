"""Replicas for the rollout test in the other two ways of stopping the app: wrapper mode (one
container, drainproxy its main process with the app as its child) and ``app.stop: signal`` (a
shared process namespace: drainproxy signals the app's process itself), as processes and as
podman pods (drainproxy.sim.pods)."""

from __future__ import annotations

from typing import Any

from drainproxy.sim.kubelet import Container
from drainproxy.sim.pods import PodReplica
from drainproxy.sim.replica import Replica
from tests.support import kill_wrapped_app


class WrappedReplica(Replica):
    """One container, ``drainproxy wrap -- sample_app``: the kubelet's SIGTERM goes to drainproxy
    alone (no preStop hook), which drains and then stops its child."""

    def start(self) -> None:
        command = [*self.drainproxy_command("wrap"), "--", *self.app_command()]
        self.proxy, self.proxy_log = self.launch("drainproxy", command)

    async def started(self, timeout: float = 30.0) -> None:
        assert self.proxy_log is not None
        await self.proxy_log.wait(r"sample app .* listening on", timeout)  # passed through
        await self.proxy_log.wait(r"app reachable", timeout)

    def containers(self) -> list[Container]:
        assert self.proxy is not None
        return [Container("app", self.proxy)]

    def stop(self) -> None:
        if self.proxy_log is not None:
            kill_wrapped_app(self.proxy_log.text(), "drainproxy.sim.sample_app")
        super().stop()


class SignalledReplica(Replica):
    """A pod with ``shareProcessNamespace: true``: the app container's preStop hook holds it as in
    the classic sidecar; after the drain drainproxy signals the app process, found by its
    command line (the port makes it unique among the replicas)."""

    def proxy_config(self) -> dict[str, Any]:
        pattern = rf"drainproxy\.sim\.sample_app --port {self.app_port} "
        app = {"stop": "signal", "process": pattern, "stop_timeout": "2s"}
        return {**super().proxy_config(), "app": app}


class WrappedPod(WrappedReplica, PodReplica):
    """A pod of one container, drainproxy's image running ``drainproxy wrap -- sample_app``."""

    # The container's end is the end of every process in it: no child can be left behind.
    stop = PodReplica.stop


class SignalledPod(SignalledReplica, PodReplica):
    """A pod whose containers share one PID namespace (``podman pod create --share ...,pid``)."""

    share_pid = True
