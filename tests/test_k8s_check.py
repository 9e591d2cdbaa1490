"""`drainproxy check --manifest`: every rule fires on a manifest broken in its way, and only then.

Each case starts from a shipped manifest (which passes clean, see test_k8s_manifests.py), breaks
one thing, and expects the rule's code with the telling part of its message.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drainproxy.cli import main
from drainproxy.config.schema import PLACEHOLDER_TOKEN, load_config, read_mapping
from drainproxy.kube import k8scheck
from drainproxy.kube.k8scheck import RULES, check_manifests, config_findings
from drainproxy.kube.manifests import ManifestDoc, parse_manifests

REPO = Path(__file__).resolve().parent.parent
STYLES = {
    "classic": ("k8s/classic-sidecar.yaml", "config/k8s-classic.yaml"),
    "native": ("k8s/native-sidecar.yaml", "config/k8s-native.yaml"),
    "shared-pid": ("k8s/shared-process-namespace.yaml", "config/k8s-shared-pid.yaml"),
    "wrap": ("k8s/wrapper.yaml", "config/k8s-wrap.yaml"),
}
#: The shipped examples carry PLACEHOLDER_TOKEN (DP002); the tests replace it, as users must.
TOKEN = "8c1f0e5a9d2b47e6a3f1c0d9e8b7a6f5"

Docs = list[dict[str, Any]]


def shipped_text(style: str) -> str:
    return (REPO / STYLES[style][0]).read_text().replace(PLACEHOLDER_TOKEN, TOKEN)


@functools.cache
def _shipped_docs(style: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(shipped_text(style)) if doc)


def shipped(style: str) -> Docs:
    return copy.deepcopy(list(_shipped_docs(style)))


def config_text(style: str) -> str:
    return (REPO / STYLES[style][1]).read_text().replace(PLACEHOLDER_TOKEN, TOKEN)


def find(docs: Docs, kind: str) -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == kind)


def pod_spec(docs: Docs) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: Docs, name: str) -> dict[str, Any]:
    spec = pod_spec(docs)
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def config_map_data(docs: Docs) -> dict[str, Any]:
    data: dict[str, Any] = find(docs, "ConfigMap")["data"]
    return data


def lint(style: str, docs: Docs, config_overrides: str = "") -> list[tuple[str, str]]:
    """What ``check`` reports: the config's own findings, then the manifests' (on the config as
    far as it loads)."""
    config_path = STYLES[style][1]
    report = read_mapping(yaml.safe_load(config_text(style) + config_overrides))
    parsed = [ManifestDoc("test.yaml", doc) for doc in docs]
    findings = config_findings(report, config_path)
    findings += check_manifests(report.config, parsed, config_path)
    return [(f.rule.code, f.line()) for f in findings]


@dataclass(frozen=True)
class Case:
    id: str
    style: str
    code: str
    expect: str  # a piece of the finding's line that shows it names the real problem
    breaks: Callable[[Docs], None]
    #: Extra YAML appended to the style's config (later keys override earlier ones).
    config: str = ""


def _set(getter: Callable[[Docs], dict[str, Any]], **values: Any) -> Callable[[Docs], None]:
    def apply(docs: Docs) -> None:
        getter(docs).update(values)

    return apply


def _drop(getter: Callable[[Docs], dict[str, Any]], key: str) -> Callable[[Docs], None]:
    def apply(docs: Docs) -> None:
        del getter(docs)[key]

    return apply


def _app(docs: Docs) -> dict[str, Any]:
    return container(docs, "app")


def _proxy(docs: Docs) -> dict[str, Any]:
    """The container running drainproxy: its own, or the app's in wrapper mode."""
    spec = pod_spec(docs)
    return next(
        c
        for c in spec["containers"] + spec.get("initContainers", [])
        if c["name"] == "drainproxy" or "drainproxy" in c.get("command", [])
    )


def _app_hook(docs: Docs) -> dict[str, Any]:
    hook: dict[str, Any] = _app(docs)["lifecycle"]["preStop"]["httpGet"]
    return hook


def _remove_drainproxy(docs: Docs) -> None:
    spec = pod_spec(docs)
    spec["containers"] = [c for c in spec["containers"] if c["name"] != "drainproxy"]


def _keep_only_services(docs: Docs) -> None:
    docs[:] = [doc for doc in docs if doc["kind"] == "Service"]


def _service_target(target: object) -> Callable[[Docs], None]:
    def apply(docs: Docs) -> None:
        find(docs, "Service")["spec"]["ports"][0]["targetPort"] = target

    return apply


def _app_declares(port: int) -> Callable[[Docs], None]:
    def apply(docs: Docs) -> None:
        _app(docs)["ports"].append({"name": "extra", "containerPort": port})

    return apply


def _config_map_text(edit: Callable[[str], str]) -> Callable[[Docs], None]:
    def apply(docs: Docs) -> None:
        data = config_map_data(docs)
        data["drainproxy.yaml"] = edit(data["drainproxy.yaml"])

    return apply


def _rename_config_map_key(docs: Docs) -> None:
    data = config_map_data(docs)
    data["config.yaml"] = data.pop("drainproxy.yaml")


def _drop_config_map(docs: Docs) -> None:
    docs[:] = [doc for doc in docs if doc["kind"] != "ConfigMap"]


