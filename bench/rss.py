"""RSS of ``drainproxy serve`` after start-up, one proxied request and one ``/metrics`` scrape.

The number every pod pays (issue 13: at most 32 MiB). Each build is started in turn, several
times, before the same nginx origin; the table shows the median and range in MiB, and the ratio
to the first build. RSS barely depends on machine load, so builds may be measured one after
another::

    .venv/bin/python bench/rss.py                        # the working tree
    .venv/bin/python bench/rss.py --rev main --rev HEAD  # two commits, same run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml
from harness import (
    TINY_PATH,
    BenchError,
    Cpus,
    Processes,
    Target,
    drainproxy_config,
    export_revision,
    missing_tools,
    rss_kib,
    start_origin,
    wait_until_serving,
)

from drainproxy.sim.replica import free_port

REPO = Path(__file__).resolve().parent.parent
#: Issue 13: serve after start-up, one request and one scrape.
GOAL_MIB = 32.0


def rss_once(
    source: Path | None, origin_port: int, cpu: int, work: Path, processes: Processes
) -> float:
    """One fresh process: start, one request through it, one scrape; its RSS in MiB."""
    work.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    conf = work / "drainproxy.yaml"
    conf.write_text(yaml.safe_dump(drainproxy_config(port, admin_port, origin_port)))
    argv = [sys.executable, "-m", "drainproxy", "serve", "--config", str(conf)]
    env = None if source is None else {"PYTHONPATH": str(source)}
    process = processes.start("drainproxy", argv, cpu, env=env)
    try:
        wait_until_serving(Target("drainproxy", port, process.pid), processes)
        url = f"http://127.0.0.1:{admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            if b"drainproxy_requests_total" not in response.read():
                raise BenchError(f"{url} has no drainproxy_requests_total")
        return rss_kib(process.pid) / 1024
    finally:
        processes.stop(process)


def compile_bytecode(source: Path) -> None:
    """Bytecode beside the modules, as pip writes it when it installs the image's wheel."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    package = str(source / "drainproxy")
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], env=env, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rev", action="append", default=[], help="a commit to measure (repeatable)"
    )
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per build")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="load drainproxy from precompiled bytecode, as the image does (default: compile "
        "at start, as an editable install with PYTHONDONTWRITEBYTECODE=1 does)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when the last build's median is above {GOAL_MIB:g} MiB",
    )
    args = parser.parse_args(argv)
    missing = missing_tools(need_envoy=False)
    if missing:
        print("rss: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="drainproxy-rss-") as tmp:
        processes = Processes(Path(tmp))
        try:
            builds: list[tuple[str, Path | None]] = [("working tree", None)]
            if args.compiled and not args.rev:
                copy = Path(tmp) / "source-working-tree"
                shutil.copytree(REPO / "drainproxy", copy / "drainproxy")
                builds = [("working tree", copy)]
            if args.rev:
                builds = []
                for index, rev in enumerate(args.rev):
                    source = Path(tmp) / f"source-{index}"
                    builds.append((f"{rev} ({export_revision(rev, source)[:9]})", source))
            if args.compiled:
                for _, build_source in builds:
                    compile_bytecode(build_source or REPO)
            cpus = Cpus.pick()
            origin = start_origin(processes, Path(tmp) / "origin", cpus.load)
            wait_until_serving(origin, processes)
            for label, build_source in builds:
                values = [
                    rss_once(build_source, origin.port, cpus.proxy, Path(tmp) / "run", processes)
                    for _ in range(args.runs)
                ]
                rows.append((label, values))
        except BenchError as exc:
            print(f"rss: {exc}", file=sys.stderr)
            return 1
        finally:
            processes.stop_all()
    print(f"RSS of drainproxy serve after start-up, one GET {TINY_PATH} through it and one")
    loaded = "precompiled bytecode" if args.compiled else "compiled at start"
    print(f"/metrics scrape (MiB; median of {args.runs} fresh processes; {loaded})\n")
    print("| build | RSS MiB | range | vs first |")
    print("|---|---|---|---|")
    first = statistics.median(rows[0][1])
    for label, values in rows:
        median = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"| {label} | {median:.1f} | {spread} | {median / first:.2f} |")
    last = statistics.median(rows[-1][1])
    print(f"\ngoal: <= {GOAL_MIB:g} MiB: {'met' if last <= GOAL_MIB else 'MISSED'} ({last:.1f})")
    return 1 if args.check and last > GOAL_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
