"""`drainproxy webhook`: real AdmissionReview JSON over TLS (trustme); the JSONPatch it answers,
applied by an independent RFC 6902 implementation (jsonpatch), makes of each Pod what
`drainproxy inject` makes of its workload. And its manifests: schema-valid, rendered by
`kubectl kustomize` with the cert-manager component."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest
import trustme
import yaml

from drainproxy.config.schema import config_from_mapping
from drainproxy.kube.inject import CONFIG_ANNOTATION, Document, InjectOptions, inject_documents
from drainproxy.kube.webhook import json_patch, start_webhook
from tests.test_inject import (
    MANIFESTS,
    NEWEST,
    REPO,
    drainproxy_container,
    objects,
    template,
    workloads,
)

TOKEN = "5f1e0d9c8b7a69584736251403f2e1d0"
OPTIONS = InjectOptions(new_token=lambda scope: TOKEN)
WEBHOOK_DIR = REPO / "k8s" / "webhook"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "drainproxy-webhook.drainproxy-system.svc")
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """What the API server does: trust the caBundle, check the name."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def webhook(cert_files: tuple[str, str]) -> AsyncIterator[int]:
    running = await start_webhook("127.0.0.1:0", *cert_files, OPTIONS)
    yield running.port
    await running.stop()


async def post_review(port: int, context: ssl.SSLContext, review: object) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"https://127.0.0.1:{port}/mutate", json=review, ssl=context) as response,
    ):
        body = await response.json() if response.status == 200 else await response.text()
        return response.status, body


