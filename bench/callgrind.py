"""Instructions per proxied exchange, counted by ``valgrind --tool=callgrind`` (noise-free A/B).

wrk ratios on a shared 2-core machine move by 2x from run to run; the number of instructions the
proxy process executes for the same exchanges does not (a fixed hash seed, one client, one
connection, requests sent one after another). For each build:

1. start ``drainproxy serve`` under callgrind with instrumentation off (start-up runs at about
   a tenth of native speed instead of a fiftieth), before an nginx origin answering 13 bytes;
2. send warm-up exchanges (the pooled app connection, first-call paths), then turn
   instrumentation on;
3. per repetition, two windows: zero the counters, send N exchanges on the one keep-alive
   connection, dump; zero, send 2N, dump. Instructions per exchange = (Ir(2N) - Ir(N)) / N, so
   what a window costs whatever its length (the ``callgrind_control`` round trips) cancels.

Only the proxy process is counted (not the origin, not this client). The repetitions show how
deterministic the count is (they agree to well under 1%); compare builds with ``--rev``::

    .venv/bin/python bench/callgrind.py                       # the working tree
    .venv/bin/python bench/callgrind.py --rev main --rev HEAD # two commits, same run
    make callgrind CALLGRIND_ARGS="--rev main --rev HEAD"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from harness import (
    LARGE_PATH,
    TINY_PATH,
    BenchError,
    Processes,
    Target,
    exchange,
    export_revision,
    missing_tools,
    start_origin,
    wait_until_serving,
)

from drainproxy.sim.replica import free_port

_SUMMARY = re.compile(r"^summary: (\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class Build:
    """What is measured: the working tree (``source`` None) or a commit exported to ``source``."""

    label: str
    source: Path | None


@dataclass(frozen=True)
class Count:
    """One repetition: instructions in a window of N exchanges and in one of 2N."""

    single: int
    double: int
    exchanges: int

    @property
    def per_exchange(self) -> float:
        return (self.double - self.single) / self.exchanges


def callgrind_config(port: int, admin_port: int, origin_port: int) -> dict[str, object]:
    """The benchmark's defaults, and an app check too rare to fall into a window."""
    return {
        "listen": f"127.0.0.1:{port}",
        "upstream": {"url": f"http://127.0.0.1:{origin_port}", "check": {"interval": 3600}},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"level": "warning"},
        "drain": {"propagation": "0s", "timeout": "1s"},
    }


def _control(pid: int, *args: str) -> None:
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0 or "OK" not in done.stdout:
        raise BenchError(f"callgrind_control {' '.join(args)} {pid}: {done.stdout}{done.stderr}")


def _dump(pid: int, out: Path) -> int:
    """Dump the counters and return the instructions since the last zero."""
    before = set(out.parent.glob(f"{out.name}.*"))
    _control(pid, "--dump")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(out.parent.glob(f"{out.name}.*")) - before:
            match = _SUMMARY.search(path.read_text())
            if match is not None:
                path.unlink()
                return int(match.group(1))
        time.sleep(0.1)
    raise BenchError(f"callgrind wrote no dump beside {out}")


def _window(pid: int, out: Path, sock: socket.socket, port: int, path: str, exchanges: int) -> int:
    _control(pid, "--zero")
    for _ in range(exchanges):
        status = exchange(sock, path, port)
        if status != 200:
            raise BenchError(f"drainproxy answered {status} under callgrind")
    return _dump(pid, out)


