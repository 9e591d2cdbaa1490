"""``drainproxy inject``: add the drainproxy sidecar to the workloads of Kubernetes manifests.

Adding drainproxy by hand takes six coordinated edits per workload (issue 15): the config, the
container, its volume, the app's preStop hook, the Service's targetPort and the grace period.
This module makes them together, as pure functions over parsed manifests:

1. ``inject_pod`` turns one pod template into the same pod with drainproxy (shared with the
   admission webhook, which only diffs the result into a JSONPatch);
2. ``inject_documents`` does it for every Pod, Deployment, StatefulSet, DaemonSet and ReplicaSet
   of a document stream, puts each config in a ConfigMap before its workload, and points the
   Services in the stream at drainproxy;
3. ``read_sources`` and ``render`` read and write files, ``-``, directories, YAML and JSON.

Jobs and CronJobs, and pods that run to completion (``restartPolicy`` Never or OnFailure), are
left alone: they never drain, and a classic sidecar would keep them from ever completing.
A pod that already runs drainproxy is left as it is, which makes injecting idempotent.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from drainproxy import __version__
from drainproxy.config.schema import GRACE_MARGIN, config_from_mapping, parse_duration
from drainproxy.errors import ConfigError, DrainproxyError
from drainproxy.kube.manifests import (
    DEFAULT_GRACE_SECONDS,
    IMAGE_USER,
    OBJECT,
    OBJECT_FIELDS,
    POD_METADATA,
    POD_SPEC,
    TOKEN_HEADER,
    UNPROXIED_PORTS_ANNOTATION,
    dict_items,
    dig,
    drainproxy_launch,
    type_errors,
)

ANNOTATION_PREFIX = "drainproxy.io/"
#: ``"false"`` leaves a workload (or, for the webhook, a pod) without drainproxy.
INJECT_ANNOTATION = ANNOTATION_PREFIX + "inject"
#: The app's port (a number, or the name of a port of the app container). inject writes the
#: number back, so a second run fronts the same port.
PORT_ANNOTATION = ANNOTATION_PREFIX + "port"
#: Where the webhook puts the config; a downwardAPI volume turns it into the config file.
CONFIG_ANNOTATION = ANNOTATION_PREFIX + "config"

DEFAULT_IMAGE = f"registry.example.com/drainproxy:{__version__}"
CONTAINER_NAME = "drainproxy"
CONFIG_VOLUME = "drainproxy-config"
CONFIG_DIR = "/etc/drainproxy"
CONFIG_FILE = "drainproxy.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
FIRST_LISTEN_PORT = 8080
FIRST_ADMIN_PORT = 9901

SidecarStyle = Literal["native", "classic"]
HookStyle = Literal["http", "exec"]
ConfigSource = Literal["configmap", "annotation"]

#: Kinds whose pods are injected, and where each keeps its pod template.
WORKLOAD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
}

# Ports drainproxy cannot serve: TLS it holds no certificate for, and protocols other than
# HTTP/1.x. Port names follow the IANA/Kubernetes habit of naming the protocol.
_TLS_NAME = re.compile(r"https|tls|ssl")
_NON_HTTP_NAME = re.compile(
    r"^(grpc|h2c?|tcp|udp|sctp|mysql|postgres|pg|redis|memcache|mongo|amqp|mqtt|kafka|ldap|smtp|"
    r"imap|pop3|dns|jmx|rmi|ajp|debug|jdwp|profil|syslog|fluent|statsd|agent|log)"
)
_HTTP_APP_PROTOCOLS = frozenset({"http", "kubernetes.io/http", "http1", "http/1.1"})
_TLS_PORTS = frozenset({443, 8443})
#: libyaml's loader when PyYAML was built with it: the webhook parses a config per pod.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class InjectError(DrainproxyError):
    """A manifest that cannot be read, or a workload drainproxy cannot be added to. The message
    names the file (and the workload) and what to change."""


@dataclass(frozen=True)
class InjectOptions:
    """Defaults for every workload; each can be overridden by a ``drainproxy.io/`` annotation."""

    image: str = DEFAULT_IMAGE
    #: classic: a second regular container; at deletion the kubelet signals it at once, which
    #: starts the drain (any Kubernetes version). native: an init container with
    #: ``restartPolicy: Always`` (1.29+) that starts before the app; its drain starts from its
    #: own exec preStop (``drainproxy drain``), which must reach it before a drain started by
    #: the app's hook alone has ended (see docs/kubernetes.md).
    style: SidecarStyle = "classic"
    #: http: the app's preStop is an httpGet of /prestop with the admin token (any image).
    #: exec: a shell hook calls /prestop over loopback with curl, wget or bash: no token at all.
    hook: HookStyle = "http"
    propagation: str = "5s"
    #: Also written as upstream.response_timeout: the slowest answer the app may give is what
    #: a drain waits for. 60s is drainproxy's default response timeout, so by default no
    #: request that worked before is cut, by a drain or otherwise.
    drain_timeout: str = "60s"
    stop_timeout: str = "5s"
    #: Makes the admin token of a workload from its ``namespace/Kind/name``: random by
    #: default, ``keyed_tokens`` for the same token on every run; tests pass a fixed one.
    new_token: Callable[[str], str] = field(default=lambda scope: secrets.token_hex(16))


def keyed_tokens(key: str) -> Callable[[str], str]:
    """Tokens that are the same on every run for the same workload, and unguessable without
    ``key``: HMAC-SHA256 of ``namespace/Kind/name``. A pipeline that injects at every deploy
    then changes no pod template (which would restart every pod) unless the workload changed."""

    def token(scope: str) -> str:
        return hmac.new(key.encode(), scope.encode(), hashlib.sha256).hexdigest()[:32]

    return token


@dataclass(frozen=True)
class InjectedPod:
    """A pod template with drainproxy, and what the caller needs to finish the job."""

    metadata: dict[str, Any]
    spec: dict[str, Any]
    config_text: str
    #: The app's port, which drainproxy now fronts.
    app_port: int
    #: The name of drainproxy's listen port, for Services that must be pointed at it.
    listen_name: str
    #: Services that target the app's port by name now reach drainproxy (it took the name, or
    #: the port had none).
    named_services_follow: bool

    def bypass_warning(self, where: str) -> str:
        """What to tell about Services inject cannot see: those that target the app's port by
        number (or by a name drainproxy could not take over) still reach the app directly."""
        how = "by number" if self.named_services_follow else "by number or by name"
        return (
            f"{where}: a Service that targets port {self.app_port} {how} bypasses "
            f"drainproxy; set its targetPort to {self.listen_name}"
        )


# ---------------------------------------------------------------------------------------------
# Small helpers over parsed YAML


def _containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return dict_items(spec.get("containers")) + dict_items(spec.get("initContainers"))


def _declared(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [port for c in _containers(spec) for port in dict_items(c.get("ports"))]


def _int_port(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def find_service_port(spec: Mapping[str, Any], service_port: Mapping[str, Any]) -> int | None:
    """The pod port a Service port sends to, by Kubernetes' rules (``FindPort`` in
    pkg/api/v1/pod): a number as is (``port`` when ``targetPort`` is absent); a name looked up
    in the regular containers first, then in native sidecars, with the same protocol."""
    target = service_port.get("targetPort", service_port.get("port"))
    number = _int_port(target)
    if number is not None:
        return number
    protocol = service_port.get("protocol", "TCP")
    sidecars = [
        c for c in dict_items(spec.get("initContainers")) if c.get("restartPolicy") == "Always"
    ]
    for container in dict_items(spec.get("containers")) + sidecars:
        for port in dict_items(container.get("ports")):
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                return _int_port(port.get("containerPort"))
    return None


def runs_drainproxy(spec: Mapping[str, Any]) -> bool:
    """True when a container of the pod already is drainproxy (so injecting changes nothing)."""
    return any(
        c.get("name") == CONTAINER_NAME or drainproxy_launch(c) is not None
        for c in _containers(spec)
    )


def runs_to_completion(spec: Mapping[str, Any]) -> bool:
    return bool(spec.get("restartPolicy", "Always") != "Always")


# ---------------------------------------------------------------------------------------------
# Choosing ports


def _servable(port: Mapping[str, Any]) -> bool:
    """Whether drainproxy can front this port: plain HTTP/1.x over TCP, judged from its
    protocol, appProtocol and name (the only hints a pod spec carries)."""
    if port.get("protocol", "TCP") != "TCP":
        return False
    name = str(port.get("name", "")).lower()
    app_protocol = str(port.get("appProtocol", "")).lower()
    if app_protocol:
        return app_protocol in _HTTP_APP_PROTOCOLS
    if _TLS_NAME.search(name) or _NON_HTTP_NAME.match(name):
        return False
    return not (port.get("containerPort") in _TLS_PORTS and not name.startswith("http"))


def _preference(port: Mapping[str, Any]) -> int:
    name = str(port.get("name", "")).lower()
    if name in ("http", "web") or name.startswith("http-"):
        return 0
    return 2 if "metric" in name or "admin" in name or "health" in name else 1


def _choose_app_port(
    where: str,
    app: Mapping[str, Any],
    requested: str | None,
    service_targets: Iterable[int],
) -> int:
    ports = dict_items(app.get("ports"))
    if requested is not None:
        number = _int_port(requested)
        if number is None:
            number = next(
                (_int_port(p.get("containerPort")) for p in ports if p.get("name") == requested),
                None,
            )
        if number is None or not 0 < number < 65536:
            raise InjectError(
                f"{where}: annotation {PORT_ANNOTATION}: {requested!r} is neither a port number "
                f"nor the name of a port of container {app.get('name')}"
            )
        return number
    candidates = sorted((p for p in ports if _servable(p)), key=_preference)
    if candidates and _int_port(candidates[0].get("containerPort")) is not None:
        return int(candidates[0]["containerPort"])
    targets = sorted(set(service_targets))
    if not ports and len(targets) == 1:
        return targets[0]
    if ports:
        shown = ", ".join(f"{p.get('name') or '-'} {p.get('containerPort')}" for p in ports)
        why = (
            f"none of its ports ({shown}) looks like plain HTTP/1.x, and drainproxy cannot "
            "front TLS without the certificate nor other protocols"
        )
        fix = (
            f'set the annotation {PORT_ANNOTATION}: "<port>" if one is plain HTTP, else '
            f'{INJECT_ANNOTATION}: "false"'
        )
    else:
        why = "it declares no ports and no single Service port points at it"
        fix = f'set the annotation {PORT_ANNOTATION}: "<port>"'
    raise InjectError(
        f"{where}: cannot tell which port of container {app.get('name')} serves HTTP: {why}; " + fix
    )


def _free_port(first: int, taken: set[int]) -> int:
    port = first
    while port in taken:
        port += 1
    taken.add(port)
    return port


def _free_name(candidates: Iterable[str], taken: set[str]) -> str:
    for candidate in candidates:
        name = candidate[:15].rstrip("-")
        if _PORT_NAME.match(name) and "--" not in name and name not in taken:
            taken.add(name)
            return name
    for number in range(2, 100):
        name = f"drainproxy-{number}"
        if name not in taken:
            taken.add(name)
            return name
    raise AssertionError("a pod with a hundred port names")  # pragma: no cover


def _annotation_port(where: str, annotations: Mapping[str, str], key: str) -> int | None:
    value = annotations.get(ANNOTATION_PREFIX + key)
    if value is None:
        return None
    number = _int_port(value)
    if number is None or not 0 < number < 65536:
        raise InjectError(f"{where}: annotation {ANNOTATION_PREFIX}{key}: {value!r} is not a port")
    return number


# ---------------------------------------------------------------------------------------------
# Hooks and probes


def _wait_script(admin_port: int) -> str:
    """A POSIX shell script that waits on /prestop over loopback (no token needed there) with
    whatever client the app's image has, then runs the hook's original command (``"$@"``).
    One command per line, so manifests show it as a readable block."""
    url = f"http://127.0.0.1:{admin_port}/prestop"
    request = 'printf "GET /prestop HTTP/1.0\\r\\n\\r\\n" >&3'
    lines = [
        "# drainproxy: wait until the drain is over, then run the app's own preStop, if any",
        "if command -v curl >/dev/null 2>&1; then",
        f"  curl -fsS -o /dev/null {url}",
        "elif command -v wget >/dev/null 2>&1; then",
        f"  wget -q -O /dev/null {url}",
        "elif command -v bash >/dev/null 2>&1; then",
        f"  bash -c 'exec 3<>/dev/tcp/127.0.0.1/{admin_port} && {request} && cat <&3 >/dev/null'",
        "else",
        '  echo "drainproxy: no curl, wget or bash in this image to wait for the drain" >&2',
        "fi",
        'exec "$@"',
    ]
    return "\n".join(lines) + "\n"


def _original_hook_argv(where: str, hook: Mapping[str, Any], app: Mapping[str, Any]) -> list[str]:
    """The app's existing preStop as an argv to run after the drain. An httpGet hook's port
    may name a port of the ``app`` container (the kubelet resolves it there): a URL needs
    its number."""
    if "exec" in hook:
        return [str(word) for word in dig(hook, "exec", "command") or []]
    if "sleep" in hook:
        return ["sleep", str(dig(hook, "sleep", "seconds") or 0)]
    if "httpGet" in hook:
        http = hook["httpGet"] if isinstance(hook["httpGet"], dict) else {}
        scheme = str(http.get("scheme", "HTTP")).lower()
        port = http.get("port")
        if _int_port(port) is None:
            named = {p.get("name"): p.get("containerPort") for p in dict_items(app.get("ports"))}
            if _int_port(named.get(port)) is None:
                raise InjectError(
                    f"{where}: the app's preStop httpGet names port {port!r}, which the app "
                    "container does not declare"
                )
            port = named[port]
        url = f"{scheme}://{http.get('host') or '127.0.0.1'}:{port}"
        url += str(http.get("path") or "/")
        return ["sh", "-c", f'curl -fsS -k -o /dev/null "{url}" || wget -q -O /dev/null "{url}"']
    if "tcpSocket" in hook:
        return []  # the kubelet never ran tcpSocket hooks: nothing to keep
    raise InjectError(f"{where}: the app's preStop hook has no handler inject understands")


def _app_prestop(
    where: str,
    app: Mapping[str, Any],
    kept: Mapping[str, Any] | None,
    admin_port: int,
    token: str | None,
) -> dict[str, Any]:
    """The app's new preStop: an httpGet of /prestop carrying ``token``, or (no token) the
    shell script, followed by the ``kept`` hook if there is one."""
    if token is None:
        original = _original_hook_argv(where, kept, app) if kept is not None else []
        script = _wait_script(admin_port)
        return {"exec": {"command": ["sh", "-c", script, "drainproxy-prestop", *original]}}
    return {
        "httpGet": {
            "path": "/prestop",
            "port": admin_port,
            "httpHeaders": [{"name": TOKEN_HEADER, "value": token}],
        }
    }


def _rename_port_refs(container: dict[str, Any], old: str, new: str) -> None:
    """Probes and hooks resolve port names in their own container's ports, so references to a
    renamed port follow it."""
    handlers = [container.get(p) for p in ("readinessProbe", "livenessProbe", "startupProbe")]
    handlers += [dig(container, "lifecycle", h) for h in ("postStart", "preStop")]
    for handler in handlers:
        for kind in ("httpGet", "tcpSocket", "grpc"):
            action = dig(handler, kind)
            if isinstance(action, dict) and action.get("port") == old:
                action["port"] = new


def _folded_app_check(app: Mapping[str, Any], app_port: int) -> dict[str, Any] | None:
    """The app's own httpGet readinessProbe on the fronted port, as drainproxy's app check, so
    /ready fails whenever the app's check does."""
    probe = app.get("readinessProbe")
    http = dig(probe, "httpGet")
    if not isinstance(http, dict) or str(http.get("scheme", "HTTP")).upper() != "HTTP":
        return None
    port = _int_port(http.get("port"))
    if port is None:
        port = next(
            (
                _int_port(p.get("containerPort"))
                for p in dict_items(app.get("ports"))
                if p.get("name") == http.get("port")
            ),
            None,
        )
    if port != app_port:
        return None
    return {"kind": "http", "path": str(http.get("path") or "/")}


