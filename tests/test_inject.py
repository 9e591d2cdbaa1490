"""`drainproxy inject` on realistic manifests (tests/manifests/): every output is valid Kubernetes,
passes `drainproxy check`, sends each Service's traffic through drainproxy by Kubernetes' own
port rules, and comes out unchanged when injected again."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes_validate.utils import latest_version

from drainproxy.config.schema import load_config
from drainproxy.kube.inject import (
    InjectError,
    InjectOptions,
    Input,
    inject_documents,
    inject_pod,
    parse_text,
    render,
)
from drainproxy.kube.k8scheck import check_manifests
from drainproxy.kube.manifests import POD_SPEC, ManifestDoc, type_errors
from tests.support import free_port

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "tests" / "manifests"
NEWEST = ".".join(latest_version().split(".")[:2])
#: Native sidecars (an init container's restartPolicy) are in the schema from this version.
NATIVE_SIDECAR_VERSION = "1.29"
UNPROXIED = "drainproxy.io/unproxied-ports"
WORKLOAD_TEMPLATES = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
}
INJECTED = ["wordpress.yaml", "rails.yaml", "tomcat.yaml", "statefulset.yaml", "list-export.json"]

Obj = dict[str, Any]


def inject(
    *args: str, stdin: str | None = None, token_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DRAINPROXY_TOKEN_KEY"}
    if token_key is not None:
        env["DRAINPROXY_TOKEN_KEY"] = token_key
    return subprocess.run(
        [sys.executable, "-m", "drainproxy", "inject", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@functools.cache
def injected(name: str) -> str:
    """The output of inject for a file of tests/manifests (made once per test run)."""
    result = inject(str(MANIFESTS / name))
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(text: str) -> list[Obj]:
    """Every Kubernetes object of a YAML stream or JSON text, List items included."""
    docs = [json.loads(text)] if text.lstrip().startswith("{") else yaml.safe_load_all(text)
    found: list[Obj] = []
    for doc in docs:
        if doc:
            found += doc["items"] if doc["kind"] == "List" else [doc]
    return found


def template(obj: Obj) -> Obj:
    node: Obj = obj
    for key in WORKLOAD_TEMPLATES[obj["kind"]]:
        node = node[key]
    return node


def workloads(objs: list[Obj]) -> list[Obj]:
    return [obj for obj in objs if obj["kind"] in WORKLOAD_TEMPLATES]


def drainproxy_container(spec: Obj) -> Obj:
    containers = spec["containers"] + spec.get("initContainers", [])
    found: Obj = next(c for c in containers if c["name"] == "drainproxy")
    return found


def resolve(spec: Obj, service_port: Obj) -> int | None:
    """The pod port a Service port reaches, by Kubernetes' rules (FindPort): a number (the
    Service's port when targetPort is absent) as is; a name looked up with the same protocol in
    the regular containers, then in native sidecars (init containers with restartPolicy
    Always); None when no port has the name."""
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int):
        return target
    protocol = service_port.get("protocol", "TCP")
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    for container in spec["containers"] + sidecars:
        for port in container.get("ports", []):
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                number: int = port["containerPort"]
                return number
    return None


def selects(service: Obj, workload: Obj) -> bool:
    selector = service["spec"].get("selector") or {}
    labels = template(workload)["metadata"].get("labels", {})
    namespaces = {service["metadata"].get("namespace"), workload["metadata"].get("namespace")}
    same_namespace = len(namespaces - {None}) <= 1
    return bool(selector) and same_namespace and selector.items() <= labels.items()


# ---------------------------------------------------------------------------------------------
# Every injected manifest


@pytest.mark.parametrize("name", INJECTED)
def test_output_is_valid_kubernetes(name: str) -> None:
    for obj in objects(injected(name)):
        for version in (NATIVE_SIDECAR_VERSION, NEWEST):
            assert kubernetes_validate.validate(obj, version, strict=True) == version


@pytest.mark.parametrize("name", INJECTED)
def test_output_passes_check_with_no_finding(name: str, tmp_path: Path) -> None:
    output = tmp_path / f"injected-{name}"
    output.write_text(injected(name))
    (config_map,) = [
        o
        for o in objects(output.read_text())
        if o["metadata"]["name"].endswith("-drainproxy") and o["kind"] == "ConfigMap"
    ]
    config = tmp_path / "drainproxy.yaml"
    config.write_text(config_map["data"]["drainproxy.yaml"])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "drainproxy",
            "check",
            "--config",
            str(config),
            "--manifest",
            str(output),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stdout)
    assert (result.returncode, report["findings"]) == (0, [])  # not even a warning


@pytest.mark.parametrize("name", INJECTED)
def test_every_service_reaches_drainproxy_or_a_port_marked_unproxied(name: str) -> None:
    objs = objects(injected(name))
    services = [o for o in objs if o["kind"] == "Service"]
    checked = 0
    for workload in workloads(objs):
        spec = template(workload)["spec"]
        listen = drainproxy_container(spec)["ports"][0]["containerPort"]
        marked = template(workload)["metadata"]["annotations"].get(UNPROXIED, "")
        unproxied = {int(port) for port in marked.split(",") if port}
        for service in (s for s in services if selects(s, workload)):
            for port in service["spec"]["ports"]:
                reached = resolve(spec, port)
                assert reached == listen or reached in unproxied, (service, port, reached)
                checked += reached == listen
    assert checked, "no Service port reaches drainproxy"


@pytest.mark.parametrize("name", INJECTED)
def test_injecting_again_changes_nothing(name: str) -> None:
    once = injected(name)
    again = inject("-", stdin=once)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout == once


@pytest.mark.parametrize("name", INJECTED)
def test_same_documents_in_the_same_order_with_a_configmap_before_the_workload(name: str) -> None:
    before = objects((MANIFESTS / name).read_text())
    after = objects(injected(name))
    added = [o for o in after if o not in before and o["kind"] == "ConfigMap"]
    kept = [(o["kind"], o["metadata"]["name"]) for o in after if o not in added]
    assert kept == [(o["kind"], o["metadata"]["name"]) for o in before]
    (config_map,) = added
    workload = workloads(after)[0]
    assert after.index(config_map) == after.index(workload) - 1
    assert config_map["metadata"].get("namespace") == workload["metadata"].get("namespace")
    volumes = template(workload)["spec"]["volumes"]
    assert {"name": "drainproxy-config", "configMap": {"name": config_map["metadata"]["name"]}} in (
        volumes
    )


@pytest.mark.parametrize("name", INJECTED)
def test_the_app_keeps_its_port_and_drainproxy_forwards_to_it(name: str) -> None:
    before = {o["metadata"]["name"]: o for o in workloads(objects((MANIFESTS / name).read_text()))}
    for workload in workloads(objects(injected(name))):
        spec = template(workload)["spec"]
        config_map = next(
            o
            for o in objects(injected(name))
            if o["kind"] == "ConfigMap"
            and o["metadata"]["name"] == f"{workload['metadata']['name']}-drainproxy"
        )
        config = yaml.safe_load(config_map["data"]["drainproxy.yaml"])
        app_port = int(config["upstream"]["url"].rsplit(":", 1)[1])
        original = template(before[workload["metadata"]["name"]])["spec"]["containers"][0]
        app = spec["containers"][0]
        assert [p["containerPort"] for p in original.get("ports", [])] == [
            p["containerPort"] for p in app["ports"]
        ][: len(original.get("ports", []))]
        assert app_port in [p["containerPort"] for p in app["ports"]]
        own = [p["containerPort"] for p in drainproxy_container(spec)["ports"]]
        declared = [
            p["containerPort"]
            for c in spec["containers"]
            if c["name"] != "drainproxy"
            for p in c.get("ports", [])
        ]
        assert not set(own) & set(declared)
        assert config["listen"].endswith(f":{own[0]}")
        assert config["admin"]["listen"].endswith(f":{own[1]}")


@pytest.mark.parametrize("name", INJECTED)
def test_drainproxy_runs_as_its_own_non_root_user_whatever_the_pod_says(name: str) -> None:
    for workload in workloads(objects(injected(name))):
        context = drainproxy_container(template(workload)["spec"])["securityContext"]
        assert context["runAsUser"] == 10001
        assert context["runAsNonRoot"] is True


# ---------------------------------------------------------------------------------------------
# Each manifest's own point


def only_workload(name: str) -> Obj:
    (workload,) = workloads(objects(injected(name)))
    return workload


def test_helm_wordpress_fronts_http_and_leaves_https_to_the_app() -> None:
    objs = objects(injected("wordpress.yaml"))
    deployment = workloads(objs)[0]
    spec = template(deployment)["spec"]
    assert spec["securityContext"]["runAsUser"] == 0  # the app still runs as it did
    proxy = drainproxy_container(spec)
    assert proxy in spec["containers"] and "restartPolicy" not in proxy
    assert "lifecycle" not in proxy  # the kubelet's SIGTERM starts its drain
    assert proxy["ports"][0] == {"name": "http", "containerPort": 8081}
    app = spec["containers"][0]
    assert app["ports"] == [
        {"name": "app-http", "containerPort": 8080},
        {"name": "https", "containerPort": 8443},
    ]
    # The app's own probes follow its renamed port.
    assert app["livenessProbe"]["tcpSocket"]["port"] == "app-http"
    assert app["readinessProbe"]["httpGet"]["port"] == "app-http"
    assert template(deployment)["metadata"]["annotations"][UNPROXIED] == "8443"
    (service,) = [o for o in objs if o["kind"] == "Service"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "https"]
    config = yaml.safe_load(objs[1]["data"]["drainproxy.yaml"])
    assert config["upstream"]["check"] == {"kind": "http", "path": "/wp-login.php"}
    hook = app["lifecycle"]["preStop"]["httpGet"]
    assert hook["path"] == "/prestop" and hook["port"] == 9901
    assert hook["httpHeaders"] == [
        {"name": "X-Drainproxy-Token", "value": config["admin"]["token"]}
    ]
    assert len(config["admin"]["token"]) == 32


def test_a_service_without_target_port_is_patched_and_the_grace_period_raised_to_the_budget() -> (
    None
):
    objs = objects(injected("rails.yaml"))
    (service,) = [o for o in objs if o["kind"] == "Service"]
    assert service["spec"]["ports"] == [{"port": 3000, "targetPort": "http"}]
    spec = template(workloads(objs)[0])["spec"]
    assert spec["terminationGracePeriodSeconds"] == 5 + 60 + 5 + 2  # more than its own 45
    assert drainproxy_container(spec)["ports"][0] == {"name": "http", "containerPort": 8080}


def test_an_existing_exec_prestop_runs_after_the_drain_within_a_longer_grace_period() -> None:
    objs = objects(injected("tomcat.yaml"))
    spec = template(workloads(objs)[0])["spec"]
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    assert "http://127.0.0.1:9901/prestop" in command[2]
    assert command[3:] == ["drainproxy-prestop", "/usr/local/tomcat/bin/catalina.sh", "stop", "20"]
    # 5s propagation + 25s drain (the workload's annotation) + the 30s the app had + 2s.
    assert spec["terminationGracePeriodSeconds"] == 62
    config_map = next(o for o in objs if o["metadata"]["name"] == "ledger-drainproxy")
    config = yaml.safe_load(config_map["data"]["drainproxy.yaml"])
    assert "token" not in config["admin"]  # the hook calls over loopback: no secret needed
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    assert services["ledger"]["spec"]["ports"][0]["targetPort"] == "http"
    assert services["ledger-jmx"]["spec"]["ports"][0]["targetPort"] == "jmx"


def test_statefulset_asks_for_a_native_sidecar_and_its_log_shipper_is_not_proxied() -> None:
    statefulset = only_workload("statefulset.yaml")
    spec = template(statefulset)["spec"]
    assert [c["name"] for c in spec["containers"]] == ["search", "fluent-bit"]
    (sidecar,) = spec["initContainers"]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("drainproxy", "Always")
    drain = ["drainproxy", "drain", "--config", "/etc/drainproxy/drainproxy.yaml"]
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == drain
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/live"
    assert template(statefulset)["metadata"]["annotations"][UNPROXIED] == "24224"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert spec["terminationGracePeriodSeconds"] == 120


def test_a_list_export_in_json_comes_back_as_json_with_the_configmap_among_its_items() -> None:
    output = injected("list-export.json")
    document = json.loads(output)
    assert document["kind"] == "List"
    assert [item["kind"] for item in document["items"]] == ["ConfigMap", "Deployment", "Service"]
    (service,) = [o for o in document["items"] if o["kind"] == "Service"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", 9102]


def test_jobs_and_cronjobs_are_left_alone() -> None:
    source = (MANIFESTS / "job.yaml").read_text()
    assert objects(injected("job.yaml")) == objects(source)


def test_a_workload_annotated_inject_false_is_left_alone() -> None:
    source = (
        (MANIFESTS / "rails.yaml")
        .read_text()
        .replace(
            "  labels:\n    app: storefront\nspec:",
            "  labels:\n    app: storefront\n"
            '  annotations:\n    drainproxy.io/inject: "false"\nspec:',
        )
    )
    result = inject("-", stdin=source)
    assert result.returncode == 0, result.stderr
    assert objects(result.stdout) == objects(source)


def test_annotations_choose_the_port_the_timings_the_style_and_the_image() -> None:
    source = (
        (MANIFESTS / "wordpress.yaml")
        .read_text()
        .replace(
            "  namespace: default\n",
            "  namespace: default\n  annotations:\n"
            "    drainproxy.io/style: native\n"
            "    drainproxy.io/propagation: 10s\n"
            "    drainproxy.io/stop-timeout: 20s\n"
            "    drainproxy.io/listen-port: '18080'\n"
            "    drainproxy.io/image: registry.example.com/tools/drainproxy:9.9\n",
        )
    )
    result = inject("--image", "ignored.example.com/drainproxy:1", "-", stdin=source)
    assert result.returncode == 0, result.stderr
    spec = template(workloads(objects(result.stdout))[0])["spec"]
    proxy = drainproxy_container(spec)
    assert proxy in spec["initContainers"]
    assert proxy["image"] == "registry.example.com/tools/drainproxy:9.9"
    assert proxy["ports"][0]["containerPort"] == 18080
    assert spec["terminationGracePeriodSeconds"] == 10 + 60 + 20 + 2


def test_the_image_option_sets_the_sidecar_image() -> None:
    result = inject("--image", "mirror.example.com/drainproxy:0.1.0", str(MANIFESTS / "rails.yaml"))
    spec = template(workloads(objects(result.stdout))[0])["spec"]
    assert drainproxy_container(spec)["image"] == "mirror.example.com/drainproxy:0.1.0"


def admin_token(output: str) -> str:
    config_map = next(o for o in objects(output) if o["metadata"]["name"].endswith("-drainproxy"))
    token: str = yaml.safe_load(config_map["data"]["drainproxy.yaml"])["admin"]["token"]
    return token


def test_tokens_are_random_unless_a_key_makes_every_run_the_same() -> None:
    path = str(MANIFESTS / "wordpress.yaml")
    assert admin_token(inject(path).stdout) != admin_token(injected("wordpress.yaml"))
    keyed = inject(path, token_key="ci-secret-1").stdout
    assert inject(path, token_key="ci-secret-1").stdout == keyed
    assert admin_token(inject(path, token_key="ci-secret-2").stdout) != admin_token(keyed)
    other_name = (
        (MANIFESTS / "wordpress.yaml")
        .read_text()
        .replace(
            "  name: blog-wordpress\n  namespace: default",
            "  name: shop-wordpress\n  namespace: default",
        )
    )
    other = inject("-", stdin=other_name, token_key="ci-secret-1").stdout
    assert admin_token(other) != admin_token(keyed)


def test_a_directory_and_stdin_come_out_as_one_stream_in_order(tmp_path: Path) -> None:
    shutil.copy(MANIFESTS / "rails.yaml", tmp_path / "b-rails.yaml")
    shutil.copy(MANIFESTS / "job.yaml", tmp_path / "a-job.yml")
    (tmp_path / "notes.txt").write_text("not a manifest: directories give only .yaml, .yml, .json")
    result = inject(str(tmp_path), "-", stdin=(MANIFESTS / "tomcat.yaml").read_text())
    assert result.returncode == 0, result.stderr
    names = [(o["kind"], o["metadata"]["name"]) for o in objects(result.stdout)]
    assert names == [
        ("Job", "migrate"),
        ("CronJob", "nightly-report"),
        ("ConfigMap", "storefront-drainproxy"),
        ("Deployment", "storefront"),
        ("Service", "storefront"),
        ("ConfigMap", "ledger-settings"),
        ("ConfigMap", "ledger-drainproxy"),
        ("Deployment", "ledger"),
        ("Service", "ledger"),
        ("Service", "ledger-jmx"),
    ]


def test_a_workload_without_its_service_in_the_input_gets_a_warning() -> None:
    source = (MANIFESTS / "rails.yaml").read_text().split("---")[0]
    result = inject("-", stdin=source)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "drainproxy inject: warning: <stdin>: Deployment/storefront: a Service that targets port "
        "3000 by number bypasses drainproxy; set its targetPort to http"
    ]


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit 2, nothing on stdout (it is piped into kubectl)

GOOD = (MANIFESTS / "rails.yaml").read_text()
BAD_INPUTS = [
    ("broken YAML", "apiVersion: v1\nkind: [Service\n", "not valid YAML"),
    ("broken JSON", '{"apiVersion": "v1", "kind": ', "not valid JSON"),
    ("a scalar document", GOOD + "---\njust words\n", "document 3 is not a Kubernetes object"),
    ("an object without kind", "apiVersion: v1\nmetadata: {name: x}\n", "document 1 is not"),
    ("a List without items", "apiVersion: v1\nkind: List\nitems: 3\n", "List without a list"),
    (
        "an unreadable duration",
        GOOD.replace(
            "  labels:\n    app: storefront\nspec:",
            "  labels:\n    app: storefront\n"
            "  annotations:\n    drainproxy.io/drain-timeout: soon\nspec:",
        ),
        "annotation drainproxy.io/drain-timeout",
    ),
    (
        "an unknown style",
        GOOD.replace(
            "        tier: web\n",
            "        tier: web\n      annotations:\n        drainproxy.io/style: sidecar\n",
        ),
        "'sidecar' is not one of classic, native",
    ),
    (
        "no port to front",
        GOOD.split("---")[0].replace("          ports:\n            - containerPort: 3000\n", ""),
        "cannot tell which port of container puma serves HTTP",
    ),
    (
        "only TLS and gRPC ports",
        GOOD.replace(
            "            - containerPort: 3000\n",
            "            - {name: https, containerPort: 3443}\n"
            "            - {name: grpc, containerPort: 50051}\n",
        ),
        "none of its ports (https 3443, grpc 50051) looks like plain HTTP/1.x",
    ),
    (
        "a hostNetwork pod without chosen ports",
        GOOD.replace("      terminationGracePeriodSeconds: 45\n", "      hostNetwork: true\n"),
        "a hostNetwork pod shares the node's ports",
    ),
    (
        "a Windows pod",
        GOOD.replace("      terminationGracePeriodSeconds: 45\n", "      os: {name: windows}\n"),
        "a Windows pod cannot run drainproxy's Linux image",
    ),
    # Wrong JSON types, which the API server refuses too: named by their path, never read as
    # something else (a string grace period as the default, a string port as a second port).
    (
        "a grace period that is a string",
        GOOD.replace("terminationGracePeriodSeconds: 45", 'terminationGracePeriodSeconds: "45"'),
        "spec.terminationGracePeriodSeconds: '45' is not an integer",
    ),
    (
        "a containerPort that is a string",
        GOOD.replace("- containerPort: 3000", '- containerPort: "3000"'),
        "spec.containers[0].ports[0].containerPort: '3000' is not a port number (1-65535)",
    ),
    (
        "a containerPort out of range",
        GOOD.replace("- containerPort: 3000", "- containerPort: 70000"),
        "spec.containers[0].ports[0].containerPort: 70000 is not a port number (1-65535)",
    ),
    (
        "containers that are a mapping",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: {name: app}\n",
        "spec.containers: {'name': 'app'} is not a list",
    ),
    (
        # inject appends its config volume: the mapping was replaced by a list, and lost.
        "volumes that are a mapping",
        GOOD.replace(
            "      terminationGracePeriodSeconds: 45\n",
            "      terminationGracePeriodSeconds: 45\n      volumes: {data: {emptyDir: {}}}\n",
        ),
        "spec.volumes: {'data': {'emptyDir': {}}} is not a list",
    ),
    (
        "an annotation value that is a number",
        GOOD.replace(
            "        tier: web\n",
            "        tier: web\n      annotations:\n        drainproxy.io/port: 3000\n",
        ),
        "metadata.annotations: {'drainproxy.io/port': 3000} is not a mapping of strings",
    ),
    (
        "a preStop hook that is a string",
        GOOD.replace(
            "          ports:\n            - containerPort: 3000\n",
            "          ports:\n            - containerPort: 3000\n"
            "          lifecycle: {preStop: sleep 5}\n",
        ),
        "spec.containers[0].lifecycle.preStop: 'sleep 5' is not a mapping",
    ),
    (
        "a Service whose ports are not a list",
        GOOD + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: 7}\n",
        "Service/s: spec.ports: 7 is not a list",
    ),
    (
        "a List item that is not an object",
        "apiVersion: v1\nkind: List\nitems: [5, null]\n",
        "document 1, item 1 is not a Kubernetes object",
    ),
    (
        "a workload whose metadata is not a mapping",
        GOOD.replace(
            "metadata:\n  name: storefront\n  labels:\n    app: storefront\n", "metadata: 5\n", 1
        ),
        "metadata: 5 is not a mapping",
    ),
    (
        "a CronJob whose jobTemplate is not a mapping",
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {jobTemplate: 5}\n",
        "CronJob/c: spec.jobTemplate: 5 is not a mapping",
    ),
    (
        "a port annotation naming no port",
        GOOD.replace(
            "        tier: web\n",
            "        tier: web\n      annotations:\n        drainproxy.io/port: web\n",
        ),
        "annotation drainproxy.io/port: 'web' is neither a port number",
    ),
]


@pytest.mark.parametrize(
    ("content", "expect"), [(c, e) for _, c, e in BAD_INPUTS], ids=[i for i, _, _ in BAD_INPUTS]
)
def test_bad_input_is_one_line_naming_the_file_and_exit_2(
    content: str, expect: str, tmp_path: Path
) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(content)
    result = inject(str(MANIFESTS / "job.yaml"), str(path))
    assert (result.returncode, result.stdout) == (2, "")
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"drainproxy inject: {path}")
    assert expect in line


def test_a_missing_file_is_named() -> None:
    result = inject("no/such/deploy.yaml")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "drainproxy inject: no/such/deploy.yaml: cannot be read: No such file or directory\n"
    )


def test_stdin_that_is_not_utf8_is_one_line_and_exit_2() -> None:
    """Read as bytes and decoded strictly: the text layer would pass bad bytes on as surrogates
    that the YAML parser cannot encode (a traceback)."""
    result = subprocess.run(
        [sys.executable, "-m", "drainproxy", "inject", "-"],
        input="kind: Pod # caf\xe9\n".encode("latin-1"),
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr == b"drainproxy inject: <stdin>: is not text\n"


# ---------------------------------------------------------------------------------------------
# The app's shell preStop hook, run for real: it waits on /prestop, then runs the original


def tool_dir(tmp_path: Path, *tools: str) -> Path:
    """A PATH holding only these programs (so the hook finds only the clients we allow)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in ("sh", *tools):
        found = shutil.which(tool)
        assert found, f"{tool} is not installed"
        (directory / tool).symlink_to(found)
    return directory


