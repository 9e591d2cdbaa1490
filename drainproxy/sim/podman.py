"""podman and buildah as the container tests, the rollout with pods and ``make image`` run them.

What a machine like the CI's needs (as root, Debian's podman 4, buildah, runc):

- runc as the runtime (``podman --runtime runc``): crun fails on some cgroup layouts;
- resource limits no higher than this process's hard limits, since raising a limit is not
  permitted in every sandbox (and runc refuses ``nproc`` above 32768): ``--ulimit`` on
  ``podman run``, and a ``containers.conf`` of ours (``CONTAINERS_CONF``) for what has no such
  flag, the pods' infra containers and ``podman kube play``;
- the image built with ``buildah bud --isolation chroot --network host``, on a base image made
  from Debian packages when no registry image can be pulled (``.ci/debian-python-image``).

``python3 -m drainproxy.sim.podman build [--python-image IMAGE|debian]`` (``make image``)
builds the image and tags it with the name the manifests in ``k8s/`` use, unless an image of
that name was already built from the same context on the same base (a digest of the files the
build reads and the base's id, kept in labels).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from drainproxy import __version__

#: The image name the manifests in k8s/ run (``image:`` of the drainproxy containers).
IMAGE = f"registry.example.com/drainproxy:{__version__}"
#: The base CI builds on: Debian's Python, made by .ci/debian-python-image.
DEBIAN_BASE = "localhost/debian-python:bookworm"
#: The base the Dockerfile names by default (ARG PYTHON_IMAGE).
DEFAULT_BASE = "python:3.12-slim-bookworm"
#: Everything the build reads: the Dockerfile, .dockerignore and what the Dockerfile COPYs.
BUILD_CONTEXT = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "drainproxy",
    "config/drainproxy.yaml",
)
CONTEXT_LABEL = "io.drainproxy.context"
BASE_LABEL = "io.drainproxy.base"
#: runc refuses a higher nproc limit.
RUNC_MAX_NPROC = 32768
#: A limit to use where the hard limit is unlimited.
UNLIMITED_CAP = 1 << 20


class PodmanError(RuntimeError):
    """A podman or buildah command failed; the message holds its command line and output."""


def unavailable_reason() -> str | None:
    """Why containers cannot run here, or None when they can."""
    for tool in ("podman", "buildah", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/system-deps installs it)"
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    return None


def _limit(kind: int, cap: int) -> int:
    hard = resource.getrlimit(kind)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def ulimits() -> dict[str, int]:
    """Soft = hard = this process's hard limits (capped), which a container may always have."""
    return {
        "nofile": _limit(resource.RLIMIT_NOFILE, UNLIMITED_CAP),
        "nproc": _limit(resource.RLIMIT_NPROC, RUNC_MAX_NPROC),
    }


def ulimit_args() -> list[str]:
    return [arg for name, n in ulimits().items() for arg in ("--ulimit", f"{name}={n}:{n}")]


@functools.cache
def _containers_conf() -> Path:
    """A containers.conf giving every container (infra ones and kube play's too) our limits."""
    limits = ulimits()
    path = Path(tempfile.gettempdir()) / "drainproxy-containers-{nofile}-{nproc}.conf".format(
        **limits
    )
    quoted = ", ".join(f'"{name}={n}:{n}"' for name, n in limits.items())
    # Written aside and renamed: another run may be reading it.
    written = path.with_suffix(f".{os.getpid()}")
    written.write_text(f"[containers]\ndefault_ulimits = [{quoted}]\n")
    written.replace(path)
    return path


def environment() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(_containers_conf())}


def podman_command(*args: str) -> list[str]:
    return ["podman", "--runtime", "runc", *args]