def _root_app_and_image_user_with_cap_kill(docs: Docs) -> None:
    _app(docs)["securityContext"] = {"runAsUser": 0}
    del pod_spec(docs)["securityContext"]["runAsUser"]
    _proxy(docs)["securityContext"]["capabilities"]["add"] = ["KILL"]


def _under_shell(script: str) -> Callable[[Docs], None]:
    def apply(docs: Docs) -> None:
        proxy = _proxy(docs)
        proxy.pop("args", None)
        proxy["command"] = ["/bin/sh", "-c", script]

    return apply


CASES = [
    Case("no drainproxy container", "classic", "DP100", "no Pod, Deployment", _remove_drainproxy),
    Case("only a Service given", "classic", "DP100", "running drainproxy", _keep_only_services),
    Case(
        "grace period shorter than the drain",
        "classic",
        "DP101",
        "drain.readiness_fail_delay 0s + drain.propagation 5s + drain.timeout 15s + "
        "app.stop_timeout 5s + margin 2s = 27s, more than terminationGracePeriodSeconds 20",
        _set(pod_spec, terminationGracePeriodSeconds=20),
    ),
    Case(
        "grace period left at Kubernetes' default",
        "classic",
        "DP101",
        "= 42s, more than terminationGracePeriodSeconds (not set: Kubernetes' default) 30",
        _drop(pod_spec, "terminationGracePeriodSeconds"),
        config="drain: {propagation: 5s, timeout: 30s}\ntermination_grace_period: 45s\n",
    ),
    Case(
        "grace period differs from the config's",
        "native",
        "DP102",
        "termination_grace_period 30s but the pod's terminationGracePeriodSeconds is 60",
        _set(pod_spec, terminationGracePeriodSeconds=60),
    ),
    Case(
        "classic app without a preStop hook",
        "classic",
        "DP201",
        "container app: error DP201 app-prestop-missing: no preStop hook",
        _drop(_app, "lifecycle"),
    ),
    Case(
        "native sidecar's app without its own hook",
        "native",
        "DP201",
        "container app: error DP201 app-prestop-missing: no preStop hook",
        _drop(_app, "lifecycle"),
    ),
    Case(
        "app hook sleeps instead",
        "shared-pid",
        "DP204",
        "the app's preStop hook sleeps 20s, a guess at how long the drain takes",
        _set(_app, lifecycle={"preStop": {"sleep": {"seconds": 20}}}),
    ),
    Case(
        "app exec hook sleeps in a shell",
        "classic",
        "DP204",
        "sleeps 10s, a guess at how long the drain takes",
        _set(_app, lifecycle={"preStop": {"exec": {"command": ["sh", "-c", "sleep 10"]}}}),
    ),
    Case(
        "app hook calls another path",
        "classic",
        "DP204",
        "the app's own preStop hook GET /shutdown runs at once",
        _set(_app_hook, path="/shutdown"),
    ),
    Case(
        "app exec hook stops the app itself",
        "native",
        "DP204",
        "the app's own preStop command (catalina.sh stop) runs at once",
        _set(_app, lifecycle={"preStop": {"exec": {"command": ["catalina.sh", "stop"]}}}),
    ),
    Case(
        "app hook on the proxy port",
        "classic",
        "DP202",
        "port 8080 is not drainproxy's admin port 9901",
        _set(_app_hook, port=8080),
    ),
    Case(
        "app hook on a port name of another container",
        "classic",
        "DP202",
        "port admin is not drainproxy's admin port 9901 (hook port names resolve in the app",
        _set(_app_hook, port="admin"),
    ),
    Case(
        "app exec hook curls the wrong port",
        "classic",
        "DP202",
        "calls http://127.0.0.1:8080/prestop, but drainproxy's admin port is 9901",
        _set(
            _app,
            lifecycle={
                "preStop": {"exec": {"command": ["curl", "-fsS", "http://127.0.0.1:8080/prestop"]}}
            },
        ),
    ),
    Case(
        "app hook without the token",
        "classic",
        "DP203",
        "no X-Drainproxy-Token header while admin.token is set",
        _drop(_app_hook, "httpHeaders"),
    ),
    Case(
        "app hook with a wrong token",
        "native",
        "DP203",
        "X-Drainproxy-Token differs from admin.token",
        _set(_app_hook, httpHeaders=[{"name": "x-drainproxy-token", "value": "stale"}]),
    ),
    Case(
        "app hook while the config sets no token",
        "classic",
        "DP203",
        "admin.token is not set, so drainproxy answers 403",
        lambda docs: None,
        config="admin: {listen: 0.0.0.0:9901, token: null}\n",
    ),
    Case(
        "readiness probe on the app's health path",
        "classic",
        "DP301",
        "not an httpGet of /ready on the admin port 9901",
        _set(_proxy, readinessProbe={"httpGet": {"path": "/healthz", "port": 8000}}),
    ),
    Case(
        "no readiness probe",
        "wrap",
        "DP301",
        "has no readinessProbe: the pod stays an endpoint",
        _drop(_proxy, "readinessProbe"),
    ),
    Case(
        "readiness probe with Kubernetes' default timing",
        "classic",
        "DP302",
        "periodSeconds 10 x failureThreshold 3 = 30s to notice the drain, longer than "
        "drain.propagation 5s",
        _set(_proxy, readinessProbe={"httpGet": {"path": "/ready", "port": "admin"}}),
    ),
    Case(
        "liveness probe on /ready",
        "native",
        "DP303",
        "the livenessProbe checks /ready",
        _set(_proxy, livenessProbe={"httpGet": {"path": "/ready", "port": 9901}}),
    ),
    Case(
        "evidence mode assumes fewer kubelet failures than the probe needs",
        "classic",
        "DP304",
        "counts the kubelet as done after 1 failed probe(s), but the readinessProbe's "
        "failureThreshold is 2",
        lambda docs: None,
        config="drain: {propagation: 5s, timeout: 15s, propagation_mode: evidence,\n"
        "  default_failure_threshold: 1}\n",
    ),
    Case(
        "evidence mode with a kube-probe rule below the probe's threshold",
        "native",
        "DP304",
        "counts the kubelet as done after 1 failed probe(s)",
        lambda docs: None,
        config="drain: {propagation: 5s, timeout: 15s, propagation_mode: evidence,\n"
        "  probers: [{user_agent: '^kube-probe/', failure_threshold: 1}]}\n",
    ),
    Case(
        "Service straight to the app",
        "classic",
        "DP401",
        "port 80 has targetPort 8000, which is not drainproxy's listen port 8080",
        _service_target(8000),
    ),
    Case(
        "Service to the app's port name",
        "native",
        "DP401",
        "targetPort app, which is not drainproxy's listen port",
        _service_target("app"),
    ),
    Case(
        "Service to an undeclared port name",
        "wrap",
        "DP401",
        "targetPort web, which names no container port",
        _service_target("web"),
    ),
    Case(
        "app claims the admin port",
        "classic",
        "DP402",
        "TCP port 9901 is claimed by drainproxy's admin.listen and container app",
        _app_declares(9901),
    ),
    Case(
        "upstream is drainproxy itself",
        "wrap",
        "DP001",
        "upstream.url: 'http://127.0.0.1:8080' is drainproxy's own listen (0.0.0.0:8080)",
        lambda docs: None,
        config="upstream: http://127.0.0.1:8080\n",
    ),
    Case(
        "the shipped placeholder token",
        "classic",
        "DP002",
        "admin.token is a placeholder (shipped in the examples, so public)",
        _set(_app_hook, httpHeaders=[{"name": "X-Drainproxy-Token", "value": PLACEHOLDER_TOKEN}]),
        config=f"admin: {{listen: 0.0.0.0:9901, token: {PLACEHOLDER_TOKEN}}}\n",
    ),
    Case(
        "responses allowed to take longer than the drain",
        "native",
        "DP003",
        "upstream.response_timeout 1m30s exceeds drain.timeout 15s",
        lambda docs: None,
        config="upstream: {url: 'http://127.0.0.1:8000', response_timeout: 1m30s}\n",
    ),
    Case(
        "readiness periodSeconds as a duration string",
        "classic",
        "DP004",
        "readinessProbe.periodSeconds is '1s', not an integer: the API server rejects",
        lambda docs: _proxy(docs)["readinessProbe"].update(periodSeconds="1s"),
    ),
    Case(
        "grace period as a string",
        "native",
        "DP004",
        "spec.terminationGracePeriodSeconds is '30', not an integer",
        _set(pod_spec, terminationGracePeriodSeconds="30"),
    ),
    Case(
        "app listens on another port than upstream.url's",
        "classic",
        "DP403",
        "upstream.url http://127.0.0.1:8000 goes to port 8000, which no app container declares "
        "(container app declare 8080",
        lambda docs: _app(docs)["ports"][0].update(containerPort=8080),
    ),
    Case(
        "app declares no ports",
        "shared-pid",
        "DP404",
        "container app declare no ports",
        _drop(_app, "ports"),
    ),
    Case(
        "pod runs as root, drainproxy must not",
        "classic",
        "DP507",
        "runAsNonRoot is true but the container would run as user 0 (from the pod's "
        "securityContext.runAsUser: 0)",
        lambda docs: pod_spec(docs)["securityContext"].update(runAsUser=0),
    ),
    Case(
        "signal stop without a shared process namespace",
        "shared-pid",
        "DP501",
        "app.stop is signal, but without shareProcessNamespace",
        _drop(pod_spec, "shareProcessNamespace"),
    ),
    Case(
        "signal stop across users",
        "shared-pid",
        "DP502",
        "runs as user 0, drainproxy as 10001",
        _set(_app, securityContext={"runAsUser": 0}),
    ),
    Case(
        "signal stop to a root app from the image's user, CAP_KILL notwithstanding",
        "shared-pid",
        "DP502",
        "runs as user 0, drainproxy as 10001",
        _root_app_and_image_user_with_cap_kill,
    ),
    Case(
        "native sidecar without a preStop",
        "native",
        "DP503",
        "its preStop does not start the drain",
        _drop(_proxy, "lifecycle"),
    ),
    Case(
        "native sidecar's preStop is GET /prestop",
        "native",
        "DP503",
        "its preStop is GET /prestop, which counts as the app's hook",
        _set(
            _proxy,
            lifecycle={"preStop": {"httpGet": {"path": "/prestop", "port": 9901}}},
        ),
    ),
    Case(
        "init container without restartPolicy Always",
        "native",
        "DP504",
        "init container without restartPolicy: Always",
        _drop(_proxy, "restartPolicy"),
    ),
    Case(
        "drainproxy under sh -c",
        "classic",
        "DP505",
        "started by a shell (sh -c) without exec",
        _under_shell("drainproxy serve --config /etc/drainproxy/drainproxy.yaml"),
    ),
    Case(
        "wrap under sh -c",
        "wrap",
        "DP505",
        "started by a shell (sh -c) without exec",
        _under_shell("drainproxy wrap --config /etc/drainproxy/drainproxy.yaml -- /app/run.sh"),
    ),
    Case(
        "wrap with a stop method of the sidecar styles",
        "wrap",
        "DP506",
        "runs drainproxy wrap, which refuses config/k8s-wrap.yaml: app.stop: 'http' is not used",
        lambda docs: None,
        config="app: {stop: http, url: 'http://127.0.0.1:8000/quit'}\n",
    ),
    Case(
        "ConfigMap drifted from the config",
        "classic",
        "DP601",
        "differs from config/k8s-classic.yaml at drain.propagation (5s given, 4s in the pod)",
        _config_map_text(lambda text: text.replace("propagation: 5s", "propagation: 4s")),
    ),
    Case(
        "drainproxy started without --config",
        "classic",
        "DP601",
        "runs without --config, on its embedded defaults, which differ",
        _set(_proxy, args=["serve"]),
    ),
    Case(
        "ConfigMap not among the manifests",
        "native",
        "DP602",
        "from ConfigMap web-drainproxy, which is not in the manifests given",
        _drop_config_map,
    ),
    Case(
        "config path not on a mounted volume",
        "shared-pid",
        "DP602",
        "reads /etc/drainproxy/drainproxy.yaml from the image",
        _drop(_proxy, "volumeMounts"),
    ),
    Case(
        "ConfigMap key renamed",
        "wrap",
        "DP603",
        "has no key 'drainproxy.yaml'",
        _rename_config_map_key,
    ),
    Case(
        "ConfigMap holds an invalid config",
        "classic",
        "DP604",
        "drain.propagation: 'soon' must be a duration",
        _config_map_text(lambda text: text.replace("propagation: 5s", "propagation: soon")),
    ),
]


