"""``drainproxy check --manifest``: lint a config and the pod specs that run it, together.

Most shutdown outages come from values that must agree across files and do not: a grace period
shorter than the drain (exit 137), a readiness probe too slow to notice the drain, an app
container that gets SIGTERM while drainproxy still drains, a Service that bypasses the proxy.
Each rule has a stable code so CI logs and docs can refer to it. Everything here is pure (a
Config and parsed manifests in, findings out) except ``load_manifests``, which reads files.
"""

from __future__ import annotations

import enum
import math
import posixpath
import shlex
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any
from urllib.parse import urlsplit

from drainproxy.config.schema import (
    Config,
    ConfigReport,
    format_duration,
    read_config_text,
    shown_value,
)
from drainproxy.errors import ConfigError
from drainproxy.kube.manifests import (
    DEFAULT_GRACE_SECONDS,
    IMAGE_DEFAULT_ARGS,
    IMAGE_USER,
    SHELLS,
    TOKEN_HEADER,
    UNPROXIED_PORTS_ANNOTATION,
    Launch,
    ManifestDoc,
    dict_items,
    dig,
    drainproxy_launch,
    is_drainproxy_image,
    string_items,
)

_PROBE_DEFAULT_PERIOD = 10
_PROBE_DEFAULT_FAILURES = 3
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: The User-Agent of the kubelet's probes (``kube-probe/<major>.<minor>``).
_KUBELET_USER_AGENT = "kube-probe/1.29"

#: Where each workload kind keeps its pod template.
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class Severity(enum.Enum):
    ERROR = "error"  # the shutdown will lose requests or be killed: non-zero exit
    WARNING = "warning"  # suspicious or not verifiable: reported, exit stays 0


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    summary: str


_RULE_LIST = (
    Rule("DP001", "config-invalid", Severity.ERROR, "the config breaks a rule: drainproxy exits"),
    Rule(
        "DP002",
        "admin-token-placeholder",
        Severity.ERROR,
        "admin.token is the examples' public placeholder",
    ),
    Rule(
        "DP003",
        "response-timeout-exceeds-drain",
        Severity.WARNING,
        "upstream.response_timeout is longer than drain.timeout",
    ),
    Rule(
        "DP004",
        "manifest-field-type",
        Severity.ERROR,
        "a manifest field drainproxy's rules read has the wrong type: Kubernetes rejects it",
    ),
    Rule("DP100", "no-drainproxy", Severity.ERROR, "no container in the manifests runs drainproxy"),
    Rule(
        "DP101",
        "grace-period-too-short",
        Severity.ERROR,
        "the drain phases plus the app's stop exceed terminationGracePeriodSeconds",
    ),
    Rule(
        "DP102",
        "grace-period-mismatch",
        Severity.WARNING,
        "termination_grace_period differs from the pod's terminationGracePeriodSeconds",
    ),
    Rule(
        "DP201",
        "app-prestop-missing",
        Severity.ERROR,
        "the app container has no preStop hook waiting on drainproxy's /prestop",
    ),
    Rule(
        "DP202",
        "app-prestop-misdirected",
        Severity.ERROR,
        "the app's /prestop hook goes to the wrong port, host or scheme",
    ),
    Rule(
        "DP203",
        "app-prestop-token",
        Severity.ERROR,
        "the app's /prestop hook lacks the admin token drainproxy requires from the node",
    ),
    Rule(
        "DP204",
        "app-prestop-unchained",
        Severity.ERROR,
        "the app's own preStop hook runs at once instead of after drainproxy's drain",
    ),
    Rule(
        "DP301",
        "readiness-probe-misdirected",
        Severity.ERROR,
        "drainproxy's container has no readinessProbe on its admin /ready",
    ),
    Rule(
        "DP302",
        "readiness-probe-slow",
        Severity.ERROR,
        "readiness periodSeconds x failureThreshold is longer than drain.propagation",
    ),
    Rule(
        "DP303",
        "liveness-probe-on-ready",
        Severity.ERROR,
        "a livenessProbe on /ready restarts drainproxy during every drain",
    ),
    Rule(
        "DP304",
        "evidence-threshold-mismatch",
        Severity.ERROR,
        "evidence-based propagation assumes fewer kubelet probe failures than failureThreshold",
    ),
    Rule(
        "DP401",
        "service-target-port",
        Severity.ERROR,
        "a Service's targetPort is not drainproxy's listen port",
    ),
    Rule("DP402", "port-clash", Severity.ERROR, "two processes in the pod want the same port"),
    Rule(
        "DP403",
        "upstream-port-unknown",
        Severity.ERROR,
        "no app container declares upstream.url's port, but they declare others",
    ),
    Rule(
        "DP404",
        "upstream-port-undeclared",
        Severity.WARNING,
        "no app container declares any port: upstream.url's port cannot be verified",
    ),
    Rule(
        "DP501",
        "signal-needs-shared-pid",
        Severity.ERROR,
        "app.stop: signal in a pod without shareProcessNamespace",
    ),
    Rule(
        "DP502",
        "signal-uid-mismatch",
        Severity.WARNING,
        "drainproxy and the app run as different users: the signal fails with EPERM",
    ),
    Rule(
        "DP503",
        "native-sidecar-drain-trigger",
        Severity.ERROR,
        "a native sidecar's own preStop does not start the drain",
    ),
    Rule(
        "DP504",
        "init-container-blocks",
        Severity.ERROR,
        "drainproxy as an init container without restartPolicy: Always never lets the app start",
    ),
    Rule(
        "DP505",
        "shell-is-pid1",
        Severity.ERROR,
        "drainproxy runs under a shell that receives SIGTERM instead of it",
    ),
    Rule(
        "DP506",
        "wrap-config",
        Severity.ERROR,
        "the config is not one drainproxy wrap accepts",
    ),
    Rule(
        "DP507",
        "non-root-conflict",
        Severity.ERROR,
        "drainproxy's container must run as non-root but would run as user 0: it never starts",
    ),
    Rule(
        "DP601",
        "configmap-differs",
        Severity.ERROR,
        "the config in the pod's ConfigMap differs from the one given",
    ),
    Rule(
        "DP602",
        "config-unverifiable",
        Severity.WARNING,
        "the config drainproxy reads in the pod is not in the manifests given",
    ),
    Rule(
        "DP603",
        "configmap-key-missing",
        Severity.ERROR,
        "the ConfigMap does not hold the file drainproxy's --config names",
    ),
    Rule(
        "DP604",
        "configmap-invalid",
        Severity.ERROR,
        "the config in the ConfigMap does not load",
    ),
)
RULES: dict[str, Rule] = {rule.code: rule for rule in _RULE_LIST}


