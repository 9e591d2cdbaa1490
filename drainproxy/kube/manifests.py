"""Kubernetes manifests as ``check`` and ``inject`` read them: YAML or JSON streams of objects,
untrusted and read without raising (``dig``, ``dict_items``), and how a container starts
drainproxy (``drainproxy_launch``)."""

from __future__ import annotations

import posixpath
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from drainproxy.config.schema import describe_yaml_error, parse_yaml_stream
from drainproxy.errors import DrainproxyError

TOKEN_HEADER = "X-Drainproxy-Token"
#: The image's ``CMD`` (see the Dockerfile): what a container that sets no ``args`` runs.
IMAGE_DEFAULT_ARGS = ("serve", "--config", "/etc/drainproxy/drainproxy.yaml")
#: The image's ``USER`` (see the Dockerfile), when a pod spec sets no ``runAsUser``.
IMAGE_USER = 10001
#: Pod annotation listing the ports (numbers or names, comma-separated) that deliberately bypass
#: drainproxy: TLS it holds no certificate for, protocols other than HTTP (``drainproxy inject``
#: writes it). Services may target them.
UNPROXIED_PORTS_ANNOTATION = "drainproxy.io/unproxied-ports"
#: Kubernetes' default when ``terminationGracePeriodSeconds`` is not set.
DEFAULT_GRACE_SECONDS = 30
SHELLS = frozenset({"sh", "bash", "dash", "ash", "busybox"})


class ManifestError(DrainproxyError):
    """A manifest file cannot be read or is not Kubernetes YAML."""


@dataclass(frozen=True)
class ManifestDoc:
    source: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def name(self) -> str:
        return str(dig(self.body, "metadata", "name") or "?")

    @property
    def namespace(self) -> str | None:
        namespace = dig(self.body, "metadata", "namespace")
        return str(namespace) if namespace else None

    @property
    def where(self) -> str:
        return f"{self.source}: {self.kind}/{self.name}"

    def shares_namespace_with(self, other: ManifestDoc) -> bool:
        """Could both objects live in one namespace? A manifest without ``metadata.namespace``
        is applied to the namespace of the command (``kubectl apply -n``), which is where the
        other goes too when it says nothing, and may be the one it names when it does."""
        return (
            self.namespace is None or other.namespace is None or self.namespace == other.namespace
        )