def measure(
    build: Build,
    origin_port: int,
    path: str,
    exchanges: int,
    repetitions: int,
    warmup: int,
    work: Path,
    processes: Processes,
) -> list[Count]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "drainproxy.yaml"
    conf.write_text(yaml.safe_dump(callgrind_config(port, free_port(), origin_port)))
    out = work / "callgrind.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "drainproxy",
        "serve",
        "--config",
        str(conf),
    ]
    env = {"PYTHONHASHSEED": "0"}
    if build.source is not None:
        env["PYTHONPATH"] = str(build.source)
    cpu = min(os.sched_getaffinity(0))
    process = processes.start(f"drainproxy-{build.label}", argv, cpu, env=env)
    target = Target("drainproxy", port, process.pid)
    wait_until_serving(target, processes, timeout=180.0)
    pid = process.pid  # taskset execs valgrind, which runs Python in the same process
    counts = []
    with socket.create_connection(("127.0.0.1", port), timeout=60.0) as sock:
        for _ in range(warmup):
            exchange(sock, path, port)
        _control(pid, "--instr=on")
        for _ in range(repetitions):
            single = _window(pid, out, sock, port, path, exchanges)
            double = _window(pid, out, sock, port, path, 2 * exchanges)
            counts.append(Count(single, double, exchanges))
    processes.stop(process)
    return counts


def report(results: list[tuple[str, list[Count]]], exchanges: int, path: str) -> str:
    body = "13-byte body" if path == TINY_PATH else "1 MiB body"
    lines = [
        f"Instructions per proxied exchange (callgrind Ir; GET {path}, {body}, "
        f"one keep-alive connection, windows of {exchanges} and {2 * exchanges} exchanges)",
        "",
        "| build | Ir per exchange | repetitions | spread |",
        "|---|---|---|---|",
    ]
    first: float | None = None
    for label, counts in results:
        values = [count.per_exchange for count in counts]
        mean = sum(values) / len(values)
        spread = (max(values) - min(values)) / mean if mean else 0.0
        shown = ", ".join(f"{value:,.0f}" for value in values)
        ratio = "" if first is None else f" ({mean / first:.3f}x {results[0][0]})"
        first = mean if first is None else first
        lines.append(f"| {label} | {mean:,.0f}{ratio} | {shown} | {spread:.2%} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rev",
        action="append",
        default=[],
        help="measure drainproxy as committed at this revision (repeatable; default: the "
        "working tree); the first is the baseline of the ratios",
    )
    parser.add_argument("--exchanges", type=int, default=300, help="N (default 300)")
    parser.add_argument("--repetitions", type=int, default=2, help="default 2")
    parser.add_argument("--warmup", type=int, default=50, help="exchanges before counting")
    parser.add_argument(
        "--path",
        choices=(TINY_PATH, LARGE_PATH),
        default=TINY_PATH,
        help=f"{TINY_PATH}: 13 bytes (default); {LARGE_PATH}: 1 MiB (streaming)",
    )
    args = parser.parse_args(argv)
    if not 10 <= args.exchanges <= 100_000:
        parser.error("--exchanges: must be from 10 to 100000")
    if not 1 <= args.repetitions <= 20:
        parser.error("--repetitions: must be from 1 to 20")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools(need_envoy=False)
    if shutil.which("callgrind_control") is None:
        missing.append("valgrind (apt-get install -y valgrind)")
    if missing:
        print("callgrind: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="drainproxy-callgrind-") as tmp:
        processes = Processes(Path(tmp))
        try:
            builds = [Build("working tree", None)]
            if args.rev:
                builds = []
                for rev in args.rev:
                    source = Path(tmp) / f"source-{len(builds)}"
                    commit = export_revision(rev, source)
                    builds.append(Build(f"{rev} ({commit[:9]})", source))
            cpus = sorted(os.sched_getaffinity(0))
            origin = start_origin(processes, Path(tmp) / "origin", cpus[-1])
            wait_until_serving(origin, processes)
            results = []
            for index, build in enumerate(builds):
                print(f"callgrind: measuring {build.label}", file=sys.stderr, flush=True)
                counts = measure(
                    build,
                    origin.port,
                    args.path,
                    args.exchanges,
                    args.repetitions,
                    args.warmup,
                    Path(tmp) / f"build-{index}",
                    processes,
                )
                results.append((build.label, counts))
        except KeyboardInterrupt:
            print("callgrind: interrupted; stopped everything it started", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"callgrind: {exc}", file=sys.stderr)
            return 1
        finally:
            processes.stop_all()
    print(report(results, args.exchanges, args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