@dataclass(frozen=True)
class Finding:
    rule: Rule
    where: str
    message: str
    fix: str

    @property
    def is_error(self) -> bool:
        return self.rule.severity is Severity.ERROR

    def line(self) -> str:
        return (
            f"{self.where}: {self.rule.severity.value} {self.rule.code} {self.rule.name}: "
            f"{self.message}; fix: {self.fix}"
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "code": self.rule.code,
            "name": self.rule.name,
            "severity": self.rule.severity.value,
            "where": self.where,
            "message": self.message,
            "fix": self.fix,
        }


def _finding(code: str, where: str, message: str, fix: str) -> Finding:
    return Finding(RULES[code], where, message, fix)


# ---------------------------------------------------------------------------------------------
# The pods to check


class Style(enum.Enum):
    CLASSIC = "classic sidecar"
    NATIVE = "native sidecar"
    WRAP = "wrapper"
    BLOCKING_INIT = "init container"


@dataclass(frozen=True)
class PodTemplate:
    doc: ManifestDoc
    spec: dict[str, Any]
    labels: dict[str, Any]


@dataclass(frozen=True)
class Pod:
    """A pod template that runs drainproxy, with the roles of its containers worked out."""

    template: PodTemplate
    proxy: dict[str, Any]
    launch: Launch
    style: Style
    #: Every container of the pod that runs for its whole life (regular + native sidecars).
    running: list[dict[str, Any]]
    #: The containers drainproxy fronts and holds back at deletion.
    apps: list[dict[str, Any]]

    @property
    def spec(self) -> dict[str, Any]:
        return self.template.spec

    def where(self, container: Mapping[str, Any] | None = None) -> str:
        where = self.template.doc.where
        return f"{where} container {container.get('name', '?')}" if container else where


def pod_templates(docs: Iterable[ManifestDoc]) -> Iterator[PodTemplate]:
    for doc in docs:
        path = _TEMPLATE_PATHS.get(doc.kind)
        if path is None:
            continue
        template = dig(doc.body, *path) if path else doc.body
        spec = dig(template, "spec")
        if isinstance(spec, dict):
            labels = dig(template, "metadata", "labels")
            yield PodTemplate(doc, spec, labels if isinstance(labels, dict) else {})


def find_pod(template: PodTemplate, config: Config) -> Pod | None:
    regular = dict_items(template.spec.get("containers"))
    inits = dict_items(template.spec.get("initContainers"))
    sidecars = [c for c in inits if c.get("restartPolicy") == "Always"]
    for container in regular + inits:
        launch = drainproxy_launch(container)
        if launch is None:
            continue
        if launch.subcommand == "wrap":
            style = Style.WRAP
        elif container in sidecars:
            style = Style.NATIVE
        elif container in inits:
            style = Style.BLOCKING_INIT
        else:
            style = Style.CLASSIC
        others = [c for c in regular if c is not container]
        fronted = [c for c in others if config.upstream.port in _declared_ports(c)]
        apps = [] if style is Style.WRAP else fronted or others
        return Pod(template, container, launch, style, regular + sidecars, apps)
    return None


# ---------------------------------------------------------------------------------------------
# Ports, probes and hooks


def _declared_ports(container: Mapping[str, Any]) -> list[int]:
    return [p["containerPort"] for p in dict_items(container.get("ports")) if "containerPort" in p]


def _resolve_port(port: object, containers: Iterable[Mapping[str, Any]]) -> int | None:
    """A number, or a port name looked up in ``containers`` (the kubelet resolves hook and probe
    names in the container's own ports, Services in any container of the pod)."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for container in containers:
            for declared in dict_items(container.get("ports")):
                if declared.get("name") == port and isinstance(declared.get("containerPort"), int):
                    port_number: int = declared["containerPort"]
                    return port_number
    return None


def _http_path(handler: Mapping[str, Any]) -> str:
    return str(dig(handler, "httpGet", "path") or "/").split("?")[0]


def _exec_words(handler: Mapping[str, Any]) -> list[str]:
    """An exec handler's argv, with shell scripts (``sh -c "..."``) split into words."""
    words: list[str] = []
    for token in string_items(dig(handler, "exec", "command")):
        if any(space in token for space in " \t\n;&|"):
            try:
                words += shlex.split(token.replace(";", " ; "))
            except ValueError:
                words += token.split()
        else:
            words.append(token)
    return words


