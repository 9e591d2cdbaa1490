"""``drainproxy webhook``: a mutating admission webhook that injects drainproxy into new Pods.

The API server sends ``POST /mutate`` an ``admission.k8s.io/v1`` AdmissionReview for every Pod
created in a selected namespace; the answer allows it, with a JSONPatch (RFC 6902) that makes
of the Pod what ``drainproxy inject`` makes of it: ``inject_pod`` transforms the pod, and
``json_patch`` diffs the result. A webhook can change only the Pod it is asked about, so the
config travels in the Pod's annotation ``drainproxy.io/config`` (a downwardAPI volume makes it
the config file) instead of a ConfigMap, and Services that target the app's port by number
must be pointed at drainproxy once by hand (or with ``drainproxy inject``).

The webhook never refuses a Pod: one it cannot inject is allowed unchanged, with the reason as
an admission warning (shown by kubectl) and in the log. The MutatingWebhookConfiguration in
k8s/webhook/ uses ``failurePolicy: Ignore`` too, so a webhook that is down delays nothing.

aiohttp is imported here only, so ``serve``, ``drain`` and ``check`` never load it.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from drainproxy.config.schema import ListenerTLSConfig
from drainproxy.errors import ConfigError
from drainproxy.kube.inject import InjectError, InjectOptions, inject_pod
from drainproxy.system.tls import ListenerTLS

log = logging.getLogger("drainproxy.webhook")

OPTIONS_KEY = web.AppKey("options", InjectOptions)
DRAINING_KEY = web.AppKey("draining", asyncio.Event)
#: How often the certificate files are checked for a rotation (cert-manager renews in place).
CERT_CHECK_INTERVAL = 10.0


def _pointer(path: tuple[str | int, ...]) -> str:
    """An RFC 6901 JSON Pointer: ``~`` and ``/`` in keys escaped as ``~0`` and ``~1``."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def json_patch(old: object, new: object, path: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn ``old`` into ``new``: objects key by key, lists item by
    item when they only grow (inject appends), anything else replaced whole."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = [
            {"op": "remove", "path": _pointer((*path, key))} for key in old if key not in new
        ]
        for key, value in new.items():
            if key in old:
                ops += json_patch(old[key], value, (*path, key))
            else:
                ops.append({"op": "add", "path": _pointer((*path, key)), "value": value})
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old):
        ops = []
        for index, item in enumerate(old):
            ops += json_patch(item, new[index], (*path, index))
        for index in range(len(old), len(new)):
            ops.append({"op": "add", "path": _pointer((*path, index)), "value": new[index]})
        return ops
    return [{"op": "replace", "path": _pointer(path), "value": new}]


class ReviewError(ValueError):
    """The request body is not an AdmissionReview this webhook can answer (HTTP 400)."""


def _owned_by_job(pod: Mapping[str, Any]) -> bool:
    owners = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(o, dict) and o.get("kind") == "Job" for o in owners)