def _sidecar(
    image: str, style: SidecarStyle, listen: tuple[str, int], admin: tuple[str, int]
) -> dict[str, Any]:
    """drainproxy's container, in the shapes of k8s/native-sidecar.yaml and classic-sidecar.yaml.
    It names its user: a pod that runs as root (``runAsUser: 0``) would otherwise run it as
    root, and ``runAsNonRoot`` alone would stop it from starting."""
    admin_port = admin[1]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": ["drainproxy"],
        "args": ["serve", "--config", CONFIG_PATH],
        "ports": [
            {"name": listen[0], "containerPort": listen[1]},
            {"name": admin[0], "containerPort": admin_port},
        ],
    }
    if style == "native":
        container["restartPolicy"] = "Always"
        container["lifecycle"] = {
            "preStop": {"exec": {"command": ["drainproxy", "drain", "--config", CONFIG_PATH]}}
        }
        container["startupProbe"] = {
            "httpGet": {"path": "/live", "port": admin_port},
            "periodSeconds": 1,
            "failureThreshold": 30,
        }
    container["readinessProbe"] = {
        "httpGet": {"path": "/ready", "port": admin_port},
        "periodSeconds": 1,
        "failureThreshold": 2,
        "timeoutSeconds": 1,
    }
    container["livenessProbe"] = {
        "httpGet": {"path": "/live", "port": admin_port},
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    container["volumeMounts"] = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}]
    container["securityContext"] = {
        "runAsUser": IMAGE_USER,
        "runAsGroup": IMAGE_USER,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container["resources"] = {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"},
    }
    return container


# ---------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class _Timings:
    propagation: str
    drain_timeout: str
    stop_timeout: str

    def budget(self) -> float:
        seconds = (parse_duration("", value) for value in vars(self).values())
        return sum(seconds) + GRACE_MARGIN


def _timings(where: str, annotations: Mapping[str, str], options: InjectOptions) -> _Timings:
    values = {}
    for key, default in (
        ("propagation", options.propagation),
        ("drain-timeout", options.drain_timeout),
        ("stop-timeout", options.stop_timeout),
    ):
        value = annotations.get(ANNOTATION_PREFIX + key, default)
        try:
            parse_duration(key, value)
        except ConfigError as exc:
            raise InjectError(f"{where}: annotation {ANNOTATION_PREFIX}{key}: {exc.rule}") from None
        values[key.replace("-", "_")] = value
    return _Timings(**values)


def _config_text(
    what: str,
    listen_port: int,
    admin_port: int,
    app_port: int,
    token: str | None,
    timings: _Timings,
    grace: int,
    app_check: dict[str, Any] | None,
) -> str:
    lines = [
        f"# drainproxy config written by `drainproxy inject` for {what}.",
        "# The Service's targetPort is drainproxy's listen port; the app keeps its own.",
        f"listen: 0.0.0.0:{listen_port}",
        "upstream:",
        f"  url: http://127.0.0.1:{app_port}",
        f"  response_timeout: {timings.drain_timeout}  # = drain.timeout: no answer is cut",
    ]
    if app_check is not None:
        lines += [
            "  check:  # the app's own readinessProbe, folded in",
            "    kind: http",
            f"    path: {json.dumps(app_check['path'])}",
        ]
    lines += ["admin:", f"  listen: 0.0.0.0:{admin_port}"]
    if token is not None:
        lines.append(f"  token: {token}  # the app's preStop httpGet sends it (from the node)")
    lines += [
        "drain:",
        f"  propagation: {timings.propagation}",
        f"  timeout: {timings.drain_timeout}",
        "app:",
        "  stop: prestop  # release the app's preStop hook; then the kubelet sends it SIGTERM",
        f"  stop_timeout: {timings.stop_timeout}",
        "# = terminationGracePeriodSeconds",
        f"termination_grace_period: {grace}s",
    ]
    text = "\n".join(lines) + "\n"
    config_from_mapping(yaml.load(text, Loader=_Loader))  # what inject writes must load
    return text


# ---------------------------------------------------------------------------------------------
# One pod


def _style(
    where: str, annotations: Mapping[str, str], key: str, default: str, *allowed: str
) -> Any:
    value = annotations.get(ANNOTATION_PREFIX + key, default)
    if value not in allowed:
        raise InjectError(
            f"{where}: annotation {ANNOTATION_PREFIX}{key}: {value!r} is not one of "
            + ", ".join(allowed)
        )
    return value


def _app_container(where: str, spec: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    containers = dict_items(spec.get("containers"))
    if name is not None:
        found = next((c for c in containers if c.get("name") == name), None)
        if found is None:
            raise InjectError(
                f"{where}: annotation {ANNOTATION_PREFIX}container: no container named {name!r}"
            )
        return found
    if not containers:
        raise InjectError(f"{where}: the pod has no containers")
    return containers[0]


def inject_pod(
    where: str,
    what: str,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    options: InjectOptions,
    *,
    annotations: Mapping[str, str] | None = None,
    service_targets: Iterable[int] = (),
    config_source: ConfigSource = "configmap",
    config_map: str = "drainproxy",
    token_scope: str = "",
) -> InjectedPod | None:
    """The pod (its template's ``metadata`` and ``spec``) with drainproxy in front of its app,
    or None when it must stay as it is: annotated ``drainproxy.io/inject: "false"``, running to
    completion, or running drainproxy already. The inputs are not changed.

    ``where`` prefixes error messages; ``what`` (``Deployment/web``) is named in the config.
    ``annotations`` are the workload's (the pod's own override them); ``service_targets`` the
    numeric target ports of Services selecting it (how the app port of a container that
    declares none is found). ``config_source`` says how the config reaches the pod: a ConfigMap
    named ``config_map`` (inject) or the pod annotation ``drainproxy.io/config`` through a
    downwardAPI volume (the webhook, which can change the Pod only).

    Raises InjectError naming ``where`` and the fix when the pod cannot be injected.
    """
    problems = [
        *type_errors(metadata, POD_METADATA, "metadata"),
        *type_errors(spec, POD_SPEC, "spec"),
    ]
    if problems:
        raise InjectError(f"{where}: " + "; ".join(problems))
    own = dig(metadata, "annotations")
    merged = {**(annotations or {}), **(own if isinstance(own, dict) else {})}
    merged = {str(k): str(v) for k, v in merged.items()}
    if merged.get(INJECT_ANNOTATION, "true").lower() == "false":
        return None
    if runs_drainproxy(spec) or runs_to_completion(spec):
        return None
    if dig(spec, "os", "name") == "windows":
        raise InjectError(
            f"{where}: a Windows pod cannot run drainproxy's Linux image; annotate it "
            f'{INJECT_ANNOTATION}: "false"'
        )
    pod_spec: dict[str, Any] = copy.deepcopy(dict(spec))
    pod_metadata: dict[str, Any] = copy.deepcopy(dict(metadata))
    style: SidecarStyle = _style(where, merged, "style", options.style, "classic", "native")
    hook_style: HookStyle = _style(where, merged, "prestop", options.hook, "http", "exec")
    image = merged.get(ANNOTATION_PREFIX + "image", options.image)
    app = _app_container(where, pod_spec, merged.get(ANNOTATION_PREFIX + "container"))
    original_grace = pod_spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if not isinstance(original_grace, int) or isinstance(original_grace, bool):
        original_grace = DEFAULT_GRACE_SECONDS
    # The app's own preStop runs after the drain, in the shell hook; only a workload annotated
    # prestop: http (an image without a shell) has it replaced by the httpGet hook.
    own_hook = dig(app, "lifecycle", "preStop")
    explicit_http = merged.get(ANNOTATION_PREFIX + "prestop") == "http"
    kept = own_hook if isinstance(own_hook, dict) and not explicit_http else None
    # An app with a preStop of its own had the whole grace period for that hook and its exit;
    # it keeps it, after the drain.
    stop_timeout = f"{original_grace}s" if kept is not None else options.stop_timeout
    timings = _timings(where, merged, replace(options, stop_timeout=stop_timeout))
    app_port = _choose_app_port(where, app, merged.get(PORT_ANNOTATION), service_targets)

    declared = _declared(pod_spec)
    taken_ports = {n for p in declared if (n := _int_port(p.get("containerPort"))) is not None}
    taken_ports.add(app_port)
    chosen = [_annotation_port(where, merged, key) for key in ("listen-port", "admin-port")]
    if pod_spec.get("hostNetwork") is True and None in chosen:
        raise InjectError(
            f"{where}: a hostNetwork pod shares the node's ports, which inject cannot see; "
            f"choose drainproxy's with the annotations {ANNOTATION_PREFIX}listen-port and "
            f"{ANNOTATION_PREFIX}admin-port"
        )
    listen_port = chosen[0] or FIRST_LISTEN_PORT
    admin_port = chosen[1] or FIRST_ADMIN_PORT
    listen_port = _free_port(listen_port, taken_ports)
    admin_port = _free_port(admin_port, taken_ports)

    taken_names = {str(p["name"]) for p in declared if p.get("name")}
    listen_name, named_services_follow = _hand_over_port_name(app, app_port, declared, taken_names)
    admin_name = _free_name(["admin", "drainproxy-adm"], taken_names)

    needs_token = hook_style == "http" and kept is None
    token = options.new_token(token_scope or what) if needs_token else None
    prestop = _app_prestop(where, app, kept, admin_port, token)
    _mapping(app, "lifecycle")["preStop"] = prestop

    grace = max(original_grace, math.ceil(timings.budget()))
    pod_spec["terminationGracePeriodSeconds"] = grace
    try:
        config_text = _config_text(
            what,
            listen_port,
            admin_port,
            app_port,
            token,
            timings,
            grace,
            _folded_app_check(app, app_port),
        )
    except ConfigError as exc:
        raise InjectError(f"{where}: the timings do not make a valid config: {exc}") from None

    sidecar = _sidecar(image, style, (listen_name, listen_port), (admin_name, admin_port))
    if style == "native":
        _sequence(pod_spec, "initContainers").append(sidecar)
    else:
        _sequence(pod_spec, "containers").append(sidecar)
    _sequence(pod_spec, "volumes").append(_config_volume(config_source, config_map))

    marked = str(merged.get(UNPROXIED_PORTS_ANNOTATION, "")).split(",")
    unproxied = sorted(
        {word.strip() for word in marked if word.strip() and word.strip() != str(app_port)}
        | {str(n) for p in declared if (n := _int_port(p.get("containerPort"))) is not None}
        - {str(app_port)},
        key=lambda word: (not word.isdigit(), int(word) if word.isdigit() else 0, word),
    )
    new_annotations = _mapping(pod_metadata, "annotations")
    new_annotations[PORT_ANNOTATION] = str(app_port)
    if unproxied:
        new_annotations[UNPROXIED_PORTS_ANNOTATION] = ",".join(map(str, unproxied))
    if config_source == "annotation":
        new_annotations[CONFIG_ANNOTATION] = config_text
    return InjectedPod(
        pod_metadata, pod_spec, config_text, app_port, listen_name, named_services_follow
    )


def _hand_over_port_name(
    app: dict[str, Any], app_port: int, declared: list[dict[str, Any]], taken: set[str]
) -> tuple[str, bool]:
    """The name for drainproxy's listen port, and whether Services that target the app's port
    by name now reach drainproxy. drainproxy takes the app port's name, so such Services need
    no change; the app's port gets a new name and its own probes and hooks follow the rename.
    A name another container declares too is not taken: once the app gives it up, names
    resolve in the regular containers first, so Services would reach that other container."""
    app_entry = next(
        (p for p in dict_items(app.get("ports")) if p.get("containerPort") == app_port), None
    )
    if app_entry is None:
        # Declared, so the pod says which container owns the port drainproxy forwards to.
        _sequence(app, "ports").append({"containerPort": app_port})
    old_name = str(app_entry["name"]) if app_entry and app_entry.get("name") else None
    if old_name is None:
        return _free_name(["http", "drainproxy-http", "dp-http"], taken), True
    assert app_entry is not None
    unique = [p.get("name") for p in declared].count(old_name) == 1
    app_entry["name"] = _free_name([f"app-{old_name}", "app", "app-http"], taken)
    _rename_port_refs(app, old_name, app_entry["name"])
    if unique:
        return old_name, True
    return _free_name(["http", "drainproxy-http", "dp-http"], taken), False


def _mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]``, made an empty mapping when absent or null (``annotations:`` in YAML)."""
    if not isinstance(parent.get(key), dict):
        parent[key] = {}
    child: dict[str, Any] = parent[key]
    return child


def _sequence(parent: dict[str, Any], key: str) -> list[Any]:
    if not isinstance(parent.get(key), list):
        parent[key] = []
    child: list[Any] = parent[key]
    return child


def _config_volume(source: ConfigSource, config_map: str) -> dict[str, Any]:
    if source == "configmap":
        return {"name": CONFIG_VOLUME, "configMap": {"name": config_map}}
    field_path = f"metadata.annotations['{CONFIG_ANNOTATION}']"
    return {
        "name": CONFIG_VOLUME,
        "downwardAPI": {"items": [{"path": CONFIG_FILE, "fieldRef": {"fieldPath": field_path}}]},
    }


# ---------------------------------------------------------------------------------------------
# Document streams


@dataclass
class Document:
    """One Kubernetes object of the input, where it came from, and the objects to put before it
    (the ConfigMap of an injected workload)."""

    source: str
    body: dict[str, Any]
    before: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def where(self) -> str:
        return f"{self.source}: {self.kind}/{dig(self.body, 'metadata', 'name') or '?'}"


def _namespace(body: Mapping[str, Any]) -> str | None:
    namespace = dig(body, "metadata", "namespace")
    return str(namespace) if namespace else None


def _same_namespace(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """An absent namespace is whichever one the objects are applied to, so it matches any."""
    first, second = _namespace(a), _namespace(b)
    return first is None or second is None or first == second


def _selects(service: Mapping[str, Any], workload: Mapping[str, Any], labels: object) -> bool:
    selector = dig(service, "spec", "selector")
    if not isinstance(selector, dict) or not selector or not isinstance(labels, dict):
        return False
    return _same_namespace(service, workload) and all(
        labels.get(key) == value for key, value in selector.items()
    )


def _flatten(docs: Iterable[Document]) -> Iterator[Document]:
    """Every object, the items of a ``kind: List`` included (sharing their dicts)."""
    for doc in docs:
        items = doc.body.get("items")
        if doc.kind.endswith("List") and isinstance(items, list):
            yield from (Document(doc.source, item) for item in items if isinstance(item, dict))
        else:
            yield doc


@dataclass(frozen=True)
class _Fronted:
    workload: dict[str, Any]
    labels: dict[str, Any]
    #: The pod before and after injection: a Service port is pointed at drainproxy when it
    #: reached the app before and does not reach drainproxy now.
    before: dict[str, Any]
    after: dict[str, Any]
    app_port: int
    listen_name: str


def inject_documents(docs: list[Document], options: InjectOptions) -> list[str]:
    """Inject every workload of ``docs`` in place, put each one's ConfigMap before it, and point
    the Services at drainproxy. Returns the warnings (one line each) for stderr.
    Raises InjectError."""
    objects = list(_flatten(docs))
    for doc in objects:
        problems = list(type_errors(doc.body, OBJECT_FIELDS.get(doc.kind, OBJECT), ""))
        if problems:
            raise InjectError(f"{doc.where}: " + "; ".join(problems))
    services = [d for d in objects if d.kind == "Service"]
    fronted: list[_Fronted] = []
    config_maps: dict[int, dict[str, Any]] = {}
    config_map_names = {
        (_namespace(d.body), str(dig(d.body, "metadata", "name")))
        for d in objects
        if d.kind == "ConfigMap"
    }
    warnings: list[str] = []
    for doc in objects:
        path = WORKLOAD_TEMPLATES.get(doc.kind)
        if path is None:
            continue
        template = dig(doc.body, *path) if path else doc.body
        if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
            raise InjectError(f"{doc.where}: has no pod template spec")
        if not isinstance(template.setdefault("metadata", {}), dict):
            raise InjectError(f"{doc.where}: the pod template's metadata is not a mapping")
        done = _inject_workload(doc, template, services, options, config_map_names)
        if done is None:
            continue
        pod, config_map, pod_warnings = done
        fronted.append(pod)
        warnings += pod_warnings
        if config_map is not None:
            config_maps[id(doc.body)] = config_map
    for service in services:
        _point_service(service.body, fronted)
    _place_config_maps(docs, config_maps)
    return warnings


def _inject_workload(
    doc: Document,
    template: dict[str, Any],
    services: list[Document],
    options: InjectOptions,
    taken_names: set[tuple[str | None, str]],
) -> tuple[_Fronted, dict[str, Any] | None, list[str]] | None:
    """The workload's pod injected in place, with its new ConfigMap and warnings; for a pod that
    runs drainproxy already, what its Services need to know (and no ConfigMap)."""
    spec: dict[str, Any] = template["spec"]
    found = dig(template, "metadata", "labels")
    labels: dict[str, Any] = found if isinstance(found, dict) else {}
    if runs_drainproxy(spec):
        port = _int_port(dig(template, "metadata", "annotations", PORT_ANNOTATION))
        name = _listen_name(spec)
        if port is None or name is None:
            return None
        return _Fronted(doc.body, labels, spec, spec, port, name), None, []
    own = dig(doc.body, "metadata", "annotations") if doc.kind != "Pod" else None
    annotations = {str(k): str(v) for k, v in own.items()} if isinstance(own, dict) else {}
    targets = [
        n
        for s in services
        if _selects(s.body, doc.body, labels)
        for p in dict_items(dig(s.body, "spec", "ports"))
        if (n := _int_port(p.get("targetPort", p.get("port")))) is not None
    ]
    name = dig(doc.body, "metadata", "name") or "pod"
    config_name = f"{name}-drainproxy"
    if (_namespace(doc.body), config_name) in taken_names:  # e.g. a Deployment and a
        config_name = f"{name}-{doc.kind.lower()}-drainproxy"  # StatefulSet both named web
    taken_names.add((_namespace(doc.body), config_name))
    what = f"{doc.kind}/{dig(doc.body, 'metadata', 'name') or '?'}"
    injected = inject_pod(
        doc.where,
        what,
        template["metadata"],
        spec,
        options,
        annotations=annotations,
        service_targets=targets,
        config_map=config_name,
        token_scope=f"{_namespace(doc.body) or ''}/{what}",
    )
    if injected is None:
        return None
    template["metadata"] = injected.metadata
    template["spec"] = injected.spec
    metadata: dict[str, Any] = {"name": config_name}
    if _namespace(doc.body):
        metadata["namespace"] = _namespace(doc.body)
    if labels:
        metadata["labels"] = dict(labels)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CONFIG_FILE: injected.config_text},
    }
    pod = _Fronted(doc.body, labels, spec, injected.spec, injected.app_port, injected.listen_name)
    selected = any(_selects(s.body, doc.body, labels) for s in services)
    return pod, config_map, [] if selected else [injected.bypass_warning(doc.where)]


def _proxy(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    return next((c for c in _containers(spec) if c.get("name") == CONTAINER_NAME), None)


def _listen_name(spec: Mapping[str, Any]) -> str | None:
    ports = dict_items(dig(_proxy(spec), "ports"))
    return str(ports[0]["name"]) if ports and ports[0].get("name") else None


def _point_service(service: dict[str, Any], fronted: list[_Fronted]) -> None:
    """Service ports that reach a fronted app's port are pointed at drainproxy's, by name."""
    for pod in fronted:
        if not _selects(service, pod.workload, pod.labels):
            continue
        proxy_ports = dict_items(dig(_proxy(pod.after), "ports"))
        listen = _int_port(proxy_ports[0].get("containerPort")) if proxy_ports else None
        for port in dict_items(dig(service, "spec", "ports")):
            reached_app = find_service_port(pod.before, port) == pod.app_port
            if reached_app and find_service_port(pod.after, port) != listen:
                port["targetPort"] = pod.listen_name


def _place_config_maps(docs: list[Document], config_maps: dict[int, dict[str, Any]]) -> None:
    """Each new ConfigMap goes right before its workload (``kubectl apply`` creates in order),
    inside a List when the workload is one of its items."""
    for doc in docs:
        if id(doc.body) in config_maps:
            doc.before.append(config_maps[id(doc.body)])
        items = doc.body.get("items")
        if doc.kind.endswith("List") and isinstance(items, list):
            placed: list[Any] = []
            for item in items:
                if id(item) in config_maps:
                    placed.append(config_maps[id(item)])
                placed.append(item)
            doc.body["items"] = placed


# ---------------------------------------------------------------------------------------------
# Reading and writing


@dataclass
class Input:
    documents: list[Document]
    #: True when every source was JSON: the output is JSON too.
    all_json: bool


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML: {problem}{where}"


def parse_text(text: str, source: str) -> tuple[list[Document], bool]:
    """The documents of one file's text, and whether it was JSON. Raises InjectError."""
    is_json = text.lstrip().startswith(("{", "["))
    try:
        if is_json:
            bodies: list[object] = [json.loads(text)]
        else:
            bodies = list(yaml.load_all(text, Loader=_Loader))
    except json.JSONDecodeError as exc:
        raise InjectError(f"{source}: not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        raise InjectError(f"{source}: {_yaml_problem(exc)}") from None
    docs = []
    for index, body in enumerate(bodies):
        if body is None:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            raise InjectError(f"{source}: document {index + 1} is not a Kubernetes object")
        items = body.get("items")
        if body["kind"].endswith("List"):
            if not isinstance(items, list):
                raise InjectError(f"{source}: {body['kind']} without a list of items")
            for number, item in enumerate(items, 1):
                if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
                    raise InjectError(
                        f"{source}: document {index + 1}, item {number} is not a Kubernetes object"
                    )
        docs.append(Document(source, body))
    return docs, is_json


def _files(path: str) -> list[tuple[str, str]]:
    if path == "-":
        try:  # bytes, decoded strictly: the text layer may smuggle bad bytes in as surrogates
            return [("<stdin>", sys.stdin.buffer.read().decode())]
        except UnicodeDecodeError:
            raise InjectError("<stdin>: is not text") from None
    given = Path(path)
    try:
        if given.is_dir():
            found = sorted(
                p for p in given.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
            )
            return [(str(p), p.read_text()) for p in found]
        return [(path, given.read_text())]
    except OSError as exc:
        raise InjectError(f"{exc.filename or path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InjectError(f"{path}: is not text") from None


def read_sources(paths: Iterable[str]) -> Input:
    """Files, directories (their .yaml, .yml and .json files, in name order) and ``-``."""
    documents: list[Document] = []
    all_json = True
    for path in paths:
        for source, text in _files(path):
            docs, is_json = parse_text(text, source)
            documents += docs
            all_json = all_json and is_json
    return Input(documents, all_json and bool(documents))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the configs) as literal blocks, the way people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(source: Input) -> str:
    bodies = [body for doc in source.documents for body in (*doc.before, doc.body)]
    if source.all_json and len(bodies) == 1:
        return json.dumps(bodies[0], indent=2) + "\n"
    if source.all_json:
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": bodies}, indent=2) + "\n"
    # No folding of long lines: a folded hook command or annotation is valid, but unreadable.
    return yaml.dump_all(bodies, Dumper=_Dumper, sort_keys=False, width=1 << 20)
