"""drainproxy's image: its size, and the idle RSS of drainproxy in its container against the same
config run as a process from this venv in the same run (the baseline).

    .venv/bin/python bench/image.py [--rounds 3]      (as root; builds the image if stale)

Sizes are podman's (uncompressed layers): the image, its base and what drainproxy adds. RSS is
read as bench/run.py reads it (VmRSS of the process tree, from /proc on the host) from a fresh
drainproxy that has answered one request through itself, each round starting both afresh, and
the table shows the medians; the container runs with ``--network host`` and the config mounted
where the image reads it.
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import (
    Processes,
    Target,
    drainproxy_config,
    rss_kib,
    start_drainproxy,
    wait_until_serving,
)

from drainproxy.sim.podman import (
    BASE_LABEL,
    IMAGE,
    PodmanRun,
    ensure_image,
    image_labels,
    podman,
    unavailable_reason,
)
from drainproxy.sim.pods import CONFIG_PATH
from drainproxy.sim.replica import free_port

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def image_size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image))


UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def charged_kib(name: str) -> int:
    """Memory charged to the container's cgroup, as podman stats reports it (usage less the
    inactive page cache): what a Kubernetes memory limit applies to."""
    usage = podman("stats", "--no-stream", "--format", "{{.MemUsageBytes}}", name).split("/")[0]
    found = re.fullmatch(r"([\d.]+)\s*([KMG]?i?B)", usage.strip())
    if found is None:
        raise ValueError(f"podman stats: unexpected memory usage {usage!r}")
    return int(float(found[1]) * UNITS[found[2]] / 1024)


def container_memory(
    work: Path, origin_port: int, processes: Processes, name: str
) -> tuple[int, int]:
    """RSS and cgroup charge (KiB) of drainproxy's container once it has answered one request."""
    port = free_port()
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(drainproxy_config(port, free_port(), origin_port)))
    container = PodmanRun(
        name,
        ["--network", "host", "--volume", f"{config}:{CONFIG_PATH}:ro", IMAGE,
         "serve", "--config", CONFIG_PATH],
    )  # fmt: skip
    try:
        wait_until_serving(Target("container", port, None), processes, timeout=60.0)
        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name))
        time.sleep(0.5)  # as bench/run.py: let the first request settle before reading RSS
        return rss_kib(pid), charged_kib(name)
    finally:
        container.kill()
        container.communicate(timeout=30)


def process_rss(work: Path, origin_port: int, processes: Processes) -> int:
    target = start_drainproxy(processes, work, origin_port, cpu=0)
    assert target.pid is not None
    wait_until_serving(target, processes)
    time.sleep(0.5)
    return rss_kib(target.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/image.py: {reason}", file=sys.stderr)
        return 2
    print(ensure_image(REPO), file=sys.stderr)
    base = (image_labels(IMAGE) or {})[BASE_LABEL]
    sizes = {"image": image_size(IMAGE), "base": image_size(base)}

    container: list[int] = []
    charged: list[int] = []
    process: list[int] = []
    with tempfile.TemporaryDirectory(prefix="drainproxy-bench-image-") as tmp:
        work = Path(tmp)
        origin_processes = Processes(work)
        try:
            origin_port = free_port()
            origin_argv = [sys.executable, "-m", "drainproxy.sim.sample_app", "--port",
                           str(origin_port), "--name", "origin"]  # fmt: skip
            origin_processes.start("origin", origin_argv, cpu=1)
            for round_ in range(args.rounds):
                round_dir = work / f"round-{round_}"
                round_dir.mkdir()
                processes = Processes(round_dir)
                try:
                    process.append(process_rss(round_dir, origin_port, processes))
                finally:
                    processes.stop_all()
                name = f"drainproxy-bench-{secrets.token_hex(3)}-{round_}"
                rss, charge = container_memory(round_dir, origin_port, processes, name)
                container.append(rss)
                charged.append(charge)
                print(
                    f"round {round_ + 1}: container {rss / 1024:.1f} MiB "
                    f"(cgroup {charge / 1024:.1f} MiB), process {process[-1] / 1024:.1f} MiB",
                    file=sys.stderr,
                )
        finally:
            origin_processes.stop_all()

    idle_container = statistics.median(container) / 1024
    idle_process = statistics.median(process) / 1024
    print(f"### The image ({IMAGE}), median of {args.rounds} rounds\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| image size | {sizes['image'] / MIB:.1f} MiB |")
    print(f"| base image size | {sizes['base'] / MIB:.1f} MiB |")
    print(f"| added by drainproxy's layers | {(sizes['image'] - sizes['base']) / MIB:.1f} MiB |")
    print(f"| RSS idle, in the container | {idle_container:.1f} MiB |")
    print(f"| RSS idle, as a process from the venv (baseline) | {idle_process:.1f} MiB |")
    print(f"| container / process | {idle_container / idle_process:.2f} |")
    print(
        "| memory charged to the container's cgroup (podman stats) | "
        f"{statistics.median(charged) / 1024:.1f} MiB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