def admission_response(review: object, options: InjectOptions) -> dict[str, Any]:
    """The AdmissionReview that answers ``review`` (the API server's request, parsed JSON).
    Raises ReviewError when it is not an ``admission.k8s.io/v1`` AdmissionReview."""
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise ReviewError("the body is not an AdmissionReview")
    if review.get("apiVersion") != "admission.k8s.io/v1":
        raise ReviewError(f"apiVersion {review.get('apiVersion')!r}: only admission.k8s.io/v1")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise ReviewError("the AdmissionReview has no request with a uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
    pod = request.get("object")
    kind = request.get("kind")
    if (
        not isinstance(kind, dict)
        or kind.get("kind") != "Pod"
        or request.get("operation") != "CREATE"
        or not isinstance(pod, dict)
    ):
        return answer
    found = pod.get("metadata")
    metadata: dict[str, Any] = found if isinstance(found, dict) else {}
    name = metadata.get("name") or metadata.get("generateName") or "?"
    namespace = request.get("namespace") or metadata.get("namespace") or "?"
    where = f"pod {namespace}/{name}"
    if _owned_by_job(pod) or not isinstance(pod.get("spec"), dict):
        return answer
    try:
        injected = inject_pod(
            where, f"Pod {name}", metadata, pod["spec"], options, config_source="annotation"
        )
    except InjectError as exc:
        log.warning("not injected: %s", exc, extra={"event": "webhook_not_injected"})
        response["warnings"] = [f"drainproxy not injected: {exc}"]
        return answer
    except Exception:  # a bug must not keep pods from being created: admit, and say so
        log.exception("not injected: %s", where, extra={"event": "webhook_failed"})
        response["warnings"] = ["drainproxy not injected: the webhook failed (see its log)"]
        return answer
    if injected is None:
        return answer
    mutated = copy.deepcopy(pod)
    mutated["metadata"] = injected.metadata
    mutated["spec"] = injected.spec
    patch = json_patch(pod, mutated)
    response["patchType"] = "JSONPatch"
    response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    log.info(
        "injected drainproxy into %s: app port %d; Services must target port %s",
        where,
        injected.app_port,
        injected.listen_name,
        extra={"event": "webhook_injected"},
    )
    return answer


async def mutate(request: web.Request) -> web.Response:
    try:
        review = await request.json()
        answer = admission_response(review, request.app[OPTIONS_KEY])
    except (ValueError, UnicodeDecodeError) as exc:  # ReviewError and JSON errors
        log.warning("400 for %s: %s", request.path, exc, extra={"event": "webhook_bad_review"})
        return web.Response(status=400, text=f"bad AdmissionReview: {exc}\n")
    return web.json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    """The readiness probe: 503 once the webhook is shutting down, so its endpoint goes."""
    if request.app[DRAINING_KEY].is_set():
        return web.Response(status=503, text="shutting down\n")
    return web.Response(text="ok\n")


@dataclass
class RunningWebhook:
    port: int
    #: Set when shutting down: /healthz fails, reviews are still answered.
    draining: asyncio.Event
    stop: Callable[[], Awaitable[None]]


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:8443`` for IPv6); port 0 picks a free one (tests).
    Raises ConfigError naming ``--listen``."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ConfigError("--listen", text, "must be HOST:PORT with a port from 0 to 65535")
    return host.strip("[]") or "0.0.0.0", int(port)


async def start_webhook(
    listen: str, cert_file: str, key_file: str, options: InjectOptions
) -> RunningWebhook:
    """Serve the webhook over TLS; returns the bound port, the shutdown flag and the coroutine
    that stops it. Raises ConfigError for a bad address or certificate, OSError when it
    cannot bind."""
    host, port = listen_address(listen)
    tls = ListenerTLS(ListenerTLSConfig(cert_file=cert_file, key_file=key_file))
    # A Pod is at most what etcd stores (1.5 MiB); the review holds it once or twice.
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[OPTIONS_KEY] = options
    app[DRAINING_KEY] = draining = asyncio.Event()
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])

    async def watch_certificate() -> None:
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL)
            tls.check_files()

    watcher = asyncio.create_task(watch_certificate())

    async def stop() -> None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await runner.cleanup()

    return RunningWebhook(port, draining, stop)


async def run_webhook(
    listen: str, cert_file: str, key_file: str, options: InjectOptions, shutdown_delay: float
) -> None:
    """Serve until SIGTERM or SIGINT; then, as drainproxy does for an app, fail readiness but
    keep answering for ``shutdown_delay`` seconds while the webhook's endpoint is removed (a
    review sent to a closed port would admit its pod without drainproxy, under
    ``failurePolicy: Ignore``), then finish the reviews in progress and return."""
    running = await start_webhook(listen, cert_file, key_file, options)
    log.info("webhook listening on port %d", running.port, extra={"event": "webhook_started"})
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    running.draining.set()
    log.info(
        "shutting down: /healthz fails, reviews still answered for %gs",
        shutdown_delay,
        extra={"event": "webhook_draining"},
    )
    await asyncio.sleep(shutdown_delay)
    await running.stop()
    log.info("webhook stopped", extra={"event": "webhook_stopped"})