def _exec_url(words: Sequence[str], path: str) -> str | None:
    """The URL an exec hook calls on ``path`` (e.g. curl's argument), if any."""
    for word in words:
        try:
            url = urlsplit(word if "://" in word else f"http://{word}")
        except ValueError:  # not a URL (e.g. "[" in a shell word)
            continue
        if url.path == path and url.hostname:
            return word
    return None


def _runs_drainproxy_drain(words: Sequence[str]) -> bool:
    return any(
        posixpath.basename(word) == "drainproxy" and words[index + 1 : index + 2] == ["drain"]
        for index, word in enumerate(words)
    )


# ---------------------------------------------------------------------------------------------
# The rules


@dataclass(frozen=True)
class _Context:
    config: Config
    config_source: str
    docs: Sequence[ManifestDoc]


#: Kubernetes' defaults for the integer fields the rules read.
_INTEGER_DEFAULTS = {
    "periodSeconds": _PROBE_DEFAULT_PERIOD,
    "failureThreshold": _PROBE_DEFAULT_FAILURES,
    "terminationGracePeriodSeconds": DEFAULT_GRACE_SECONDS,
}


def _integer(
    where: str, owner: Mapping[str, Any], path: str, key: str
) -> Generator[Finding, None, int | None]:
    """An integer field of a manifest (its Kubernetes default when absent); a value of another
    type is a DP004 finding (the API server rejects it) and None, never a traceback."""
    value = owner.get(key, _INTEGER_DEFAULTS[key])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    yield _finding(
        "DP004",
        where,
        f"{path}.{key} is {value!r}, not an integer: the API server rejects this manifest",
        f"write {key} as a whole number of {'seconds' if 'Seconds' in key else 'times'} "
        f"(e.g. {key}: {_INTEGER_DEFAULTS[key]})",
    )
    return None