def parse_manifests(text: str, source: str) -> list[ManifestDoc]:
    """Every non-empty document of a multi-document YAML (or JSON) stream, each a Kubernetes
    object; ``kind: List`` (``kubectl get -o yaml``) is read item by item. Duplicate keys are
    refused, as the API server's strict decoding does."""
    try:
        bodies = parse_yaml_stream(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {describe_yaml_error(exc)}") from None
    docs: list[ManifestDoc] = []
    for index, body in enumerate(bodies):
        if body is None:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            raise ManifestError(f"{source}: document {index + 1} is not a Kubernetes object")
        if body["kind"].endswith("List") and isinstance(body.get("items"), list):
            docs.extend(ManifestDoc(source, item) for item in dict_items(body["items"]))
        else:
            docs.append(ManifestDoc(source, body))
    return docs


#: The files ``kubectl apply -f DIRECTORY`` reads (not recursive, as without ``-R``).
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def manifest_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the manifest files directly in it when it is a directory."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())


def load_manifests(paths: Iterable[str | Path], stdin: TextIO | None = None) -> list[ManifestDoc]:
    """The documents of every path: a file, a directory of files, or ``-`` for ``stdin``."""
    docs: list[ManifestDoc] = []
    for given in paths:
        if str(given) == "-":
            docs.extend(parse_manifests((stdin or sys.stdin).read(), "<stdin>"))
            continue
        for path in manifest_files(given):
            try:
                text = path.read_text()
            except OSError as exc:
                raise ManifestError(f"{path}: cannot be read: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{path}: is not UTF-8 text: {exc.reason}") from None
            docs.extend(parse_manifests(text, str(path)))
    return docs


def dig(node: object, *keys: str) -> Any:
    """``node[keys[0]][keys[1]]...``, or None where a level is missing or not a mapping: a
    manifest is untrusted input, read without raising."""
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def dict_items(node: object) -> list[dict[str, Any]]:
    """The mappings in a list (``containers``, ``ports``); anything else as empty."""
    return [item for item in node if isinstance(item, dict)] if isinstance(node, list) else []


def string_items(node: object) -> list[str]:
    """An argv-like list (``command``, ``args``) as strings; anything else as empty."""
    return [str(item) for item in node] if isinstance(node, list) else []


# ---------------------------------------------------------------------------------------------
# How drainproxy is started in a container


@dataclass(frozen=True)
class Launch:
    subcommand: str
    config_path: str | None
    #: Started as ``sh -c "drainproxy ..."`` without ``exec``: the shell gets the SIGTERM.
    under_shell: bool


def is_drainproxy_image(image: object) -> bool:
    if not isinstance(image, str):
        return False
    name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return "drainproxy" in name


def _launch_from_argv(argv: Sequence[str], start: int, under_shell: bool) -> Launch | None:
    rest = list(argv[start + 1 :])
    if "--" in rest:
        rest = rest[: rest.index("--")]
    subcommand = next((token for token in rest if not token.startswith("-")), None)
    if subcommand not in ("serve", "wrap"):
        return None
    config_path = None
    for index, token in enumerate(rest):
        if token == "--config" and index + 1 < len(rest):
            config_path = rest[index + 1]
        elif token.startswith("--config="):
            config_path = token.partition("=")[2]
    return Launch(subcommand, config_path, under_shell)


def drainproxy_launch(container: Mapping[str, Any]) -> Launch | None:
    """How this container runs drainproxy as a proxy (serve or wrap), or None if it does not."""
    command = string_items(container.get("command"))
    args = string_items(container.get("args"))
    if not command:
        if not is_drainproxy_image(container.get("image")):
            return None
        return _launch_from_argv(["drainproxy", *(args or IMAGE_DEFAULT_ARGS)], 0, False)
    argv = command + args
    if posixpath.basename(argv[0]) in SHELLS and "-c" in argv[:3]:
        script_at = argv.index("-c") + 1
        if script_at >= len(argv):
            return None
        try:
            tokens = shlex.split(argv[script_at])
        except ValueError:
            tokens = argv[script_at].split()
        for index, token in enumerate(tokens):
            if posixpath.basename(token) == "drainproxy":
                exec_ed = index > 0 and tokens[index - 1] == "exec"
                return _launch_from_argv(tokens, index, under_shell=not exec_ed)
        return None
    for index, token in enumerate(argv[:3]):
        if posixpath.basename(token) == "drainproxy":
            return _launch_from_argv(argv, index, False)
    return None


# ---------------------------------------------------------------------------------------------
# The types of the pod fields check and inject read (Kubernetes core/v1)

#: A field's expected JSON type: a name from ``_TYPE_TESTS``, a nested object (its fields), or a
#: one-element list (an array of that). Only the fields drainproxy reads or rewrites; the API
#: server checks the rest.
FieldType = str | dict[str, "FieldType"] | list["FieldType"]

_HANDLER: dict[str, FieldType] = {
    "exec": {"command": ["string"]},
    "httpGet": {"path": "string", "port": "int-or-string", "host": "string", "scheme": "string"},
    "tcpSocket": {"port": "int-or-string"},
    "sleep": {"seconds": "integer"},
}
_PROBE: dict[str, FieldType] = {
    **_HANDLER,
    "periodSeconds": "integer",
    "timeoutSeconds": "integer",
    "failureThreshold": "integer",
    "successThreshold": "integer",
    "initialDelaySeconds": "integer",
}
_CONTAINER: dict[str, FieldType] = {
    "name": "string",
    "image": "string",
    "command": ["string"],
    "args": ["string"],
    "restartPolicy": "string",
    "ports": [{"containerPort": "port", "name": "string", "protocol": "string"}],
    "lifecycle": {"preStop": _HANDLER, "postStart": _HANDLER},
    "readinessProbe": _PROBE,
    "livenessProbe": _PROBE,
    "startupProbe": _PROBE,
}
POD_SPEC: dict[str, FieldType] = {
    "containers": [_CONTAINER],
    "initContainers": [_CONTAINER],
    "terminationGracePeriodSeconds": "integer",
    "shareProcessNamespace": "boolean",
    "os": {"name": "string"},
    # inject appends its config volume: a mapping here would be replaced, and lost.
    "volumes": [{"name": "string"}],
}
POD_METADATA: dict[str, FieldType] = {"annotations": "string-map", "labels": "string-map"}


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


_TYPE_TESTS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "string": ("a string", lambda v: isinstance(v, str)),
    "integer": ("an integer", _is_integer),
    "boolean": ("true or false", lambda v: isinstance(v, bool)),
    "port": ("a port number (1-65535)", _is_port),
    "int-or-string": ("a port number or name", lambda v: _is_integer(v) or isinstance(v, str)),
    "string-map": (
        "a mapping of strings to strings",
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    ),
}


def type_errors(node: object, expected: FieldType, path: str) -> Iterator[str]:
    """Each field of ``node`` (a manifest's object, at dotted ``path``) whose value is not of
    its type in ``expected``, as ``path: value is not <type>``. Absent and null fields pass
    (their defaults apply); a ``"30"`` where the API takes an integer does not: the API server
    would refuse the object, and inject must not read it as something else."""
    if node is None:
        return
    if isinstance(expected, str):
        description, test = _TYPE_TESTS[expected]
        if not test(node):
            yield f"{path}: {node!r} is not {description}"
    elif isinstance(expected, list):
        if not isinstance(node, list):
            yield f"{path}: {node!r} is not a list"
            return
        for index, item in enumerate(node):
            yield from type_errors(item, expected[0], f"{path}[{index}]")
    elif not isinstance(node, dict):
        yield f"{path}: {node!r} is not a mapping"
    else:
        for key, field_type in expected.items():
            yield from type_errors(node.get(key), field_type, f"{path}.{key}" if path else key)


#: Any object's: its name and namespace are read, and inject writes beside it.
OBJECT: dict[str, FieldType] = {
    "metadata": {"name": "string", "namespace": "string", **POD_METADATA},
}
#: The objects inject reads beyond ``metadata``: a Service's ports and selector (to point it at
#: drainproxy), a workload's template (a mapping whose pod fields are checked with POD_SPEC).
OBJECT_FIELDS: dict[str, dict[str, FieldType]] = {
    "Service": {
        **OBJECT,
        "spec": {
            "selector": "string-map",
            "ports": [{"port": "port", "targetPort": "int-or-string", "protocol": "string"}],
        },
    },
    **{
        kind: {**OBJECT, "spec": {"template": {"metadata": POD_METADATA}}}
        for kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
    },
    "Pod": {**OBJECT},
    "CronJob": {**OBJECT, "spec": {"jobTemplate": {"spec": {"template": {}}}}},
}