@pytest.fixture
async def prestop_server() -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Event]]:
    """A stand-in for drainproxy's admin /prestop: it sets ``called`` and answers once
    ``release`` is set."""
    called, release = asyncio.Event(), asyncio.Event()

    async def prestop(request: web.Request) -> web.Response:
        called.set()
        await release.wait()
        return web.Response(text="app released\n")

    app = web.Application()
    app.router.add_get("/prestop", prestop)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, called, release
    await runner.cleanup()


@pytest.mark.parametrize("client", ["curl", "wget", "bash"])
async def test_shell_prestop_waits_for_the_release_then_runs_the_original_hook(
    client: str, prestop_server: tuple[int, asyncio.Event, asyncio.Event], tmp_path: Path
) -> None:
    port, called, release = prestop_server
    marker = tmp_path / "original-ran"
    source = GOOD.replace(
        "        tier: web\n",
        f"        tier: web\n      annotations:\n        drainproxy.io/admin-port: '{port}'\n",
    ).replace(
        "          readinessProbe:",
        "          lifecycle:\n            preStop:\n              exec:\n"
        f"                command: [sh, -c, 'echo stopped > {marker}']\n"
        "          readinessProbe:",
    )
    result = inject("-", stdin=source)
    assert result.returncode == 0, result.stderr
    app = template(workloads(objects(result.stdout))[0])["spec"]["containers"][0]
    command = app["lifecycle"]["preStop"]["exec"]["command"]
    env = {"PATH": str(tool_dir(tmp_path, client, "cat"))}
    hook = await asyncio.create_subprocess_exec(*command, env=env)
    try:
        await asyncio.wait_for(called.wait(), 10)
        assert hook.returncode is None and not marker.exists()
        release.set()
        assert await asyncio.wait_for(hook.wait(), 10) == 0
    finally:
        if hook.returncode is None:
            hook.kill()
            await hook.wait()
    assert marker.read_text() == "stopped\n"


