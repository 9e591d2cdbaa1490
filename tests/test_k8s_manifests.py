"""The shipped manifests: valid Kubernetes for every version the docs claim, lint-clean, and with
ConfigMaps that hold exactly the config files they stand for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from drainproxy.config.schema import PLACEHOLDER_TOKEN

REPO = Path(__file__).resolve().parent.parent


class Style:
    def __init__(self, name: str, manifest: str, config: str, oldest: str) -> None:
        self.name = name
        self.manifest = REPO / "k8s" / manifest
        self.config = REPO / "config" / config
        #: The oldest Kubernetes version the docs and the manifest's header promise.
        self.oldest = oldest

    def docs(self) -> list[dict[str, Any]]:
        return [doc for doc in yaml.safe_load_all(self.manifest.read_text()) if doc]


STYLES = [
    Style("classic", "classic-sidecar.yaml", "k8s-classic.yaml", "1.25"),
    Style("native", "native-sidecar.yaml", "k8s-native.yaml", "1.29"),
    Style("shared-pid", "shared-process-namespace.yaml", "k8s-shared-pid.yaml", "1.25"),
    Style("wrap", "wrapper.yaml", "k8s-wrap.yaml", "1.25"),
]
IDS = [style.name for style in STYLES]
NEWEST = ".".join(latest_version().split(".")[:2])


def test_every_manifest_in_k8s_is_a_tested_style() -> None:
    assert sorted(path.name for path in (REPO / "k8s").glob("*.yaml")) == sorted(
        style.manifest.name for style in STYLES
    )


@pytest.mark.parametrize("style", STYLES, ids=IDS)
def test_manifest_is_a_complete_deployment(style: Style) -> None:
    kinds = [doc["kind"] for doc in style.docs()]
    assert kinds == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]


@pytest.mark.parametrize("style", STYLES, ids=IDS)
@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_manifest_validates_against_the_kubernetes_schemas(style: Style, version: str) -> None:
    wanted = style.oldest if version == "oldest" else NEWEST
    for doc in style.docs():
        validated = kubernetes_validate.validate(doc, wanted, strict=True)
        assert validated == wanted, f"{doc['kind']}: no schema for {wanted}"


def test_the_schema_check_rejects_a_native_sidecar_before_its_kubernetes_version() -> None:
    """Proves the schema test can fail: restartPolicy on a container is unknown before 1.28."""
    native = next(style for style in STYLES if style.name == "native")
    deployment = next(doc for doc in native.docs() if doc["kind"] == "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(deployment, "1.27", strict=True)


@pytest.mark.parametrize("style", STYLES, ids=IDS)
def test_version_claims_agree_in_manifest_and_docs(style: Style) -> None:
    header = style.manifest.read_text().split("apiVersion:")[0]
    assert f"Kubernetes >= {style.oldest}" in header
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert re.search(rf"\| `k8s/{style.manifest.name}` \|[^\n]*\| {style.oldest}\+ \|", docs)


@pytest.mark.parametrize("style", STYLES, ids=IDS)
def test_configmap_holds_the_config_file_verbatim(style: Style) -> None:
    (config_map,) = [doc for doc in style.docs() if doc["kind"] == "ConfigMap"]
    assert config_map["data"] == {"drainproxy.yaml": style.config.read_text()}


def run_check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drainproxy", "check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        check=False,
    )


@pytest.mark.parametrize("style", STYLES, ids=IDS)
def test_shipped_manifest_passes_check_once_its_token_is_replaced(
    style: Style, tmp_path: Path
) -> None:
    """As shipped, the only finding is the public placeholder token (DP002); replaced in the
    config and the manifest (as the comments ask), check is clean, with the config given or read
    from the ConfigMap (the manifest on stdin)."""
    config_arg = str(style.config.relative_to(REPO))
    manifest_arg = str(style.manifest.relative_to(REPO))
    result = run_check("--config", config_arg, "--manifest", manifest_arg, "--format", "json")
    codes = {finding["code"] for finding in json.loads(result.stdout)["findings"]}
    has_token = PLACEHOLDER_TOKEN in style.config.read_text()
    assert codes == ({"DP002"} if has_token else set()), result.stdout
    assert result.returncode == (1 if has_token else 0)
    token = "0f4c2d9b7e1a4c3f8b6d5e2a1c9f7b3d"
    config = tmp_path / style.config.name
    config.write_text(style.config.read_text().replace(PLACEHOLDER_TOKEN, token))
    manifest_text = style.manifest.read_text().replace(PLACEHOLDER_TOKEN, token)
    result = run_check("--config", str(config), "--manifest", "-", stdin=manifest_text)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[-1].endswith(": ok")
    result = run_check("--manifest", "-", stdin=manifest_text)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[-1] == (
        "<stdin>: ConfigMap/web-drainproxy data.drainproxy.yaml with -: ok"
    )