def review_of(pod: Obj, namespace: str = "shop", operation: str = "CREATE") -> Obj:
    """An AdmissionReview as the API server sends it for a Pod."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def pod_from(workload: Obj) -> Obj:
    """The Pod a controller makes from a workload's template (annotations of the workload
    itself do not reach it)."""
    pod_template = copy.deepcopy(template(workload))
    metadata = pod_template.get("metadata") or {}
    metadata = {k: v for k, v in metadata.items() if k != "creationTimestamp"}
    metadata["generateName"] = f"{workload['metadata']['name']}-7d9f8c6b5-"
    metadata["namespace"] = workload["metadata"].get("namespace", "shop")
    metadata["ownerReferences"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": f"{workload['metadata']['name']}-7d9f8c6b5",
            "uid": "2f6ab3c1-7d7e-4c55-9a53-4b0c9f3e8a10",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_template["spec"]}


def template_annotated(workload: Obj) -> Obj:
    """The workload with its drainproxy.io annotations moved onto its pod template, where the
    webhook can see them (the documented way for the webhook)."""
    moved = copy.deepcopy(workload)
    own = moved["metadata"].pop("annotations", {})
    ours = {k: v for k, v in own.items() if k.startswith("drainproxy.io/")}
    template(moved).setdefault("metadata", {}).setdefault("annotations", {}).update(ours)
    return moved


def patched(answer: Obj, pod: Obj) -> Obj:
    response = answer["response"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result: Obj = jsonpatch.apply_patch(pod, patch)
    return result


def without_config_source(pod_spec: Obj, annotations: Obj) -> tuple[Obj, Obj]:
    spec = copy.deepcopy(pod_spec)
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "drainproxy-config"]
    return spec, {k: v for k, v in annotations.items() if k != CONFIG_ANNOTATION}


# ---------------------------------------------------------------------------------------------
# The JSONPatch makes of the Pod what inject makes of it

CASES = ["wordpress.yaml", "rails.yaml", "tomcat.yaml", "statefulset.yaml", "list-export.json"]


@pytest.mark.parametrize("name", CASES)
async def test_the_patched_pod_is_what_inject_makes_of_its_workload(
    name: str, webhook: int, client_tls: ssl.SSLContext
) -> None:
    source = objects((MANIFESTS / name).read_text())
    originals = [template_annotated(w) for w in workloads(source)]
    others = [o for o in source if o["kind"] not in ("Deployment", "StatefulSet")]
    docs = [Document("test", obj) for obj in copy.deepcopy(originals + others)]
    inject_documents(docs, OPTIONS)
    for original, doc in zip(originals, docs, strict=False):
        pod = pod_from(original)
        status, answer = await post_review(webhook, client_tls, review_of(pod))
        assert status == 200
        assert answer["kind"] == "AdmissionReview"
        mutated = patched(answer, pod)
        expected = template(doc.body)
        spec, annotations = without_config_source(
            mutated["spec"], mutated["metadata"]["annotations"]
        )
        want_spec, want_annotations = without_config_source(
            expected["spec"], expected["metadata"]["annotations"]
        )
        assert spec == want_spec
        assert annotations == want_annotations
        # The config travels in an annotation, read through a downwardAPI volume.
        (volume,) = [v for v in mutated["spec"]["volumes"] if v["name"] == "drainproxy-config"]
        field = volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]
        assert field == f"metadata.annotations['{CONFIG_ANNOTATION}']"
        config_map = next(b for b in doc.before if b["kind"] == "ConfigMap")
        in_pod = yaml.safe_load(mutated["metadata"]["annotations"][CONFIG_ANNOTATION])
        assert config_from_mapping(in_pod) == config_from_mapping(
            yaml.safe_load(config_map["data"]["drainproxy.yaml"])
        )
        assert kubernetes_validate.validate(mutated, NEWEST, strict=True) == NEWEST
        # Reinvocation (reinvocationPolicy: IfNeeded) or a second webhook pass: no patch.
        status, again = await post_review(webhook, client_tls, review_of(mutated))
        assert status == 200
        assert again["response"] == {"uid": again["response"]["uid"], "allowed": True}


async def test_a_pod_of_an_injected_workload_is_left_as_it_is(
    webhook: int, client_tls: ssl.SSLContext
) -> None:
    injected = objects((MANIFESTS / "wordpress.yaml").read_text())
    docs = [Document("test", obj) for obj in injected]
    inject_documents(docs, OPTIONS)
    pod = pod_from(workloads([d.body for d in docs])[0])
    assert drainproxy_container(pod["spec"])
    status, answer = await post_review(webhook, client_tls, review_of(pod))
    assert (status, "patch" in answer["response"]) == (200, False)


def a_pod() -> Obj:
    return pod_from(workloads(objects((MANIFESTS / "rails.yaml").read_text()))[0])


@pytest.mark.parametrize(
    ("case", "change"),
    [
        (
            "owned by a Job",
            {
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": "migrate", "uid": "1"}
                ]
            },
        ),
        ("annotated inject false", {"annotations": {"drainproxy.io/inject": "false"}}),
    ],
)
async def test_pods_that_must_not_drain_through_drainproxy_are_allowed_unchanged(
    case: str, change: Obj, webhook: int, client_tls: ssl.SSLContext
) -> None:
    pod = a_pod()
    pod["metadata"].update(change)
    status, answer = await post_review(webhook, client_tls, review_of(pod))
    assert status == 200
    assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}


async def test_an_update_is_not_patched(webhook: int, client_tls: ssl.SSLContext) -> None:
    status, answer = await post_review(webhook, client_tls, review_of(a_pod(), operation="UPDATE"))
    assert (status, answer["response"]["allowed"], "patch" in answer["response"]) == (
        200,
        True,
        False,
    )


async def test_a_pod_it_cannot_inject_is_allowed_with_a_warning(
    webhook: int, client_tls: ssl.SSLContext
) -> None:
    pod = a_pod()
    del pod["spec"]["containers"][0]["ports"]
    status, answer = await post_review(webhook, client_tls, review_of(pod))
    response = answer["response"]
    assert (status, response["allowed"], "patch" in response) == (200, True, False)
    (warning,) = response["warnings"]
    assert "cannot tell which port of container puma serves HTTP" in warning
    assert "drainproxy.io/port" in warning


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ({"kind": "Pod"}, "not an AdmissionReview"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}, "only admission"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}, "no request"),
    ],
)
async def test_a_body_that_is_no_admission_review_gets_400(
    body: Obj, expect: str, webhook: int, client_tls: ssl.SSLContext
) -> None:
    status, text = await post_review(webhook, client_tls, body)
    assert status == 400 and expect in text


async def test_a_client_that_does_not_trust_the_certificate_is_refused(webhook: int) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post_review(webhook, stranger, review_of(a_pod()))


def test_json_patch_escapes_keys_and_applies_with_an_independent_implementation() -> None:
    old = {"metadata": {"annotations": {"a/b": "1", "c~d": "2"}}, "list": [1, 2], "gone": True}
    new = {"metadata": {"annotations": {"a/b": "3", "c~d": "2", "e/f": "x"}}, "list": [1, 2, 3]}
    patch = json_patch(old, new)
    assert {"op": "replace", "path": "/metadata/annotations/a~1b", "value": "3"} in patch
    assert jsonpatch.apply_patch(old, patch) == new
    assert jsonpatch.apply_patch(new, json_patch(new, old)) == old


async def line_with(stream: asyncio.StreamReader, text: str) -> str:
    """The next line of the webhook's log that holds ``text``."""
    while True:
        line = (await asyncio.wait_for(stream.readline(), 30)).decode()
        assert line, f"the log ended before a line with {text!r}"
        if text in line:
            return line