def podman(*args: str, check: bool = True, timeout: float = 120.0) -> str:
    """Run one podman command; its standard output. Raises PodmanError if ``check`` and it fails."""
    command = podman_command(*args)
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment(), timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise PodmanError(
            f"{' '.join(command)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result.stdout


class PodmanRun(subprocess.Popen[bytes]):
    """``podman run`` attached to its container, as a process: its output (stdout and stderr
    together) is the container's, it exits when the container does and with its exit status.
    Signals go to the container through ``podman kill``, as the kubelet sends them through the
    runtime; ``--sig-proxy=false`` keeps the client itself out of it."""

    def __init__(self, name: str, run_args: Sequence[str], **popen: Any) -> None:
        self.name = name
        command = podman_command(
            "run", "--rm", "--sig-proxy=false", "--name", name, *ulimit_args(), *run_args
        )
        super().__init__(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(), **popen
        )

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            # A container that exits meanwhile makes podman kill fail: nothing left to signal.
            podman("kill", "--signal", signal.Signals(sig).name, self.name, check=False)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def context_digest(repo: Path) -> str:
    """A digest of the files the build reads (``BUILD_CONTEXT``, caches left out)."""
    digest = hashlib.sha256()
    for entry in BUILD_CONTEXT:
        root = repo / entry
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(str(path.relative_to(repo)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_id(image: str) -> str | None:
    found = podman("image", "inspect", "--format", "{{.Id}}", image, check=False).strip()
    return found or None


def remove_if_untagged(image: str | None) -> None:
    """Remove an image a rebuild took the tag from (one this module built), so that rebuilds
    leave nothing behind; one still in use, or tagged otherwise, stays."""
    if image is None:
        return
    tags = podman("image", "inspect", "--format", "{{json .RepoTags}}", image, check=False)
    if tags.strip() == "[]":
        podman("image", "rm", image, check=False)


def image_labels(image: str) -> dict[str, str] | None:
    """The image's labels; None when there is no such image."""
    if subprocess.run(["podman", "image", "exists", image], check=False).returncode != 0:
        return None
    labels: dict[str, str] | None = json.loads(
        podman("image", "inspect", "--format", "{{json .Labels}}", image)
    )
    return labels or {}


def build_image(repo: Path, python_image: str | None = None, tag: str = IMAGE) -> str:
    """Build the Dockerfile of ``repo`` as ``tag`` on ``python_image`` (default: the
    Dockerfile's), unless an image of that name was built from the same context on the same
    base already. Returns a line saying which happened. Raises PodmanError if the build fails."""
    base = python_image or DEFAULT_BASE
    wanted = {CONTEXT_LABEL: context_digest(repo), BASE_LABEL: image_id(base) or base}
    labels = image_labels(tag) or {}
    if all(labels.get(key) == value for key, value in wanted.items()):
        return f"{tag}: up to date (context {wanted[CONTEXT_LABEL]})"
    previous = image_id(tag)
    command = ["buildah", "bud", "--isolation", "chroot", "--network", "host", *ulimit_args()]
    for key, value in wanted.items():
        command += ["--label", f"{key}={value}"]
    if python_image:
        command += ["--build-arg", f"PYTHON_IMAGE={python_image}"]
    command += ["--tag", tag, str(repo)]
    result = subprocess.run(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise PodmanError(f"{' '.join(command)}: exit {result.returncode}\n{result.stdout}")
    remove_if_untagged(previous)
    return f"{tag}: built on {base} (context {wanted[CONTEXT_LABEL]})"


def build_debian_base(repo: Path) -> str:
    """:data:`DEBIAN_BASE`, made (or found up to date) by .ci/debian-python-image; its report."""
    script = repo / ".ci" / "debian-python-image"
    result = subprocess.run(
        ["bash", str(script), DEBIAN_BASE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=environment(), check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise PodmanError(f"{script}: exit {result.returncode}\n{result.stdout}")
    return result.stdout.strip()


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time on this machine: a second run waits for the first, then finds its
    image up to date instead of building the same again."""
    with (Path(tempfile.gettempdir()) / "drainproxy-image-build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_image(repo: Path, tag: str = IMAGE) -> str:
    """For tests: ``tag`` as built from this context (on whatever base; CI's ``make image``
    built it already), else built now on :data:`DEBIAN_BASE`, which needs no registry."""
    with build_lock():
        labels = image_labels(tag) or {}
        if labels.get(CONTEXT_LABEL) == context_digest(repo):
            return f"{tag}: up to date"
        return build_debian_base(repo) + "\n" + build_image(repo, DEBIAN_BASE, tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m drainproxy.sim.podman")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help=f"build the Dockerfile as {IMAGE}")
    build.add_argument(
        "--python-image",
        help=f"the base image (default: the Dockerfile's, {DEFAULT_BASE}); 'debian': "
        f"{DEBIAN_BASE}, made here first from Debian packages (.ci/debian-python-image)",
    )
    build.add_argument("--repo", type=Path, default=Path.cwd())
    build.add_argument("--tag", default=IMAGE)
    args = parser.parse_args(argv)
    python_image = args.python_image
    try:
        with build_lock():
            if python_image == "debian":
                print(build_debian_base(args.repo), flush=True)
                python_image = DEBIAN_BASE
            print(build_image(args.repo, python_image, args.tag), flush=True)
    except PodmanError as exc:
        hint = "" if python_image else "\n(no registry to pull from? --python-image debian)"
        print(f"image build failed: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