def test_every_rule_has_a_broken_manifest_case() -> None:
    assert {case.code for case in CASES} == set(RULES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rule_fires_on_its_broken_manifest(case: Case) -> None:
    docs = shipped(case.style)
    assert lint(case.style, docs) == [], "the shipped manifest must pass clean"
    broken = copy.deepcopy(docs)
    case.breaks(broken)
    findings = lint(case.style, broken, case.config)
    lines = [line for code, line in findings if code == case.code]
    assert lines, f"{case.code} not reported; got:\n" + "\n".join(line for _, line in findings)
    assert any(case.expect in line for line in lines), "\n".join(lines)
    assert all(" fix: " in line for _, line in findings)


def test_exec_drainproxy_drain_as_a_native_sidecar_hook_is_accepted_in_a_shell() -> None:
    docs = shipped("native")
    script = "exec drainproxy drain --config /etc/drainproxy/drainproxy.yaml"
    _proxy(docs)["lifecycle"] = {"preStop": {"exec": {"command": ["sh", "-c", script]}}}
    assert lint("native", docs) == []


def test_exec_into_drainproxy_from_a_shell_is_pid1_and_passes() -> None:
    docs = shipped("classic")
    _under_shell("exec drainproxy serve --config /etc/drainproxy/drainproxy.yaml")(docs)
    assert lint("classic", docs) == []


def test_admin_port_service_for_metrics_is_allowed() -> None:
    docs = shipped("classic")
    metrics = copy.deepcopy(find(docs, "Service"))
    metrics["metadata"]["name"] = "web-metrics"
    metrics["spec"]["ports"] = [{"name": "metrics", "port": 9901, "targetPort": "admin"}]
    assert lint("classic", [*docs, metrics]) == []


def test_a_service_selecting_other_pods_is_not_judged() -> None:
    docs = shipped("classic")
    other = copy.deepcopy(find(docs, "Service"))
    other["spec"]["selector"] = {"app.kubernetes.io/name": "other"}
    other["spec"]["ports"][0]["targetPort"] = 5432
    assert lint("classic", [*docs, other]) == []


def _as_kind(kind: str, docs: Docs) -> Docs:
    deployment = find(docs, "Deployment")
    template = deployment["spec"]["template"]
    meta = {"name": "web"}
    if kind == "Pod":
        workload = {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, **template["metadata"]}}
        workload["spec"] = template["spec"]
    elif kind == "Job":
        template["spec"]["restartPolicy"] = "Never"
        workload = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta}
        workload["spec"] = {"template": template}
    elif kind == "CronJob":
        template["spec"]["restartPolicy"] = "Never"
        workload = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta}
        workload["spec"] = {"schedule": "@hourly", "jobTemplate": {"spec": {"template": template}}}
    else:
        workload = {"apiVersion": "apps/v1", "kind": kind, "metadata": meta}
        workload["spec"] = {"selector": deployment["spec"]["selector"], "template": template}
    return [workload if doc is deployment else doc for doc in docs]