async def test_an_httpget_prestop_on_a_named_port_calls_that_ports_number(
    prestop_server: tuple[int, asyncio.Event, asyncio.Event], tmp_path: Path
) -> None:
    """The kubelet resolves a hook's port name in its own container; the shell hook that runs
    the original after the drain needs the number in its URL (it held the name)."""
    port, _, release = prestop_server
    shutdown = asyncio.Event()

    async def on_shutdown(request: web.Request) -> web.Response:
        shutdown.set()
        return web.Response(text="bye\n")

    app_server = web.Application()
    app_server.router.add_get("/shutdown", on_shutdown)
    runner = web.AppRunner(app_server, shutdown_timeout=0.5)
    await runner.setup()
    app_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()
    source = f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata:
      labels: {{app: web}}
      annotations: {{drainproxy.io/admin-port: '{port}'}}
    spec:
      containers:
        - name: web
          image: example/web
          ports: [{{name: http, containerPort: {app_port}}}]
          lifecycle: {{preStop: {{httpGet: {{port: http, path: /shutdown}}}}}}
"""
    try:
        result = inject("-", stdin=source)
        assert result.returncode == 0, result.stderr
        app = template(workloads(objects(result.stdout))[0])["spec"]["containers"][0]
        command = app["lifecycle"]["preStop"]["exec"]["command"]
        release.set()
        hook = await asyncio.create_subprocess_exec(
            *command, env={"PATH": str(tool_dir(tmp_path, "curl"))}
        )
        assert await asyncio.wait_for(hook.wait(), 10) == 0
        assert shutdown.is_set(), "the app's own preStop endpoint was called"
    finally:
        await runner.cleanup()


def test_an_httpget_prestop_naming_an_undeclared_port_is_refused() -> None:
    source = (
        (MANIFESTS / "rails.yaml")
        .read_text()
        .replace(
            "          readinessProbe:",
            "          lifecycle: {preStop: {httpGet: {port: admin, path: /quit}}}\n"
            "          readinessProbe:",
        )
    )
    result = inject("-", stdin=source)
    assert (result.returncode, result.stdout) == (2, "")
    assert "the app's preStop httpGet names port 'admin', which the app container" in (
        result.stderr
    )


def test_the_cli_lists_inject_and_webhook() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "drainproxy", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "inject" in result.stdout and "webhook" in result.stdout


# ---------------------------------------------------------------------------------------------
# check honours the ports inject marks as not proxied


@pytest.mark.parametrize("marked", ["", "8000", "app", "8443, 8000"])
def test_check_flags_a_service_to_the_app_unless_its_port_is_marked_unproxied(marked: str) -> None:
    docs = list(yaml.safe_load_all((REPO / "k8s" / "classic-sidecar.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    service["spec"]["ports"].append({"name": "direct", "port": 8000, "targetPort": 8000})
    if marked:
        deployment["spec"]["template"]["metadata"]["annotations"] = {UNPROXIED: marked}
    parsed = [ManifestDoc("web.yaml", doc) for doc in docs if doc]
    config = load_config(REPO / "config" / "k8s-classic.yaml")
    codes = [f.rule.code for f in check_manifests(config, parsed)]
    assert codes == ([] if marked else ["DP401"])


# ---------------------------------------------------------------------------------------------
# Smaller cases, in process


def run_inject(text: str) -> tuple[list[Obj], list[str]]:
    docs, is_json = parse_text(text, "test.yaml")
    warnings = inject_documents(docs, InjectOptions(new_token=lambda scope: "t" * 32))
    return objects(render(Input(docs, is_json))), warnings


def workload_yaml(kind: str, containers: str, annotations: str = "", extra: str = "") -> str:
    template_annotations = f"      annotations:\n{annotations}" if annotations else ""
    pod = (
        f"    metadata:\n      labels: {{app: web}}\n{template_annotations}"
        f"    spec:\n{extra}      containers:\n{containers}"
    )
    return (
        f"apiVersion: apps/v1\nkind: {kind}\nmetadata: {{name: web}}\nspec:\n"
        f"  selector: {{matchLabels: {{app: web}}}}\n  template:\n{pod}"
    )


SERVICE = (
    "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n"
)


def listen_port(workload: Obj) -> int:
    port: int = drainproxy_container(template(workload)["spec"])["ports"][0]["containerPort"]
    return port


def test_a_port_name_two_containers_declare_is_not_taken_and_the_service_is_patched() -> None:
    containers = (
        "        - {name: app, image: app:1, ports: [{name: http, containerPort: 8000}]}\n"
        "        - {name: exporter, image: exp:1, ports: [{name: http, containerPort: 9113}]}\n"
    )
    source = (
        workload_yaml("Deployment", containers)
        + SERVICE
        + ("  ports: [{port: 80, targetPort: http}]\n")
    )
    objs, _ = run_inject(source)
    workload, service = workloads(objs)[0], objs[-1]
    spec = template(workload)["spec"]
    assert resolve(spec, service["spec"]["ports"][0]) == listen_port(workload)
    assert service["spec"]["ports"][0]["targetPort"] == "drainproxy-http"
    assert spec["containers"][1]["ports"] == [{"name": "http", "containerPort": 9113}]


def test_annotations_pick_the_container_and_name_its_port() -> None:
    containers = (
        "        - {name: agent, image: agent:1, ports: [{name: agent, containerPort: 7000}]}\n"
        "        - {name: app, image: app:1, ports: [{name: main, containerPort: 5000}, "
        "{name: http, containerPort: 5001}]}\n"
    )
    annotations = (
        "        drainproxy.io/container: app\n        drainproxy.io/port: main\n"
        "        drainproxy.io/unproxied-ports: '9999'\n"  # the user's own, kept
    )
    source = (
        workload_yaml("DaemonSet", containers, annotations)
        + SERVICE
        + ("  ports: [{port: 80, targetPort: main}, {name: alt, port: 81, targetPort: 5001}]\n")
    )
    objs, _ = run_inject(source)
    workload, service = workloads(objs)[0], objs[-1]
    spec = template(workload)["spec"]
    config = yaml.safe_load(objs[0]["data"]["drainproxy.yaml"])
    assert config["upstream"]["url"] == "http://127.0.0.1:5000"
    annotations_after = template(workload)["metadata"]["annotations"]
    assert annotations_after["drainproxy.io/port"] == "5000"
    assert annotations_after[UNPROXIED] == "5001,7000,9999"
    assert [resolve(spec, p) for p in service["spec"]["ports"]] == [listen_port(workload), 5001]
    assert "lifecycle" not in spec["containers"][0]  # the agent is not held back
    assert "preStop" in spec["containers"][1]["lifecycle"]


def test_an_app_that_declares_no_port_is_found_through_its_service() -> None:
    containers = "        - {name: app, image: app:1}\n"
    source = workload_yaml("ReplicaSet", containers) + SERVICE + "  ports: [{port: 3000}]\n"
    objs, warnings = run_inject(source)
    spec = template(workloads(objs)[0])["spec"]
    assert spec["containers"][0]["ports"] == [{"containerPort": 3000}]
    assert objs[-1]["spec"]["ports"] == [{"port": 3000, "targetPort": "http"}]
    assert warnings == []


def test_bare_pods_are_injected_unless_they_run_to_completion() -> None:
    pod = (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: one, labels: {app: web}}\nspec:\n"
        "  restartPolicy: RESTART\n  containers:\n"
        "    - {name: app, image: app:1, ports: [{name: http, containerPort: 8000}]}\n"
    )
    objs, _ = run_inject(pod.replace("RESTART", "Always"))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Pod"]
    assert objs[0]["metadata"]["name"] == "one-drainproxy"
    for policy in ("Never", "OnFailure"):
        source = pod.replace("RESTART", policy)
        assert run_inject(source)[0] == objects(source)


def test_a_yaml_list_stays_yaml_with_the_configmap_among_its_items() -> None:
    containers = "        - {name: app, image: app:1, ports: [{name: http, containerPort: 80}]}\n"
    workload = yaml.safe_load(workload_yaml("Deployment", containers))
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [workload]})
    docs, is_json = parse_text(text, "list.yaml")
    inject_documents(docs, InjectOptions())
    output = render(Input(docs, is_json))
    assert yaml.safe_load(output)["kind"] == "List"  # YAML, not JSON
    assert not output.startswith("{")
    assert [o["kind"] for o in objects(output)] == ["ConfigMap", "Deployment"]


# ---------------------------------------------------------------------------------------------
# Any pod spec: injected, or refused with InjectError; never another exception (the webhook
# runs this on every pod a namespace creates)

_KEYS = st.sampled_from(
    ["containers", "initContainers", "ports", "name", "containerPort", "lifecycle", "preStop",
     "exec", "command", "httpGet", "port", "path", "readinessProbe", "annotations", "protocol",
     "restartPolicy", "terminationGracePeriodSeconds", "volumes", "appProtocol", "sleep"]
)  # fmt: skip
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-1, 70000) | st.sampled_from(["http", "8080", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.dictionaries(_KEYS, _VALUES, max_size=5), metadata=st.dictionaries(_KEYS, _VALUES))
def test_any_pod_spec_is_injected_or_refused_by_name(spec: Obj, metadata: Obj) -> None:
    try:
        inject_pod("x.yaml: Pod/p", "Pod/p", metadata, spec, InjectOptions())
    except InjectError as exc:
        assert str(exc).startswith("x.yaml: Pod/p")


def test_inject_loads_neither_aiohttp_nor_asyncio_nor_the_data_path() -> None:
    """It runs in CI pipelines and on laptops: only PyYAML and the config and check code."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "drainproxy", "inject",
         str(MANIFESTS / "rails.yaml")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0
    modules = {
        line.rpartition("|")[2].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    heavy = (
        "aiohttp",
        "asyncio",
        "httptools",
        "uvloop",
        "drainproxy.dataplane.proxy",
        "drainproxy.control.server",
    )
    assert "drainproxy.kube.inject" in modules
    assert not [m for m in modules if m.startswith(heavy)]


def test_two_workloads_of_one_name_get_configmaps_of_their_own() -> None:
    containers = "        - {name: app, image: app:1, ports: [{name: http, containerPort: 80}]}\n"
    source = (
        workload_yaml("Deployment", containers) + "---\n" + workload_yaml("StatefulSet", containers)
    )
    objs, _ = run_inject(source)
    config_maps = [o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"]
    assert config_maps == ["web-drainproxy", "web-statefulset-drainproxy"]
    mounted = [
        next(v for v in template(w)["spec"]["volumes"] if v["name"] == "drainproxy-config")
        for w in workloads(objs)
    ]
    assert [v["configMap"]["name"] for v in mounted] == config_maps


def test_prestop_http_on_a_workload_replaces_its_own_hook_for_an_image_without_a_shell() -> None:
    containers = (
        "        - name: app\n          image: gcr.io/distroless/app:1\n"
        "          ports: [{name: http, containerPort: 8000}]\n"
        "          lifecycle: {preStop: {exec: {command: [/app/stop]}}}\n"
    )
    objs, _ = run_inject(
        workload_yaml("Deployment", containers, "        drainproxy.io/prestop: http\n")
    )
    spec = template(workloads(objs)[0])["spec"]
    hook = spec["containers"][0]["lifecycle"]["preStop"]
    assert hook == {
        "httpGet": {
            "path": "/prestop",
            "port": 9901,
            "httpHeaders": [{"name": "X-Drainproxy-Token", "value": "t" * 32}],
        }
    }
    assert spec["terminationGracePeriodSeconds"] == 5 + 60 + 5 + 2  # the default 5s stop


def test_type_errors_name_every_wrong_field_and_pass_absent_ones() -> None:
    """Absent and null fields take their defaults; a bool is not an integer (JSON has no
    such overlap); every problem is named at once, by its path."""
    spec = {
        "terminationGracePeriodSeconds": None,
        "containers": [
            {"name": "app", "readinessProbe": {"periodSeconds": True}},
            {"name": 7, "ports": [{"containerPort": 0}, "80"]},
        ],
    }
    assert list(type_errors(spec, POD_SPEC, "spec")) == [
        "spec.containers[0].readinessProbe.periodSeconds: True is not an integer",
        "spec.containers[1].name: 7 is not a string",
        "spec.containers[1].ports[0].containerPort: 0 is not a port number (1-65535)",
        "spec.containers[1].ports[1]: '80' is not a mapping",
    ]
    assert list(type_errors({}, POD_SPEC, "spec")) == []
