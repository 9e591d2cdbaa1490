"""``drainproxy drain``: start the drain of a running drainproxy from inside its pod.

Made for exec preStop hooks, above all a native sidecar's own hook, which must start the drain
at pod deletion (its SIGTERM comes only after the app has exited). ``POST /drain`` marks the
drain as an admin drain, so drainproxy stays drained until its SIGTERM instead of recovering
as it does after a ``/prestop``-only drain (a liveness restart of the app).
"""

from __future__ import annotations

import urllib.error
import urllib.request

from drainproxy.config import Config
from drainproxy.errors import DrainproxyError

#: The admin API's token header (``drainproxy.admin.TOKEN_HEADER``; not imported from there, so
#: ``drainproxy drain`` loads neither h11 nor the server).
TOKEN_HEADER = "X-Drainproxy-Token"

#: Seconds to wait for drainproxy to accept the drain request.
REQUEST_TIMEOUT = 10.0


class DrainRequestError(DrainproxyError):
    """The running drainproxy could not be reached, or refused the request."""


def admin_url(config: Config, path: str) -> str:
    """The admin listener as seen from inside the pod: wildcard binds are reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        config.admin.listen.host, config.admin.listen.host
    )
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{config.admin.listen.port}{path}"


def _call(config: Config, method: str, path: str, timeout: float) -> str:
    url = admin_url(config, path)
    request = urllib.request.Request(url, method=method)
    if config.admin.token is not None:
        request.add_header(TOKEN_HEADER, config.admin.token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: bytes = response.read()
            return answer.decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        raise DrainRequestError(f"{method} {url} answered {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DrainRequestError(f"{method} {url} failed: {reason}") from None


def request_drain(config: Config, wait: bool) -> str:
    """Start the drain; with ``wait``, return only once it is over and the app is released."""
    outcome = _call(config, "POST", "/drain", REQUEST_TIMEOUT)
    if wait:
        outcome = _call(config, "GET", "/prestop", config.termination_grace_period)
    return outcome