@pytest.mark.parametrize("kind", ["Pod", "StatefulSet", "DaemonSet", "Job", "CronJob"])
def test_every_workload_kind_is_read(kind: str) -> None:
    docs = _as_kind(kind, shipped("classic"))
    assert lint("classic", docs) == []
    next(c for c in _pod_spec_of(docs[1])["containers"] if c["name"] == "app").pop("lifecycle")
    findings = lint("classic", docs)
    assert [code for code, _ in findings] == ["DP201"]
    assert f"test.yaml: {kind}/web container app:" in findings[0][1]


def _pod_spec_of(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Pod":
        spec: dict[str, Any] = workload["spec"]
    elif workload["kind"] == "CronJob":
        spec = workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    else:
        spec = workload["spec"]["template"]["spec"]
    return spec


def test_a_kubectl_list_is_read_item_by_item() -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": shipped("native")}
    docs = parse_manifests(yaml.safe_dump(listed), "list.yaml")
    assert [doc.kind for doc in docs] == [doc["kind"] for doc in shipped("native")]


# --- the command line ----------------------------------------------------------------------


def write_manifest(tmp_path: Path, docs: Docs) -> str:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def write_config(tmp_path: Path, style: str, text: str | None = None) -> str:
    """The style's config (its token replaced) as a file, for the command line."""
    path = tmp_path / Path(STYLES[style][1]).name
    path.write_text(config_text(style) if text is None else text)
    return str(path)


def test_cli_exits_1_on_errors_with_one_line_per_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = shipped("classic")
    pod_spec(docs)["terminationGracePeriodSeconds"] = 20
    _app(docs).pop("lifecycle")
    manifest = write_manifest(tmp_path, docs)
    config = write_config(tmp_path, "classic")
    assert main(["check", "--config", config, "--manifest", manifest]) == 1
    lines = capsys.readouterr().out.splitlines()
    codes = [re.search(r": (?:error|warning) (DP\d+) ", line) for line in lines[:-1]]
    assert [code.group(1) if code else line for code, line in zip(codes, lines, strict=False)] == [
        "DP101",
        "DP102",
        "DP201",
    ]
    assert lines[-1] == f"{config} with {manifest}: 2 error(s), 1 warning(s)"


def test_cli_exits_0_on_warnings_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = [doc for doc in shipped("classic") if doc["kind"] != "ConfigMap"]
    manifest = write_manifest(tmp_path, docs)
    config = write_config(tmp_path, "classic")
    assert main(["check", "--config", config, "--manifest", manifest]) == 0
    assert ": warning DP602 config-unverifiable: " in capsys.readouterr().out


def test_cli_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = shipped("native")
    _proxy(docs).pop("lifecycle")
    manifest = write_manifest(tmp_path, docs)
    config = write_config(tmp_path, "native")
    argv = ["check", "--config", config, "--manifest", manifest, "--format", "json"]
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == 1 and report["warnings"] == 0
    (finding,) = report["findings"]
    assert finding["code"] == "DP503"
    assert finding["severity"] == "error"
    assert finding["where"] == f"{manifest}: Deployment/web container drainproxy"
    assert finding["fix"].startswith("lifecycle.preStop.exec.command: [drainproxy, drain")


def test_cli_without_manifests_still_just_validates_the_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--config", "config/drainproxy.yaml"]) == 0
    assert capsys.readouterr().out == "config/drainproxy.yaml: ok\n"


def test_cli_unreadable_manifest_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    assert main(["check", "--config", "config/drainproxy.yaml", "--manifest", str(bad)]) == 2
    assert f"drainproxy: manifest error: {bad}: not valid YAML" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    argv = ["check", "--config", "config/drainproxy.yaml", "--manifest", str(missing)]
    assert main([*argv, "--format", "json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["error"].startswith(f"manifest error: {missing}: cannot be read")


def test_cli_reports_every_config_error_and_every_manifest_finding_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Config errors are findings (DP001), and the manifests are still checked, on the config as
    far as it loads: nothing hides behind the first error."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "upstream: http://127.0.0.1:8000\ndrain: {timeout: 40s, propagation: soon}\n"
        "log: {level: loud}\n"
    )
    docs = shipped("classic")
    _app(docs).pop("lifecycle")
    manifest = write_manifest(tmp_path, docs)
    assert main(["check", "--config", str(config), "--manifest", manifest]) == 2
    out = capsys.readouterr().out
    assert f"{config}: error DP001 config-invalid: drain.propagation: 'soon' must be a dur" in out
    assert f"{config}: error DP001 config-invalid: log.level: 'loud' must be one of" in out
    assert "drain.timeout 40s + app.stop_timeout 3s + margin 2s = 50s, more than" in out  # DP101
    assert "container app: error DP201 app-prestop-missing: no preStop hook" in out
    assert "Traceback" not in out


def test_cli_reports_a_cross_field_config_error_with_durations_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstream: http://127.0.0.1:8000\ndrain: {timeout: 1m30s}\n")
    assert main(["check", "--config", str(config), "--format", "json"]) == 2
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert finding["code"] == "DP001"
    assert finding["message"].startswith(
        "termination_grace_period: 30s is shorter than the shutdown needs: "
        "drain.readiness_fail_delay 0s + drain.propagation 5s + drain.timeout 1m30s + "
        "app.stop_timeout 3s + margin 2s = 1m40s; raise it to at least 1m40s"
    )


def test_grace_budget_sum_is_the_config_budget() -> None:
    config = load_config(REPO / STYLES["classic"][1])
    total = sum(seconds for _, seconds in config.shutdown_budget())
    docs = shipped("classic")
    pod_spec(docs)["terminationGracePeriodSeconds"] = int(total)
    assert lint("classic", docs) == [("DP102", ANY)]
    pod_spec(docs)["terminationGracePeriodSeconds"] = int(total) - 1
    parsed = [ManifestDoc("t.yaml", doc) for doc in docs]
    (line,) = [f.line() for f in check_manifests(config, parsed) if f.rule.code == "DP101"]
    assert f"= {total:g}s, more than terminationGracePeriodSeconds {int(total) - 1}:" in line


def test_every_rule_is_documented_with_its_name_and_severity() -> None:
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    for rule in RULES.values():
        assert f"| {rule.code} | `{rule.name}` | {rule.severity.value} |" in docs, rule.code


# --- issue 15: check tells the truth --------------------------------------------------------


def _in_namespace(docs: Docs, kind: str, namespace: str) -> None:
    find(docs, kind)["metadata"]["namespace"] = namespace


def test_a_service_without_namespace_is_in_the_workloads() -> None:
    """``kubectl apply -n`` puts an object without metadata.namespace where the workload that
    names one goes: the Service still selects the pod, and the ConfigMap is found."""
    docs = shipped("classic")
    _in_namespace(docs, "Deployment", "default")
    assert lint("classic", docs) == []
    find(docs, "Service")["spec"]["ports"][0]["targetPort"] = 8000
    assert [code for code, _ in lint("classic", docs)] == ["DP401"]


def test_objects_in_two_named_namespaces_do_not_meet() -> None:
    docs = shipped("classic")
    _in_namespace(docs, "Deployment", "shop")
    _in_namespace(docs, "Service", "other")
    _in_namespace(docs, "ConfigMap", "other")
    find(docs, "Service")["spec"]["ports"][0]["targetPort"] = 8000
    assert [code for code, _ in lint("classic", docs)] == ["DP602"]


def test_two_containers_naming_a_port_http_get_no_circular_advice() -> None:
    """Kubernetes resolves a targetPort name to the first container declaring it; the advice
    must not be "use the name http" when http is the app's."""
    docs = shipped("classic")
    _app(docs)["ports"][0]["name"] = "http"
    findings = lint("classic", docs)
    assert [code for code, _ in findings] == ["DP401"]
    line = findings[0][1]
    assert (
        "container app and container drainproxy all give a port: Kubernetes resolves it to "
        "the first, container app's 8000" in line
    )
    fix = line.split("; fix: ", 1)[1]
    assert "rename container app's port http" in fix
    assert "targetPort: 8080" in fix
    assert "targetPort: http" not in fix


def test_targetport_advice_names_drainproxys_port_when_the_name_is_its_own() -> None:
    docs = shipped("native")
    find(docs, "Service")["spec"]["ports"][0]["targetPort"] = 8000
    (line,) = [line for code, line in lint("native", docs) if code == "DP401"]
    assert line.endswith("fix: set targetPort: http (drainproxy's port 8080)")


def test_a_non_root_container_that_sets_its_own_user_may_run_in_a_root_pod() -> None:
    docs = shipped("classic")
    pod_spec(docs)["securityContext"]["runAsUser"] = 0
    _proxy(docs)["securityContext"]["runAsUser"] = 10001
    assert lint("classic", docs) == []
    _proxy(docs)["securityContext"]["runAsUser"] = 0
    (line,) = [line for code, line in lint("classic", docs) if code == "DP507"]
    assert "(from its own securityContext)" in line


def test_a_chained_exec_prestop_that_waits_first_is_accepted() -> None:
    docs = shipped("classic")
    script = "wget -q -O /dev/null http://127.0.0.1:9901/prestop; exec catalina.sh stop"
    _app(docs)["lifecycle"] = {"preStop": {"exec": {"command": ["sh", "-c", script]}}}
    assert lint("classic", docs) == []


def test_the_chaining_advice_keeps_the_apps_own_command() -> None:
    docs = shipped("classic")
    _app(docs)["lifecycle"] = {"preStop": {"exec": {"command": ["catalina.sh", "stop", "30"]}}}
    (line,) = [line for code, line in lint("classic", docs) if code == "DP204"]
    assert "wget -q -O /dev/null http://127.0.0.1:9901/prestop" in line
    assert "; catalina.sh stop 30" in line
    assert "DP201" not in line and "missing" not in line


def test_an_http_prestop_of_the_app_is_moved_to_app_stop_http() -> None:
    docs = shipped("classic")
    _app_hook(docs).update(path="/quit", port="app")
    (line,) = [line for code, line in lint("classic", docs) if code == "DP204"]
    assert "app.stop: http, app.url: http://127.0.0.1:8000/quit, app.method: GET" in line


def test_upstream_port_declared_by_a_second_app_container_is_enough() -> None:
    docs = shipped("classic")
    _app(docs)["ports"][0]["containerPort"] = 8081
    spec = pod_spec(docs)
    spec["containers"].insert(
        0,
        {
            "name": "helper",
            "image": "x",
            "ports": [{"containerPort": 8000}],
            "lifecycle": copy.deepcopy(_app(docs)["lifecycle"]),
        },
    )
    assert [code for code, _ in lint("classic", docs)] == []


def test_tokens_never_appear_in_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Findings end up in CI logs: no value of admin.token is printed, good or bad."""
    docs = shipped("classic")
    _app_hook(docs)["httpHeaders"][0]["value"] = "the-pods-own-secret-0001"
    data = config_map_data(docs)
    data["drainproxy.yaml"] = data["drainproxy.yaml"].replace(TOKEN, "the-configmap-secret-02")
    manifest = write_manifest(tmp_path, docs)
    config = write_config(tmp_path, "classic")
    for output in ("text", "json"):
        assert main(["check", "--config", config, "--manifest", manifest, "--format", output]) == 1
        out = capsys.readouterr().out
        assert "admin.token (the values differ; not shown)" in out
        assert "DP203" in out
        for secret in (TOKEN, "the-pods-own-secret-0001", "the-configmap-secret-02"):
            assert secret not in out
    bad = write_config(
        tmp_path, "classic", config_text("classic").replace(TOKEN, "[" + TOKEN + "]")
    )
    assert main(["check", "--config", bad]) == 2
    out = capsys.readouterr().out
    assert "admin.token: <hidden> must be a non-empty string" in out
    assert TOKEN not in out


def test_manifest_without_config_reads_the_pods_configmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--manifest`` alone: the config is what the pod mounts, and ``-`` is stdin."""
    monkeypatch.setattr("sys.stdin", io.StringIO(shipped_text("native")))
    assert main(["check", "--manifest", "-"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("ConfigMap/web-drainproxy data.drainproxy.yaml with -: ok\n"), out
    docs = shipped("native")
    data = config_map_data(docs)
    data["drainproxy.yaml"] = data["drainproxy.yaml"].replace("propagation: 5s", "propagation: 1s")
    manifest = write_manifest(tmp_path, docs)
    assert main(["check", "--manifest", manifest]) == 1
    out = capsys.readouterr().out
    assert "error DP302 readiness-probe-slow" in out and "drain.propagation 1s" in out
    assert "DP601" not in out


def test_manifest_without_config_reports_the_configmaps_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = shipped("classic")
    data = config_map_data(docs)
    data["drainproxy.yaml"] += "drain: {timeout: 15s}\n"  # a second drain key
    manifest = write_manifest(tmp_path, docs)
    assert main(["check", "--manifest", manifest]) == 2
    out = capsys.readouterr().out
    assert (
        f"{manifest}: ConfigMap/web-drainproxy data.drainproxy.yaml: error DP001 config-invalid: "
        f"config: '{manifest}: ConfigMap/web-drainproxy data.drainproxy.yaml' is not valid YAML: "
        "line " in out
    )
    assert "duplicate key 'drain' (first at line" in out


def test_manifest_without_config_and_without_its_configmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [doc for doc in shipped("classic") if doc["kind"] != "ConfigMap"]
    assert main(["check", "--manifest", write_manifest(tmp_path, docs)]) == 0
    assert (
        "DP602 config-unverifiable: drainproxy reads /etc/drainproxy/drainproxy.yaml, which "
        "no ConfigMap among the manifests holds" in capsys.readouterr().out
    )
    assert main(["check", "--manifest", write_manifest(tmp_path, [find(docs, "Service")])]) == 2
    assert "pass --config" in capsys.readouterr().err


def test_a_directory_of_manifests_is_read_like_kubectl_apply_f(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = shipped("wrap")
    (tmp_path / "deploy").mkdir()
    for index, doc in enumerate(docs):
        suffix = ".json" if doc["kind"] == "Service" else ".yaml"
        text = json.dumps(doc) if suffix == ".json" else yaml.safe_dump(doc)
        (tmp_path / "deploy" / f"{index}-{doc['kind'].lower()}{suffix}").write_text(text)
    (tmp_path / "deploy" / "README.md").write_text("not a manifest\n")
    config = write_config(tmp_path, "wrap")
    assert main(["check", "--config", config, "--manifest", str(tmp_path / "deploy")]) == 0
    find(docs, "Service")["spec"]["ports"][0]["targetPort"] = 8000
    (tmp_path / "deploy" / "2-service.json").write_text(json.dumps(find(docs, "Service")))
    assert main(["check", "--config", config, "--manifest", str(tmp_path / "deploy")]) == 1
    assert f"{tmp_path / 'deploy' / '2-service.json'}: Service/web: error DP401" in (
        capsys.readouterr().out
    )


def test_a_duplicate_key_in_a_manifest_is_refused_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "dup.yaml"
    manifest.write_text("kind: Service\nmetadata: {name: a}\nmetadata: {name: b}\n")
    assert main(["check", "--config", "config/drainproxy.yaml", "--manifest", str(manifest)]) == 2
    assert (
        f"manifest error: {manifest}: not valid YAML: line 3, column 1: duplicate key "
        "'metadata' (first at line 2)" in capsys.readouterr().err
    )


_SCALARS = st.one_of(
    st.text(max_size=5), st.integers(-2, 70000), st.booleans(), st.none(), st.floats()
)
_WRONG = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=3), _SCALARS, max_size=2),
)


def _paths(node: object, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _paths(value, (*path, key))] + [path]
    if isinstance(node, list):
        return [p for index, value in enumerate(node) for p in _paths(value, (*path, index))] + [
            path
        ]
    return [path]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(STYLES)), st.data())
