"""drainproxy benchmark: no proxy, drainproxy, nginx and Envoy, interleaved in one run.

Each proxy runs alone on one core; the origin (nginx) and wrk share the other. Every number that
decides a goal is a ratio to another target measured in the same run, because absolute numbers on
a shared 2-core machine mean little. Rounds alternate the targets so drifting noise hits all.

    .venv/bin/python bench/run.py            # 3 rounds, about 4-5 minutes
    .venv/bin/python bench/run.py --quick    # 1 short round, about 1 minute

The output is Markdown (tables plus the goal check), ready for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from harness import (
    LARGE_PATH,
    TINY_PATH,
    BenchError,
    Cpus,
    Processes,
    Target,
    WrkResult,
    envoy_binary,
    export_revision,
    idle_connections,
    missing_tools,
    nginx_binary,
    raise_fd_limit,
    rss_kib,
    run_wrk,
    start_drainproxy,
    start_envoy,
    start_nginx_proxy,
    start_origin,
    wait_until_serving,
    write_lua_scripts,
)

NO_PROXY = "no proxy"
DRAINPROXY = "drainproxy"
NGINX = "nginx"
ENVOY = "envoy"
ALL_TARGETS = (NO_PROXY, DRAINPROXY, NGINX, ENVOY)

CONNECTIONS = 32

THROUGHPUT = "throughput"
PACED = "paced"
LARGE = "large"
KINDS = (THROUGHPUT, PACED, LARGE)


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: dict[str, float]
    idle_connections: int
    warmup_seconds: float


FULL = Plan(
    rounds=3,
    seconds={THROUGHPUT: 7, PACED: 7, LARGE: 4},
    idle_connections=1000,
    warmup_seconds=2,
)
QUICK = Plan(
    rounds=1,
    seconds={THROUGHPUT: 3, PACED: 3, LARGE: 2},
    idle_connections=1000,
    warmup_seconds=1,
)


@dataclass
class Memory:
    idle_kib: int
    held_kib: int
    after_load_kib: int = 0


@dataclass
class Results:
    runs: dict[tuple[str, str], list[WrkResult]] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)

    def add(self, kind: str, target: str, result: WrkResult) -> None:
        self.runs.setdefault((kind, target), []).append(result)

    def median(self, kind: str, target: str, metric: Callable[[WrkResult], float]) -> float | None:
        runs = self.runs.get((kind, target))
        return statistics.median(metric(run) for run in runs) if runs else None

    def spread(self, kind: str, target: str, metric: Callable[[WrkResult], float]) -> str:
        runs = self.runs.get((kind, target), [])
        if len(runs) < 2:
            return ""
        values = [metric(run) for run in runs]
        return f"{min(values):,.0f}-{max(values):,.0f}"

    def errors(self) -> list[str]:
        return [
            f"{kind} {target}: {sum(run.errors for run in runs)} errors"
            for (kind, target), runs in self.runs.items()
            if any(run.errors for run in runs)
        ]


def _rps(run: WrkResult) -> float:
    return run.rps


def _p50(run: WrkResult) -> float:
    return run.p50_ms


def _p99(run: WrkResult) -> float:
    return run.p99_ms


def _mib(run: WrkResult) -> float:
    return run.mib_per_s


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The run


def measure(
    names: Sequence[str],
    plan: Plan,
    cpus: Cpus,
    work: Path,
    processes: Processes,
    source: Path | None,
) -> Results:
    results = Results()
    report_lua, paced_lua = write_lua_scripts(work)
    origin = start_origin(processes, work / "origin", cpus.load)
    wait_until_serving(origin, processes)
    targets = _start_proxies(names, processes, work, origin, cpus, source)

    for target in targets:
        if target.pid is not None:
            results.memory[target.name] = _memory(target, plan.idle_connections)

    progress("warming up")
    for target in targets:
        run_wrk(
            target.url(TINY_PATH),
            CONNECTIONS,
            plan.warmup_seconds,
            report_lua,
            cpus.load,
            processes,
        )

    scripts = {THROUGHPUT: report_lua, PACED: paced_lua, LARGE: report_lua}
    paths = {THROUGHPUT: TINY_PATH, PACED: TINY_PATH, LARGE: LARGE_PATH}
    for round_index in range(plan.rounds):
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        for kind in KINDS:
            for target in order:
                result = run_wrk(
                    target.url(paths[kind]),
                    CONNECTIONS,
                    plan.seconds[kind],
                    scripts[kind],
                    cpus.load,
                    processes,
                )
                results.add(kind, target.name, result)
                progress(
                    f"round {round_index + 1}/{plan.rounds} {kind:10} {target.name:10} "
                    f"{result.rps:9,.0f} req/s  p99 {result.p99_ms:6.2f} ms"
                    + (f"  {result.mib_per_s:6.0f} MiB/s" if kind == LARGE else "")
                    + (f"  {result.errors} ERRORS" if result.errors else "")
                )

    for target in targets:
        if target.pid is not None:
            results.memory[target.name].after_load_kib = rss_kib(target.pid)
    return results


def _start_proxies(
    names: Sequence[str],
    processes: Processes,
    work: Path,
    origin: Target,
    cpus: Cpus,
    source: Path | None,
) -> list[Target]:
    targets = []
    for name in names:
        if name == NO_PROXY:
            targets.append(Target(NO_PROXY, origin.port, None))
        elif name == DRAINPROXY:
            targets.append(
                start_drainproxy(processes, work / name, origin.port, cpus.proxy, source)
            )
        elif name == NGINX:
            targets.append(start_nginx_proxy(processes, work / name, origin.port, cpus.proxy))
        elif name == ENVOY:
            targets.append(start_envoy(processes, work / name, origin.port, cpus.proxy))
    for target in targets:
        wait_until_serving(target, processes)
    return targets


def _memory(target: Target, count: int) -> Memory:
    """RSS of a freshly started proxy that has answered one request, then while holding ``count``
    idle keep-alive connections (each after one request)."""
    assert target.pid is not None
    time.sleep(0.5)  # let start-up allocations and the first request settle before reading RSS
    idle = rss_kib(target.pid)
    with idle_connections(target, count):
        time.sleep(0.5)
        held = rss_kib(target.pid)
    progress(
        f"memory {target.name:10} idle {idle / 1024:.1f} MiB, {count} idle conns "
        f"{held / 1024:.1f} MiB"
    )
    return Memory(idle_kib=idle, held_kib=held)


# ---------------------------------------------------------------------------------------------
# Reporting


def _rounds(count: int) -> str:
    return f"{count} round" + ("" if count == 1 else "s")


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(names: Sequence[str], plan: Plan, results: Results) -> tuple[str, bool]:
    """The Markdown report and whether every drainproxy goal was met."""
    r = results
    sections = [
        f"### Throughput: tiny responses, {CONNECTIONS} keep-alive connections, closed loop "
        f"(median of {_rounds(plan.rounds)} of {plan.seconds[THROUGHPUT]:g} s)",
        _table(
            ["target", "req/s", "range", "p50 ms", "p99 ms", "vs no proxy", "vs Envoy"],
            [
                [
                    name,
                    _fmt(r.median(THROUGHPUT, name, _rps), ",.0f"),
                    r.spread(THROUGHPUT, name, _rps),
                    _fmt(r.median(THROUGHPUT, name, _p50), ".3f"),
                    _fmt(r.median(THROUGHPUT, name, _p99), ".3f"),
                    _fmt(
                        _ratio(
                            r.median(THROUGHPUT, name, _rps), r.median(THROUGHPUT, NO_PROXY, _rps)
                        ),
                        ".2f",
                    ),
                    _fmt(
                        _ratio(r.median(THROUGHPUT, name, _rps), r.median(THROUGHPUT, ENVOY, _rps)),
                        ".2f",
                    ),
                ]
                for name in names
            ],
        ),
        f"### Latency at about 1,000 req/s: {CONNECTIONS} connections, random 1-63 ms pause "
        f"between requests (median of {_rounds(plan.rounds)} of {plan.seconds[PACED]:g} s)",
        _table(
            ["target", "achieved req/s", "p50 ms", "p99 ms", "p99 vs Envoy"],
            [
                [
                    name,
                    _fmt(r.median(PACED, name, _rps), ",.0f"),
                    _fmt(r.median(PACED, name, _p50), ".3f"),
                    _fmt(r.median(PACED, name, _p99), ".3f"),
                    _fmt(_ratio(r.median(PACED, name, _p99), r.median(PACED, ENVOY, _p99)), ".2f"),
                ]
                for name in names
            ],
        ),
        f"### 1 MiB responses, {CONNECTIONS} connections "
        f"(median of {_rounds(plan.rounds)} of {plan.seconds[LARGE]:g} s)",
        _table(
            ["target", "MiB/s", "req/s", "p99 ms", "vs no proxy", "vs Envoy"],
            [
                [
                    name,
                    _fmt(r.median(LARGE, name, _mib), ",.0f"),
                    _fmt(r.median(LARGE, name, _rps), ",.0f"),
                    _fmt(r.median(LARGE, name, _p99), ".1f"),
                    _fmt(
                        _ratio(r.median(LARGE, name, _mib), r.median(LARGE, NO_PROXY, _mib)), ".2f"
                    ),
                    _fmt(_ratio(r.median(LARGE, name, _mib), r.median(LARGE, ENVOY, _mib)), ".2f"),
                ]
                for name in names
            ],
        ),
        f"### Memory (RSS of the process tree; nginx = master + worker), "
        f"{plan.idle_connections:,} idle keep-alive connections",
        _table(
            ["target", "idle MiB", "holding conns MiB", "KiB per conn", "after the load MiB"],
            [
                [
                    name,
                    f"{m.idle_kib / 1024:.1f}",
                    f"{m.held_kib / 1024:.1f}",
                    f"{(m.held_kib - m.idle_kib) / plan.idle_connections:.1f}",
                    f"{m.after_load_kib / 1024:.1f}",
                ]
                for name, m in r.memory.items()
            ],
        ),
    ]
    goals, all_met = _goals(plan, results)
    sections += ["### drainproxy against its goals", goals]
    if errors := results.errors():
        sections += ["**wrk reported errors:** " + "; ".join(errors)]
    return "\n\n".join(sections) + "\n", all_met


def _goals(plan: Plan, r: Results) -> tuple[str, bool]:
    rps = r.median(THROUGHPUT, DRAINPROXY, _rps)
    p99 = r.median(PACED, DRAINPROXY, _p99)
    mib = r.median(LARGE, DRAINPROXY, _mib)
    memory = r.memory.get(DRAINPROXY)
    per_conn = (memory.held_kib - memory.idle_kib) / plan.idle_connections if memory else None
    checks: list[tuple[str, float | None, str, Callable[[float], bool]]] = [
        (
            "throughput vs no proxy",
            _ratio(rps, r.median(THROUGHPUT, NO_PROXY, _rps)),
            "≥ 0.45",
            lambda v: v >= 0.45,
        ),
        (
            "throughput vs Envoy",
            _ratio(rps, r.median(THROUGHPUT, ENVOY, _rps)),
            "≥ 1.5",
            lambda v: v >= 1.5,
        ),
        (
            "p99 at ~1,000 req/s vs Envoy",
            _ratio(p99, r.median(PACED, ENVOY, _p99)),
            "≤ 1.0",
            lambda v: v <= 1.0,
        ),
        ("RSS idle (MiB)", memory.idle_kib / 1024 if memory else None, "≤ 35", lambda v: v <= 35),
        ("RSS per idle keep-alive connection (KiB)", per_conn, "≤ 6", lambda v: v <= 6),
        (
            "1 MiB responses vs Envoy",
            _ratio(mib, r.median(LARGE, ENVOY, _mib)),
            "≥ 0.8",
            lambda v: v >= 0.8,
        ),
    ]
    rows = []
    all_met = True
    for name, value, goal, met in checks:
        verdict = "not measured" if value is None else ("met" if met(value) else "**MISSED**")
        all_met = all_met and value is not None and met(value)
        rows.append([name, _fmt(value, ".2f"), goal, verdict])
    return _table(["goal", "measured", "target", "verdict"], rows), all_met


def describe_setup(cpus: Cpus, command: str, commit: str | None) -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    versions = [
        f"Python {platform.python_version()}",
        f"drainproxy {_package_version('drainproxy')} ({_drainproxy_source(commit)})",
        f"uvloop {_package_version('uvloop')}",
        f"httptools {_package_version('httptools')}",
        _first_line([nginx_binary() or "nginx", "-v"]),
        "envoy " + _first_line([envoy_binary() or "envoy", "--version"]).rpartition("version: ")[2],
        _first_line(["wrk", "--version"]).partition(" [")[0],
    ]
    return (
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}; "
        f"proxy on CPU {cpus.proxy}, origin + wrk on CPU {cpus.load}\n"
        f"- versions: {', '.join(versions)}\n"
        f"- command: `{command}`\n"
    )


def _drainproxy_source(commit: str | None) -> str:
    """Which code ran: an exported commit, or the working tree (and whether it had edits)."""
    if commit is not None:
        return f"commit {commit[:12]}"
    repo = Path(__file__).resolve().parent.parent
    head = _first_line(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"])
    edits = _first_line(["git", "-C", str(repo), "status", "--porcelain", "drainproxy"])
    return f"working tree at {head}" + (" with uncommitted edits" if edits != "git ?" else "")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return f"{argv[0]} not found"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else f"{argv[0]} ?"


# ---------------------------------------------------------------------------------------------
# Entry point


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 short round (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds of every target (default 3, quick 1)")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of: {', '.join(ALL_TARGETS)}",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a drainproxy goal is missed"
    )
    parser.add_argument(
        "--rev",
        help="measure drainproxy as committed at this git revision (default: the working tree)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_TARGETS]
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)} (known: {', '.join(ALL_TARGETS)})")
    args.names = [name for name in ALL_TARGETS if name in names]
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        parser.error("--rounds: must be from 1 to 20")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(args.rounds, plan.seconds, plan.idle_connections, plan.warmup_seconds)
    missing = missing_tools(need_envoy=ENVOY in args.names)
    if DRAINPROXY in args.names and importlib.util.find_spec("drainproxy") is None:
        missing.append(f"drainproxy (pip install -e . with {sys.executable})")
    if missing:
        print("bench: missing " + "; ".join(missing), file=sys.stderr)
        print("bench: `bash bench/setup` installs them all", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM both end in the ``finally`` that stops everything, even when this was
    # started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    raise_fd_limit()
    cpus = Cpus.pick()
    os.sched_setaffinity(0, {cpus.load})
    repo = Path(__file__).resolve().parent.parent
    python = Path(sys.executable)
    shown = python.relative_to(repo) if python.is_relative_to(repo) else python
    command = shlex.join([str(shown), "bench/run.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="drainproxy-bench-") as tmp:
        processes = Processes(Path(tmp))
        try:
            commit = source = None
            if args.rev:
                source = Path(tmp) / "source"
                commit = export_revision(args.rev, source)
            results = measure(args.names, plan, cpus, Path(tmp), processes, source)
        except KeyboardInterrupt:
            print("bench: interrupted; stopped everything it started", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            processes.stop_all()
    text, all_met = report(args.names, plan, results)
    print(describe_setup(cpus, command, commit))
    print(text)
    return 1 if args.check and not all_met else 0


if __name__ == "__main__":
    sys.exit(main())