def _check_grace_period(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    grace = yield from _integer(pod.where(), pod.spec, "spec", "terminationGracePeriodSeconds")
    if grace is None:
        return
    terms = ctx.config.shutdown_budget()
    total = sum(seconds for _, seconds in terms)
    shown = " + ".join(f"{name} {format_duration(seconds)}" for name, seconds in terms)
    setting = (
        "terminationGracePeriodSeconds"
        if "terminationGracePeriodSeconds" in pod.spec
        else "terminationGracePeriodSeconds (not set: Kubernetes' default)"
    )
    if total > grace:
        yield _finding(
            "DP101",
            pod.where(),
            f"the shutdown needs {shown} = {format_duration(total)}, more than {setting} {grace}: "
            "the kubelet SIGKILLs the pod (exit 137) before the app has stopped",
            f"set terminationGracePeriodSeconds: {math.ceil(total)} or more (and "
            "termination_grace_period to match), or shorten drain.timeout / drain.propagation",
        )
    if grace != ctx.config.termination_grace_period:
        yield _finding(
            "DP102",
            pod.where(),
            f"{ctx.config_source} says termination_grace_period "
            f"{format_duration(ctx.config.termination_grace_period)} but the pod's {setting} "
            f"is {grace}: "
            "drainproxy checks its budget against a grace period the kubelet does not use",
            f"make both {grace} seconds (termination_grace_period: {grace}s)",
        )


def _prestop_hook_fix(ctx: _Context) -> str:
    return f"add lifecycle.preStop.{_prestop_hook_text(ctx)} to the app container"


def _prestop_hook_text(ctx: _Context) -> str:
    header = (
        f", httpHeaders: [{{name: {TOKEN_HEADER}, value: <admin.token>}}]"
        if ctx.config.admin.token
        else ""
    )
    return f"httpGet {{path: /prestop, port: {ctx.config.admin.listen.port}{header}}}"


def _prestop_wait_command(ctx: _Context) -> str:
    """A shell line that waits for the drain from inside the pod (loopback: no token needed)."""
    url = f"http://127.0.0.1:{ctx.config.admin.listen.port}/prestop"
    return f"wget -q -O /dev/null {url} || curl -fsS -o /dev/null {url}"


def _unchained_sleep(ctx: _Context, where: str, seconds: object) -> Finding:
    slept = f" {seconds}s" if seconds is not None else ""
    return _finding(
        "DP204",
        where,
        f"the app's preStop hook sleeps{slept}, a guess at how long the drain takes: the app "
        "gets SIGTERM when the sleep ends, whether or not drainproxy has finished draining",
        f"replace the sleep with lifecycle.preStop.{_prestop_hook_text(ctx)}, which returns "
        "exactly when the drain is over",
    )


def _unchained_exec(ctx: _Context, where: str, hook: Mapping[str, Any]) -> Finding:
    command = string_items(dig(hook, "exec", "command"))
    script = command[2] if len(command) >= 3 and command[1] == "-c" else shlex.join(command)
    words = _exec_words(hook)
    if len(words) > 2 and posixpath.basename(words[0]) in SHELLS and words[1] == "-c":
        words = words[2:]
    if words and posixpath.basename(words[0]) == "sleep" and len(words) <= 2:
        return _unchained_sleep(ctx, where, words[1] if len(words) == 2 else None)
    chained = f"{_prestop_wait_command(ctx)}; {script}"
    return _finding(
        "DP204",
        where,
        f"the app's own preStop command ({script}) runs at once, while drainproxy is still "
        "draining: the app stops before the requests in flight are done",
        f"keep it, but wait on drainproxy first: exec: {{command: [sh, -c, {chained!r}]}} "
        "(wget or curl must be in the app's image; from inside the pod no token is needed)",
    )


def _check_app_hooks(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    if pod.style not in (Style.CLASSIC, Style.NATIVE):
        return
    admin_port = ctx.config.admin.listen.port
    for app in pod.apps:
        where = pod.where(app)
        hook = dig(app, "lifecycle", "preStop")
        if not isinstance(hook, dict):
            yield _finding(
                "DP201",
                where,
                "no preStop hook: the kubelet sends this container SIGTERM at once, while "
                "drainproxy is still draining, so requests in flight fail",
                _prestop_hook_fix(ctx),
            )
            continue
        if "httpGet" in hook:
            yield from _check_http_prestop(ctx, pod, app, hook)
            continue
        if "sleep" in hook:
            yield _unchained_sleep(ctx, where, dig(hook, "sleep", "seconds"))
            continue
        call = _exec_url(_exec_words(hook), "/prestop")
        if call is None:
            yield _unchained_exec(ctx, where, hook)
            continue
        url = urlsplit(call if "://" in call else f"http://{call}")
        try:
            port = url.port
        except ValueError:
            port = None
        if port is not None and port != admin_port:
            yield _finding(
                "DP202",
                where,
                f"the preStop exec calls {call}, but drainproxy's admin port is {admin_port}",
                f"call http://127.0.0.1:{admin_port}/prestop",
            )


def _check_http_prestop(
    ctx: _Context, pod: Pod, app: Mapping[str, Any], hook: Mapping[str, Any]
) -> Iterator[Finding]:
    where = pod.where(app)
    admin_port = ctx.config.admin.listen.port
    http = hook["httpGet"] if isinstance(hook["httpGet"], dict) else {}
    path = _http_path(hook)
    if path != "/prestop":
        port = _resolve_port(http.get("port"), [app])
        url = f"{str(http.get('scheme', 'HTTP')).lower()}://127.0.0.1:{port or '<port>'}{path}"
        yield _finding(
            "DP204",
            where,
            f"the app's own preStop hook GET {path} runs at once, while drainproxy is still "
            "draining (an httpGet hook cannot wait on drainproxy first)",
            f"let drainproxy make that call after the drain: app.stop: http, app.url: {url}, "
            f"app.method: GET; and make the hook {_prestop_hook_text(ctx)}",
        )
        return
    port = _resolve_port(http.get("port"), [app])
    problems = []
    if port != admin_port:
        shown = http.get("port") if port is None else port
        named = (
            " (hook port names resolve in the app container's own ports)" if port is None else ""
        )
        problems.append(f"port {shown} is not drainproxy's admin port {admin_port}{named}")
    if http.get("host"):
        problems.append(f"host {http['host']} sends it away from the pod")
    if str(http.get("scheme", "HTTP")).upper() != "HTTP":
        problems.append(f"scheme {http['scheme']}: the admin listener speaks plain HTTP")
    if problems:
        yield _finding(
            "DP202",
            where,
            "the preStop hook on /prestop misses drainproxy: " + "; ".join(problems),
            f"use httpGet {{path: /prestop, port: {admin_port}}} with no host and scheme HTTP",
        )
    headers = {
        str(h.get("name", "")).lower(): h.get("value") for h in dict_items(http.get("httpHeaders"))
    }
    token = ctx.config.admin.token
    given = headers.get(TOKEN_HEADER.lower())
    if token is None:
        yield _finding(
            "DP203",
            where,
            "admin.token is not set, so drainproxy answers 403 to /prestop from the kubelet "
            "(httpGet hooks come from the node, not loopback) and the app gets SIGTERM at once",
            f"set admin.token and send it in the hook's {TOKEN_HEADER} header",
        )
    elif given is None:
        yield _finding(
            "DP203",
            where,
            f"the hook has no {TOKEN_HEADER} header while admin.token is set: drainproxy "
            "answers 403 and the app gets SIGTERM at once",
            f"add httpHeaders: [{{name: {TOKEN_HEADER}, value: <admin.token>}}]",
        )
    elif given != token:
        yield _finding(
            "DP203",
            where,
            f"the hook's {TOKEN_HEADER} differs from admin.token in {ctx.config_source}: "
            "drainproxy answers 403 and the app gets SIGTERM at once",
            f"make the {TOKEN_HEADER} header value equal admin.token",
        )


def _check_probes(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    where = pod.where(pod.proxy)
    admin_port = ctx.config.admin.listen.port
    propagation = ctx.config.drain.propagation
    probe = pod.proxy.get("readinessProbe")
    aimed = (
        isinstance(probe, dict)
        and "httpGet" in probe
        and _http_path(probe) == "/ready"
        and _resolve_port(dig(probe, "httpGet", "port"), [pod.proxy]) == admin_port
    )
    if not aimed:
        what = (
            "has no readinessProbe"
            if not isinstance(probe, dict)
            else "has a readinessProbe that is not an httpGet of /ready on the admin port "
            f"{admin_port}"
        )
        yield _finding(
            "DP301",
            where,
            f"drainproxy's container {what}: the pod stays an endpoint while drainproxy drains",
            f"readinessProbe: {{httpGet: {{path: /ready, port: {admin_port}}}, periodSeconds: 1, "
            "failureThreshold: 2}",
        )
    elif isinstance(probe, dict):
        period = yield from _integer(where, probe, "readinessProbe", "periodSeconds")
        failures = yield from _integer(where, probe, "readinessProbe", "failureThreshold")
        if period is None or failures is None:
            return
        if period * failures > propagation:
            yield _finding(
                "DP302",
                where,
                f"the readinessProbe needs up to periodSeconds {period} x failureThreshold "
                f"{failures} = {period * failures}s to notice the drain, longer than "
                f"drain.propagation {format_duration(propagation)}: the listener closes while "
                "the pod is still an endpoint",
                "set periodSeconds: 1 and failureThreshold: 2, or raise drain.propagation to at "
                f"least {period * failures}s plus your endpoint propagation time",
            )
        yield from _check_evidence_threshold(ctx, where, failures)
    liveness = pod.proxy.get("livenessProbe")
    if isinstance(liveness, dict) and "httpGet" in liveness and _http_path(liveness) == "/ready":
        yield _finding(
            "DP303",
            where,
            "the livenessProbe checks /ready, which fails from the start of every drain (and "
            "while the app is down): the kubelet restarts drainproxy mid-drain",
            f"point the livenessProbe at /live on port {admin_port}",
        )


def _check_evidence_threshold(ctx: _Context, where: str, failures: int) -> Iterator[Finding]:
    """In evidence mode drainproxy ends the propagation once each prober has seen its threshold
    of 503s: for the kubelet that must be the readinessProbe's failureThreshold."""
    drain = ctx.config.drain
    if drain.propagation_mode != "evidence":
        return
    from drainproxy.core.probers import ProberTracker

    assumed = ProberTracker(drain.probers, drain.default_failure_threshold).threshold_for(
        "", _KUBELET_USER_AGENT
    )
    if failures > assumed:
        yield _finding(
            "DP304",
            where,
            f"drain.propagation_mode is evidence and drainproxy counts the kubelet as done after "
            f"{assumed} failed probe(s), but the readinessProbe's failureThreshold is {failures}: "
            "the listener can close while the pod is still an endpoint",
            f"add drain.probers: [{{user_agent: '^kube-probe/', failure_threshold: {failures}}}] "
            f"or set failureThreshold: {assumed}",
        )


def _selects(service: ManifestDoc, pod: Pod) -> bool:
    selector = dig(service.body, "spec", "selector")
    if not isinstance(selector, dict) or not selector:
        return False
    if not service.shares_namespace_with(pod.template.doc):
        return False
    return all(pod.template.labels.get(key) == value for key, value in selector.items())


def _port_owners(name: str, containers: Iterable[Mapping[str, Any]]) -> list[tuple[str, object]]:
    """(container, containerPort) of every port called ``name``, in the order Kubernetes
    searches them (it takes the first)."""
    return [
        (str(c.get("name", "?")), declared.get("containerPort"))
        for c in containers
        for declared in dict_items(c.get("ports"))
        if declared.get("name") == name
    ]


def _listen_port_reference(ctx: _Context, pod: Pod) -> str:
    """What a Service's targetPort should say: drainproxy's port name when that name resolves
    to its listen port, else the number."""
    listen_port = ctx.config.listen.port
    for declared in dict_items(pod.proxy.get("ports")):
        name = declared.get("name")
        aimed = declared.get("containerPort") == listen_port and isinstance(name, str)
        if aimed and _resolve_port(name, pod.running) == listen_port:
            return f"{name} (drainproxy's port {listen_port})"
    return str(listen_port)


def _unproxied_ports(pod: Pod) -> set[int]:
    """The ports the pod template's annotation marks as deliberately not proxied."""
    path = _TEMPLATE_PATHS.get(pod.template.doc.kind, ())
    listed = dig(
        pod.template.doc.body, *path, "metadata", "annotations", UNPROXIED_PORTS_ANNOTATION
    )
    words = (word.strip() for word in str(listed or "").split(","))
    ports = (_resolve_port(word, pod.running) for word in words if word)
    return {port for port in ports if port is not None}


def _check_services(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    listen_port = ctx.config.listen.port
    allowed = {listen_port, ctx.config.admin.listen.port} | _unproxied_ports(pod)
    for service in (d for d in ctx.docs if d.kind == "Service" and _selects(d, pod)):
        for port in dict_items(dig(service.body, "spec", "ports")):
            target = port.get("targetPort", port.get("port"))
            resolved = _resolve_port(target, pod.running)
            if resolved in allowed:
                continue
            owners = _port_owners(target, pod.running) if isinstance(target, str) else []
            proxy_name = str(pod.proxy.get("name", "?"))
            if len(owners) > 1 and any(owner == proxy_name for owner, _ in owners):
                first, number = owners[0]
                yield _finding(
                    "DP401",
                    service.where,
                    f"port {port.get('port')} has targetPort {target}, a name that "
                    f"{' and '.join(f'container {owner}' for owner, _ in owners)} all give a "
                    f"port: Kubernetes resolves it to the first, container {first}'s {number}, "
                    "so traffic bypasses the drain",
                    f"rename container {first}'s port {target} (e.g. to app-{target}) so "
                    f"{target} names only drainproxy's port {listen_port}, or set targetPort: "
                    f"{listen_port}",
                )
                continue
            why = (
                f"names no container port of {pod.where()}"
                if resolved is None
                else f"is not drainproxy's listen port {listen_port}: traffic bypasses the drain"
            )
            yield _finding(
                "DP401",
                service.where,
                f"port {port.get('port')} has targetPort {target}, which {why}",
                f"set targetPort: {_listen_port_reference(ctx, pod)}",
            )


def _check_ports(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    listen, admin = ctx.config.listen, ctx.config.admin.listen
    owners: dict[tuple[int, str], list[str]] = {}
    for port, role in ((listen.port, "listen"), (admin.port, "admin.listen")):
        owners.setdefault((port, "TCP"), []).append(f"drainproxy's {role}")
    for container in pod.running:
        name = str(container.get("name", "?"))
        for declared in dict_items(container.get("ports")):
            number = declared.get("containerPort")
            if not isinstance(number, int):
                continue
            key = (number, str(declared.get("protocol", "TCP")))
            if container is pod.proxy and key in ((listen.port, "TCP"), (admin.port, "TCP")):
                continue
            owners.setdefault(key, []).append(f"container {name}")
    for (port, protocol), claimants in owners.items():
        if len(claimants) > 1:
            yield _finding(
                "DP402",
                pod.where(),
                f"{protocol} port {port} is claimed by {' and '.join(claimants)}: containers of a "
                "pod share one network namespace",
                "give each container its own port (and change listen, admin.listen or the "
                "app's port to match)",
            )


def _user(pod: Pod, container: Mapping[str, Any]) -> object:
    return _security(pod, container, "runAsUser")


def _check_upstream_port(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    """The app container should declare the port drainproxy forwards to; ``ports`` are only
    informational in Kubernetes, but a mismatch with the ones declared is a wrong port."""
    upstream = ctx.config.upstream
    if pod.style is Style.WRAP or upstream.host not in _LOOPBACK_HOSTS:
        return
    others = [c for c in pod.running if c is not pod.proxy]
    if not others or any(upstream.port in _declared_ports(c) for c in others):
        return
    declared = sorted({str(p) for c in others for p in _declared_ports(c)})
    names = " and ".join(f"container {c.get('name', '?')}" for c in others)
    if declared:
        yield _finding(
            "DP403",
            pod.where(),
            f"upstream.url {upstream.url} goes to port {upstream.port}, which no app container "
            f"declares ({names} declare {', '.join(declared)}): nothing may listen there, and "
            "the pod then never gets ready",
            f"point upstream.url at the app's port (e.g. http://127.0.0.1:{declared[0]}), or "
            f"declare containerPort {upstream.port} on the app container if it listens there",
        )
    else:
        yield _finding(
            "DP404",
            pod.where(),
            f"{names} declare no ports, so nothing confirms that the app listens on "
            f"upstream.url's port {upstream.port}",
            f"declare ports: [{{name: app, containerPort: {upstream.port}}}] on the app container",
        )


def _security(pod: Pod, container: Mapping[str, Any], key: str) -> object:
    """A securityContext setting: the container's own, else the pod's."""
    own = dig(container, "securityContext", key)
    return own if own is not None else dig(pod.spec, "securityContext", key)


def _check_non_root(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    """The kubelet refuses to start a container that must run as non-root but would run as
    user 0 ("container's runAsUser breaks non-root policy")."""
    if _security(pod, pod.proxy, "runAsNonRoot") is not True:
        return
    user = _security(pod, pod.proxy, "runAsUser")
    if user != 0:
        return
    where = pod.where(pod.proxy)
    source = (
        "its own securityContext"
        if dig(pod.proxy, "securityContext", "runAsUser") is not None
        else "the pod's securityContext.runAsUser: 0"
    )
    yield _finding(
        "DP507",
        where,
        f"runAsNonRoot is true but the container would run as user 0 (from {source}): the "
        "kubelet refuses to start it, and the pod never gets ready",
        f"set securityContext.runAsUser: {IMAGE_USER} on the drainproxy container (a container's "
        "own runAsUser overrides the pod's; the app keeps the pod's)",
    )


def _check_signal_mode(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    if str(ctx.config.app.stop) != "signal" or pod.style is Style.WRAP:
        return
    if not pod.spec.get("shareProcessNamespace"):
        yield _finding(
            "DP501",
            pod.where(),
            "app.stop is signal, but without shareProcessNamespace drainproxy cannot see the "
            "app's process: the stop fails at start-up",
            "set spec.shareProcessNamespace: true (or use app.stop: prestop)",
        )
        return
    proxy_user = _user(pod, pod.proxy)
    if proxy_user is None and is_drainproxy_image(pod.proxy.get("image")):
        proxy_user = IMAGE_USER
    capabilities = dig(pod.proxy, "securityContext", "capabilities", "add") or []
    # Kubernetes grants added capabilities to root only (no ambient capabilities for others).
    if proxy_user == 0 and ("KILL" in capabilities or "CAP_KILL" in capabilities):
        return
    for app in pod.apps:
        app_user = _user(pod, app)
        if proxy_user is not None and app_user is not None and proxy_user != app_user:
            yield _finding(
                "DP502",
                pod.where(app),
                f"runs as user {app_user}, drainproxy as {proxy_user}: sending it a signal "
                "fails with EPERM",
                f"run both with runAsUser: {proxy_user} (capability KILL would help only a "
                "drainproxy running as root)",
            )


def _check_launch(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    where = pod.where(pod.proxy)
    if pod.launch.under_shell:
        yield _finding(
            "DP505",
            where,
            "drainproxy is started by a shell (sh -c) without exec: the shell is the "
            "container's main process, gets the SIGTERM and does not pass it on, so nothing drains",
            "put exec before drainproxy in the script, or run drainproxy as the command itself",
        )
    if pod.style is Style.BLOCKING_INIT:
        yield _finding(
            "DP504",
            where,
            "drainproxy is an init container without restartPolicy: Always; it never exits, "
            "so the app containers never start",
            "add restartPolicy: Always (a native sidecar, Kubernetes 1.29+) or move it to "
            "containers",
        )
    if pod.style is Style.WRAP:
        from drainproxy.config.schema import check_wrapper_config

        try:
            check_wrapper_config(ctx.config)
        except ConfigError as exc:
            yield _finding(
                "DP506",
                where,
                f"the container runs drainproxy wrap, which refuses {ctx.config_source}: {exc}",
                "change the config as the message says",
            )
    if pod.style is not Style.NATIVE:
        return
    hook = dig(pod.proxy, "lifecycle", "preStop")
    words = _exec_words(hook) if isinstance(hook, dict) else []
    if _runs_drainproxy_drain(words) or _exec_url(words, "/drain"):
        return
    if isinstance(hook, dict) and "httpGet" in hook and _http_path(hook) == "/prestop":
        why = (
            "its preStop is GET /prestop, which counts as the app's hook: after releasing the app "
            "drainproxy returns to serving, and its late SIGTERM starts a second drain"
        )
    else:
        why = (
            "its preStop does not start the drain; a native sidecar gets SIGTERM only after the "
            "app has exited, so drainproxy would release the app and then drain a second time"
        )
    yield _finding(
        "DP503",
        where,
        f"drainproxy runs as a native sidecar, but {why}",
        "lifecycle.preStop.exec.command: [drainproxy, drain, --config, "
        f"{pod.launch.config_path or IMAGE_DEFAULT_ARGS[2]}]",
    )


def _mounted_file(
    proxy: Mapping[str, Any], spec: Mapping[str, Any], path: str
) -> tuple[dict[str, Any] | None, str] | None:
    """The volume a file path of the proxy container lives on, and the path inside it."""
    best: tuple[int, str, str] | None = None
    for mount in dict_items(proxy.get("volumeMounts")):
        mount_path = str(mount.get("mountPath", "")).rstrip("/")
        sub_path = mount.get("subPath")
        if sub_path:
            inner = str(sub_path) if path == mount_path else None
        elif path.startswith(mount_path + "/"):
            inner = path[len(mount_path) + 1 :]
        else:
            inner = None
        if inner is not None and (best is None or len(mount_path) > best[0]):
            best = (len(mount_path), str(mount.get("name")), inner)
    if best is None:
        return None
    volume = next((v for v in dict_items(spec.get("volumes")) if v.get("name") == best[1]), None)
    return volume, best[2]


@dataclass(frozen=True)
class ConfigLocation:
    """Where in the manifests a drainproxy container's ``--config`` file comes from."""

    path: str
    #: The volume holding it (None: the file is in the image).
    volume: dict[str, Any] | None
    inner: str
    #: The ConfigMap's name, when the volume is one.
    config_map: str | None = None
    key: str | None = None
    #: The ConfigMap, when it is among the manifests.
    doc: ManifestDoc | None = None
    #: The file's text, when the ConfigMap holds it.
    text: str | None = None

    @property
    def source(self) -> str:
        """How findings name the config read from the ConfigMap."""
        where = self.doc.where if self.doc is not None else f"ConfigMap/{self.config_map}"
        return f"{where} data.{self.key}"


def locate_config(
    docs: Sequence[ManifestDoc],
    workload: ManifestDoc,
    spec: Mapping[str, Any],
    proxy: Mapping[str, Any],
    path: str,
) -> ConfigLocation:
    """Follow ``path`` through the proxy container's mounts to a ConfigMap key in ``docs``."""
    mounted = _mounted_file(proxy, spec, path)
    volume, inner = mounted if mounted else (None, path)
    config_map = dig(volume, "configMap")
    if not isinstance(config_map, dict):
        return ConfigLocation(path, volume, inner)
    name = str(config_map.get("name"))
    items = dict_items(config_map.get("items"))
    key = next((i.get("key") for i in items if i.get("path") == inner), None) if items else inner
    doc = next(
        (
            d
            for d in docs
            if d.kind == "ConfigMap" and d.name == name and d.shares_namespace_with(workload)
        ),
        None,
    )
    data = dig(doc.body, "data") if doc is not None else None
    text = data.get(key) if isinstance(data, dict) and key is not None else None
    shown_key = str(key) if key is not None else None
    return ConfigLocation(
        path, volume, inner, name, shown_key, doc, text if isinstance(text, str) else None
    )


def _set(value: object) -> str:
    return "not set" if value is None else shown_value(value) if not is_dataclass(value) else "set"


def _differences(given: object, other: object, prefix: str = "") -> list[str]:
    if given == other:
        return []
    if prefix == "admin.token":
        return [f"{prefix} (the values differ; not shown)"]
    if given is None or other is None:  # an optional section (tls) on one side only
        return [f"{prefix} ({_set(given)} given, {_set(other)} in the pod)"]
    if not (is_dataclass(given) and is_dataclass(other)):
        return [f"{prefix} ({shown_value(given)} given, {shown_value(other)} in the pod)"]
    found: list[str] = []
    for item in fields(given):
        if item.compare:
            dotted = f"{prefix}.{item.name}" if prefix else item.name
            found += _differences(getattr(given, item.name), getattr(other, item.name), dotted)
    return found


def _check_config_source(ctx: _Context, pod: Pod) -> Iterator[Finding]:
    where = pod.where(pod.proxy)
    path = pod.launch.config_path
    if path is None:
        differences = _differences(ctx.config, Config())
        if differences:
            yield _finding(
                "DP601",
                where,
                f"drainproxy runs without --config, on its embedded defaults, which differ from "
                f"{ctx.config_source} at " + ", ".join(differences),
                f"mount {ctx.config_source} from a ConfigMap and pass --config",
            )
        return
    found = locate_config(ctx.docs, pod.template.doc, pod.spec, pod.proxy, path)
    if found.config_map is None:
        source = "the image" if found.volume is None else f"volume {dig(found.volume, 'name')}"
        yield _finding(
            "DP602",
            where,
            f"drainproxy reads {path} from {source}, not from a ConfigMap in the manifests: "
            f"cannot compare it with {ctx.config_source}",
            "mount the config from a ConfigMap listed in the manifests given to check",
        )
        return
    if found.doc is None:
        yield _finding(
            "DP602",
            where,
            f"drainproxy reads {path} from ConfigMap {found.config_map}, which is not in the "
            f"manifests given: cannot compare it with {ctx.config_source}",
            f"pass the manifest holding ConfigMap {found.config_map} to check as well",
        )
        return
    if found.text is None:
        yield _finding(
            "DP603",
            found.doc.where,
            f"has no key {found.key or found.inner!r}, which drainproxy's --config {path} needs: "
            "the file does not exist in the container and drainproxy will not start",
            f"add data.{found.inner} holding the config (or fix the volume's items)",
        )
        return
    if found.source == ctx.config_source:
        return  # the config under check is this very one
    try:
        in_pod = read_config_text(found.text, found.source).checked()
    except ConfigError as exc:
        yield _finding(
            "DP604",
            found.doc.where,
            f"data.{found.key} does not load: " + "; ".join(str(e) for e in exc.errors),
            f"put the content of {ctx.config_source} there",
        )
        return
    differences = _differences(ctx.config, in_pod)
    if differences:
        yield _finding(
            "DP601",
            found.doc.where,
            f"data.{found.key} differs from {ctx.config_source} at " + ", ".join(differences),
            f"regenerate the ConfigMap from {ctx.config_source} "
            "(kubectl create configmap --from-file ... --dry-run=client -o yaml)",
        )


_POD_RULES = (
    _check_grace_period,
    _check_app_hooks,
    _check_probes,
    _check_services,
    _check_ports,
    _check_upstream_port,
    _check_non_root,
    _check_signal_mode,
    _check_launch,
    _check_config_source,
)


def check_manifests(
    config: Config, docs: Sequence[ManifestDoc], config_source: str = "the config"
) -> list[Finding]:
    """Every finding for the pods in ``docs`` that run drainproxy, in manifest order. A manifest
    field of a type a rule cannot read is a DP004 finding, never an exception."""
    ctx = _Context(config, config_source, docs)
    findings: list[Finding] = []
    pods = [pod for t in pod_templates(docs) if (pod := find_pod(t, config)) is not None]
    if not pods:
        sources = ", ".join(sorted({doc.source for doc in docs})) or "the manifests"
        return [
            _finding(
                "DP100",
                sources,
                "no Pod, Deployment, StatefulSet, DaemonSet, Job or CronJob here has a container "
                "running drainproxy serve or drainproxy wrap",
                "add the drainproxy container (see k8s/ for each style)",
            )
        ]
    for pod in pods:
        for rule in _POD_RULES:
            try:
                findings.extend(rule(ctx, pod))
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                findings.append(_unreadable(pod, rule.__name__, exc))
    return findings


def _unreadable(pod: Pod, rule: str, exc: Exception) -> Finding:
    what = rule.removeprefix("_check_").replace("_", " ")
    return _finding(
        "DP004",
        pod.where(),
        f"a field of the pod spec has a type the {what} rules cannot read ({exc}): the API "
        "server would reject it, and those rules were skipped",
        "validate the manifest (kubectl apply --dry-run=server, or kubeconform) and fix the type",
    )


_WARNING_RULES = {
    "admin-token-placeholder": "DP002",
    "response-timeout-exceeds-drain": "DP003",
}


def config_findings(report: ConfigReport, where: str) -> list[Finding]:
    """The config's own errors (DP001, one each) and warnings, as findings."""
    findings = [
        _finding(
            "DP001",
            where,
            str(error),
            f"change {error.field} as the message says (config/drainproxy.yaml documents "
            "every key)",
        )
        for error in report.errors
    ]
    findings += [
        _finding(_WARNING_RULES[warning.name], where, warning.message, warning.fix)
        for warning in report.warnings
    ]
    return findings


@dataclass(frozen=True)
class PodConfig:
    """The config one workload's drainproxy reads, found through its mounts."""

    workload: ManifestDoc
    #: Its source (``<file>: ConfigMap/<name> data.<key>``); None when not found.
    source: str | None
    #: The file's text; None for the embedded defaults (no ``--config``) or when not found.
    text: str | None
    #: Why it was not found, as a finding.
    problem: Finding | None = None


def pod_configs(docs: Sequence[ManifestDoc]) -> list[PodConfig]:
    """For ``check --manifest`` without ``--config``: each workload running drainproxy with the
    config its ConfigMap holds (the embedded defaults when it runs without ``--config``)."""
    found: list[PodConfig] = []
    for template in pod_templates(docs):
        containers = dict_items(template.spec.get("containers")) + dict_items(
            template.spec.get("initContainers")
        )
        launched = ((c, drainproxy_launch(c)) for c in containers)
        proxy, launch = next(((c, how) for c, how in launched if how is not None), (None, None))
        if proxy is None or launch is None:
            continue
        doc = template.doc
        if launch.config_path is None:
            found.append(PodConfig(doc, "<embedded defaults>", None))
            continue
        location = locate_config(docs, doc, template.spec, proxy, launch.config_path)
        if location.text is not None:
            found.append(PodConfig(doc, location.source, location.text))
            continue
        found.append(
            PodConfig(
                doc,
                None,
                None,
                _finding(
                    "DP602",
                    f"{doc.where} container {proxy.get('name', '?')}",
                    f"drainproxy reads {launch.config_path}, which no ConfigMap among the "
                    "manifests holds: nothing to check this workload against",
                    "pass the ConfigMap's manifest too, or the config file with --config",
                ),
            )
        )
    return found


def workload_docs(docs: Sequence[ManifestDoc], workload: ManifestDoc) -> list[ManifestDoc]:
    """``docs`` with every pod-bearing object but ``workload`` left out."""
    return [d for d in docs if d is workload or d.kind not in _TEMPLATE_PATHS]