def test_no_manifest_value_of_a_wrong_type_raises(style: str, data: st.DataObject) -> None:
    """Whatever a field holds (``periodSeconds: "1s"``, a list for a map), check reports
    findings and never raises."""
    docs = shipped(style)
    for _ in range(3):
        doc_index = data.draw(st.integers(0, len(docs) - 1))
        path = data.draw(st.sampled_from([p for p in _paths(docs[doc_index]) if p]))
        node: Any = docs[doc_index]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = data.draw(_WRONG)
    lint(style, docs)


def test_a_rule_that_cannot_read_a_field_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last line of defence behind the typed reads: a rule tripping over a type nobody
    foresaw reports DP004 and the other rules still run."""

    def _check_something(ctx: object, pod: object) -> list[Any]:
        raise TypeError("'float' object is not iterable")

    monkeypatch.setattr(
        "drainproxy.kube.k8scheck._POD_RULES", (_check_something, *k8scheck._POD_RULES)
    )
    docs = shipped("classic")
    _app(docs).pop("lifecycle")
    findings = lint("classic", docs)
    assert [code for code, _ in findings] == ["DP004", "DP201"]
    assert "the something rules cannot read ('float' object is not iterable)" in findings[0][1]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_check_imports_neither_aiohttp_nor_the_data_path(style: str) -> None:
    """``check`` runs in CI and in admission paths: no HTTP framework, no proxy (issue 13)."""
    manifest, config = STYLES[style]
    script = (
        "import sys\n"
        "from drainproxy.cli import main\n"
        f"main(['check', '--config', {config!r}, '--manifest', {manifest!r}])\n"
        "banned = ('aiohttp', 'drainproxy.dataplane', 'drainproxy.control.server',\n"
        "          'drainproxy.control.wrapper')\n"
        "print(sorted(m for m in sys.modules if m.startswith(banned)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.splitlines()[-1] == "[]", result.stdout + result.stderr


def test_a_shell_scripts_own_command_is_quoted_as_written() -> None:
    docs = shipped("classic")
    hook = {"exec": {"command": ["/bin/sh", "-c", "catalina.sh stop"]}}
    _app(docs)["lifecycle"] = {"preStop": hook}
    (line,) = [line for code, line in lint("classic", docs) if code == "DP204"]
    assert "the app's own preStop command (catalina.sh stop) runs at once" in line
    assert "/prestop; catalina.sh stop" in line


def test_a_port_name_shared_by_two_app_containers_is_not_called_drainproxys() -> None:
    docs = shipped("classic")
    _app(docs)["ports"][0]["name"] = "web"
    helper = {"name": "helper", "image": "x", "ports": [{"name": "web", "containerPort": 7000}]}
    helper["lifecycle"] = copy.deepcopy(_app(docs)["lifecycle"])
    pod_spec(docs)["containers"].append(helper)
    find(docs, "Service")["spec"]["ports"][0]["targetPort"] = "web"
    (line,) = [line for code, line in lint("classic", docs) if code == "DP401"]
    assert "has targetPort web, which is not drainproxy's listen port 8080" in line
    assert "rename" not in line


def test_the_upstream_port_rule_judges_only_loopback_upstreams_of_sidecars() -> None:
    docs = shipped("classic")
    elsewhere = "upstream: {url: 'http://app.internal:5432', response_timeout: 15s}\n"
    assert [code for code, _ in lint("classic", docs, elsewhere)] == ["DP601"]  # not DP403
    wrap = shipped("wrap")
    shipper = {"name": "log-shipper", "image": "x", "ports": [{"containerPort": 24224}]}
    pod_spec(wrap)["containers"].append(shipper)
    assert lint("wrap", wrap) == []


def test_a_configmap_items_mapping_is_followed_to_its_key() -> None:
    docs = shipped("classic")
    volume = pod_spec(docs)["volumes"][0]
    volume["configMap"]["items"] = [
        {"key": "other.yaml", "path": "other.yaml"},
        {"key": "drainproxy.yaml", "path": "config.yaml"},
    ]
    config_map_data(docs)["other.yaml"] = "not: a drainproxy config\n"
    _proxy(docs)["args"] = ["serve", "--config", "/etc/drainproxy/config.yaml"]
    assert lint("classic", docs) == []


def test_an_optional_section_on_one_side_only_is_a_difference() -> None:
    docs = shipped("classic")
    _config_map_text(lambda text: text.replace("http://127.0.0.1:8000", "https://127.0.0.1:8000"))(
        docs
    )
    (line,) = [line for code, line in lint("classic", docs) if code == "DP601"]
    assert "upstream.tls (not set given, set in the pod)" in line


def test_a_service_on_another_port_of_drainproxys_container_is_told_the_listen_port() -> None:
    docs = shipped("classic")
    _proxy(docs)["ports"].append({"name": "debug", "containerPort": 9999})
    find(docs, "Service")["spec"]["ports"][0]["targetPort"] = "debug"
    (line,) = [line for code, line in lint("classic", docs) if code == "DP401"]
    assert "targetPort debug, which is not drainproxy's listen port 8080" in line
    assert line.endswith("fix: set targetPort: http (drainproxy's port 8080)")