async def get_healthz(port: int, context: ssl.SSLContext) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/healthz", ssl=context) as response,
    ):
        return response.status


async def test_the_command_serves_then_on_sigterm_fails_readiness_but_still_answers(
    cert_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    """Reviews sent while its endpoint is being removed are still answered: one refused would
    admit its pod without drainproxy (failurePolicy: Ignore)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drainproxy", "webhook", "--listen", "127.0.0.1:0",
        "--tls-cert", cert_files[0], "--tls-key", cert_files[1], "--image", "mirror/drainproxy:1",
        "--shutdown-delay", "1s",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = await line_with(process.stderr, "webhook listening on port")
        port = int(line.rsplit(" ", 1)[1])
        assert await get_healthz(port, client_tls) == 200
        status, answer = await post_review(port, client_tls, review_of(a_pod()))
        assert status == 200
        mutated = patched(answer, a_pod())
        assert drainproxy_container(mutated["spec"])["image"] == "mirror/drainproxy:1"

        process.send_signal(signal.SIGTERM)
        await line_with(process.stderr, "shutting down: /healthz fails, reviews still answered")
        assert await get_healthz(port, client_tls) == 503
        status, answer = await post_review(port, client_tls, review_of(a_pod()))
        assert (status, answer["response"]["patchType"]) == (200, "JSONPatch")
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_command_names_a_certificate_it_cannot_load(tmp_path: Path) -> None:
    missing = str(tmp_path / "tls.crt")
    result = subprocess.run(
        [sys.executable, "-m", "drainproxy", "webhook", "--listen", "127.0.0.1:0",
         "--tls-cert", missing, "--tls-key", missing],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert missing in result.stderr and "cannot be loaded" in result.stderr


# ---------------------------------------------------------------------------------------------
# Its manifests


def webhook_manifests() -> list[Path]:
    return sorted(p for p in WEBHOOK_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", webhook_manifests(), ids=lambda p: p.name)
def test_webhook_manifest_validates(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        for version in ("1.25", NEWEST):
            assert kubernetes_validate.validate(doc, version, strict=True) == version


def test_the_webhook_configuration_never_blocks_pods_and_asks_for_namespaces() -> None:
    (config,) = yaml.safe_load_all((WEBHOOK_DIR / "mutatingwebhookconfiguration.yaml").read_text())
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["namespaceSelector"] == {"matchLabels": {"drainproxy.io/inject": "enabled"}}
    opt_out = {"key": "drainproxy.io/inject", "operator": "NotIn", "values": ["false"]}
    assert hook["objectSelector"] == {"matchExpressions": [opt_out]}
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    assert hook["sideEffects"] == "None"


def test_the_admin_port_network_policy_validates() -> None:
    for doc in yaml.safe_load_all((REPO / "k8s" / "policy" / "admin-port.yaml").read_text()):
        assert kubernetes_validate.validate(doc, "1.25", strict=True) == "1.25"


KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: `kubectl kustomize` renders k8s/webhook"
)


def kustomize(directory: Path) -> list[Obj]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@needs_kubectl
def test_kustomize_renders_the_webhook_schema_valid_in_its_namespace() -> None:
    docs = kustomize(WEBHOOK_DIR)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == [
        "Deployment", "MutatingWebhookConfiguration", "Namespace", "PodDisruptionBudget", "Service"
    ]  # fmt: skip
    for doc in docs:
        assert kubernetes_validate.validate(doc, NEWEST, strict=True) == NEWEST
        if doc["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == "drainproxy-system"


@needs_kubectl
def test_the_cert_manager_component_adds_the_certificate_and_the_ca_injection(
    tmp_path: Path,
) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(WEBHOOK_DIR, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {base}/cert-manager\n"
    )
    docs = {doc["kind"]: doc for doc in kustomize(overlay)}
    certificate = docs["Certificate"]
    deployment = docs["Deployment"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
    service = docs["Service"]
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert name in certificate["spec"]["dnsNames"]
    annotation = docs["MutatingWebhookConfiguration"]["metadata"]["annotations"]
    assert annotation == {"cert-manager.io/inject-ca-from": "drainproxy-system/drainproxy-webhook"}
    assert docs["Issuer"]["metadata"]["name"] == certificate["spec"]["issuerRef"]["name"]


def test_without_aiohttp_the_command_names_the_extra_to_install() -> None:
    """aiohttp is the `webhook` extra, not a dependency of the sidecar."""
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from drainproxy.cli import main\n"
        "sys.exit(main(['webhook', '--listen', ':0', '--tls-cert', 'c', '--tls-key', 'k']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "drainproxy webhook: needs aiohttp: pip install 'drainproxy[webhook]'\n"
    )
