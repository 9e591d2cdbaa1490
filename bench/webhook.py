"""The admission webhook's cost: time per AdmissionReview, as the API server sees it, and the
webhook process's memory. The MutatingWebhookConfiguration gives it ``timeoutSeconds: 5`` and
every pod creation in a labelled namespace waits on it.

    .venv/bin/python bench/webhook.py [--reviews 500]

Starts ``drainproxy webhook`` as a process with a trustme certificate, sends the reviews one at a
time over one keep-alive TLS connection (the API server reuses connections), each for the Pod of
tests/manifests/wordpress.yaml, and prints the latency percentiles, the reviews per second and the
webhook's RSS before and after. Needs the test extras (trustme, aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent


def pod() -> dict[str, Any]:
    docs = yaml.safe_load_all((REPO / "tests" / "manifests" / "wordpress.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    metadata = dict(template["metadata"], generateName="blog-wordpress-", namespace="blog")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def review(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "blog",
            "operation": "CREATE",
            "object": obj,
        },
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def measure(reviews: int) -> dict[str, float]:
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "drainproxy", "webhook", "--listen", "127.0.0.1:0",
            "--tls-cert", str(cert), "--tls-key", str(key),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        port = int(line.rsplit(" ", 1)[1])
        rss_idle = rss_kib(process.pid)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        url = f"https://127.0.0.1:{port}/mutate"
        body = pod()
        times = []
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(reviews):
                    payload = json.dumps(review(body))
                    started = time.perf_counter()
                    async with session.post(url, data=payload, ssl=context) as response:
                        answer = await response.json()
                    times.append(time.perf_counter() - started)
                    assert answer["response"]["patchType"] == "JSONPatch"
            rss_after = rss_kib(process.pid)
        finally:
            process.terminate()
            await process.wait()
    times.sort()
    return {
        "reviews": reviews,
        "p50 ms": 1000 * statistics.median(times),
        "p99 ms": 1000 * times[int(0.99 * (len(times) - 1))],
        "reviews/s": len(times) / sum(times),
        "RSS idle MiB": rss_idle / 1024,
        "RSS after MiB": rss_after / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=500)
    args = parser.parse_args()
    results = asyncio.run(measure(args.reviews))
    for name, value in results.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
