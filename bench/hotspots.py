"""Where drainproxy's time goes under the benchmark's load: py-spy samples it while wrk runs.

Starts the same origin and drainproxy as ``run.py`` (drainproxy alone on one core), drives wrk at
it, records with ``py-spy record --format raw`` and prints the functions with the most samples:
"self" (the function itself was running) and "total" (it was on the stack).

    .venv/bin/python bench/hotspots.py                 # closed loop, 32 connections, 10 s
    .venv/bin/python bench/hotspots.py --native        # include uvloop/httptools C frames
    .venv/bin/python bench/hotspots.py --load large    # 1 MiB responses

The raw stacks stay in ``bench/out/`` (git-ignored) for a flame graph (e.g. flamegraph.pl).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from harness import (
    LARGE_PATH,
    TINY_PATH,
    BenchError,
    Cpus,
    Processes,
    export_revision,
    missing_tools,
    raise_fd_limit,
    run_wrk,
    start_drainproxy,
    start_origin,
    wait_until_serving,
    write_lua_scripts,
)

OUT_DIR = Path(__file__).resolve().parent / "out"
_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """``handle (.../proxy.py:120)`` -> ``handle (.../proxy.py)``."""
    return _LINE_NUMBER.sub(")", frame)


def summarize(raw: str, top: int) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "py-spy recorded no samples"
    lines = [f"{samples} samples", "", f"top {top} by self samples:"]
    lines += [f"{count / samples:6.1%}  {name}" for name, count in own.most_common(top)]
    lines += ["", f"top {top} by total (on the stack) samples:"]
    lines += [f"{count / samples:6.1%}  {name}" for name, count in total.most_common(top)]
    return "\n".join(lines)


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="py-spy profile of drainproxy under wrk load")
    parser.add_argument("--seconds", type=int, default=10, help="sampling time (default 10)")
    parser.add_argument("--load", choices=("tiny", "paced", "large"), default="tiny")
    parser.add_argument("--native", action="store_true", help="sample C extension frames too")
    parser.add_argument("--idle", action="store_true", help="keep samples of the idle loop")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rev", help="profile drainproxy as committed at this git revision")
    args = parser.parse_args(argv)
    spy = py_spy_binary()
    missing = missing_tools(need_envoy=False)
    if spy is None:
        missing.append("py-spy (pip install py-spy, into the venv)")
    if missing or spy is None:
        print("hotspots: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    raise_fd_limit()
    cpus = Cpus.pick()
    OUT_DIR.mkdir(exist_ok=True)
    raw_path = OUT_DIR / f"drainproxy-{args.load}{'-native' if args.native else ''}.txt"
    with tempfile.TemporaryDirectory(prefix="drainproxy-hotspots-") as tmp:
        work = Path(tmp)
        processes = Processes(work)
        try:
            source = None
            if args.rev:
                source = work / "source"
                export_revision(args.rev, source)
            report_lua, paced_lua = write_lua_scripts(work)
            origin = start_origin(processes, work / "origin", cpus.load)
            wait_until_serving(origin, processes)
            proxy = start_drainproxy(
                processes, work / "drainproxy", origin.port, cpus.proxy, source
            )
            wait_until_serving(proxy, processes)
            assert proxy.pid is not None
            script = paced_lua if args.load == "paced" else report_lua
            url = proxy.url(LARGE_PATH if args.load == "large" else TINY_PATH)
            run_wrk(url, 32, 2, report_lua, cpus.load, processes)  # warm-up
            spy_argv = [
                spy, "record", "--pid", str(proxy.pid), "--rate", "250", "--format", "raw",
                "--nolineno", "--duration", str(args.seconds), "--output", str(raw_path),
                *(["--native"] if args.native else []), *(["--idle"] if args.idle else []),
            ]  # fmt: skip
            recorder = processes.start("py-spy", spy_argv, cpus.load, server=False)
            time.sleep(0.5)  # py-spy attaches before the load starts
            result = run_wrk(url, 32, args.seconds + 1, script, cpus.load, processes)
            recorder.wait(timeout=args.seconds + 30)
        except KeyboardInterrupt:
            print("hotspots: interrupted; stopped everything it started", file=sys.stderr)
            return 130
        except (BenchError, subprocess.TimeoutExpired) as exc:
            print(f"hotspots: {exc}", file=sys.stderr)
            return 1
        finally:
            processes.stop_all()
    print(f"load {args.load}: {result.rps:,.0f} req/s while sampled, p99 {result.p99_ms:.2f} ms")
    print(f"raw stacks: {raw_path}")
    print(summarize(raw_path.read_text() if raw_path.exists() else "", args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
