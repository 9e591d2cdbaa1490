"""The admin rules seen from a peer outside loopback: a network namespace joined to this one by a
veth pair (the CI runs as root; the namespace and the pair are removed afterwards). Probes are
open; POST /drain and GET /prestop need admin.token, else 403, a log line, and no change."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from drainproxy.control import admin, drainctl
from drainproxy.control.admin import is_authorized
from tests.conftest import StartProxy
from tests.proxy_support import RawApp
from tests.support import free_port

TOKEN = "s3cret-token"
#: Runs inside the namespace: one request, prints status and body as JSON.
CLIENT = """
import http.client, json, sys
method, url, token = sys.argv[1], sys.argv[2], sys.argv[3]
host, _, rest = url.partition("//")[2].partition("/")
conn = http.client.HTTPConnection(host, timeout=10)
conn.request(method, "/" + rest, headers={"X-Drainproxy-Token": token} if token else {})
response = conn.getresponse()
print(json.dumps([response.status, response.read().decode()]))
"""


class Peer:
    """A network namespace with one veth end; the other end (and an address) stays here."""

    def __init__(self) -> None:
        suffix = os.getpid() % 100000
        self.namespace = f"dpns{suffix}"
        self.host_link, self.peer_link = f"dpv{suffix}h", f"dpv{suffix}p"
        subnet = f"10.213.{os.getpid() % 250}"
        self.host_address, self.peer_address = f"{subnet}.1", f"{subnet}.2"

    def up(self) -> None:
        ns = ["ip", "netns", "exec", self.namespace]
        for command in (
            ["ip", "netns", "add", self.namespace],
            ["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.peer_link],
            ["ip", "link", "set", self.peer_link, "netns", self.namespace],
            ["ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_link],
            ["ip", "link", "set", self.host_link, "up"],
            [*ns, "ip", "addr", "add", f"{self.peer_address}/30", "dev", self.peer_link],
            [*ns, "ip", "link", "set", self.peer_link, "up"],
            [*ns, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=10)

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, timeout=10)

    async def call(self, method: str, url: str, token: str = "") -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.namespace,
            sys.executable,
            "-c",
            CLIENT,
            method,
            url,
            token,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err.decode()
        status, body = json.loads(out)
        return status, body


@pytest.fixture
def peer() -> Iterator[Peer]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (the CI runs as root)")
    namespace = Peer()
    try:
        namespace.up()
    except (OSError, subprocess.CalledProcessError) as exc:
        namespace.down()
        pytest.skip(f"cannot create a network namespace here: {exc}")
    yield namespace
    namespace.down()


async def test_state_changes_from_outside_loopback_need_the_token(
    peer: Peer, raw_app: RawApp, start_proxy: StartProxy
) -> None:
    admin_port = free_port()
    proxy = await start_proxy(
        raw_app.port, {"admin": {"listen": f"0.0.0.0:{admin_port}", "token": TOKEN}}
    )
    admin = f"http://{peer.host_address}:{admin_port}"
    for path in ("/live", "/ready", "/status", "/metrics"):
        status, _ = await peer.call("GET", admin + path)
        assert status in (200, 503), path

    for method, path, token in (
        ("POST", "/drain", ""),
        ("POST", "/drain", "wrong"),
        ("GET", "/prestop", ""),
        ("GET", "/prestop", TOKEN + "x"),
    ):
        status, body = await peer.call(method, admin + path, token)
        assert (status, body) == (403, "forbidden: missing or wrong X-Drainproxy-Token\n")
        await proxy.log.wait(
            re.escape(f"403 for {method} {path} from {peer.peer_address}: ")
            + "missing or wrong X-Drainproxy-Token; nothing changed"
        )
    status, body = await peer.call("GET", admin + "/status")
    assert json.loads(body)["phase"] == "serving"

    status, _ = await peer.call("POST", admin + "/drain", TOKEN)
    assert status == 202
    status, body = await peer.call("GET", admin + "/status")
    assert json.loads(body)["phase"] != "serving"


@pytest.mark.parametrize(
    ("token", "remote", "given", "allowed"),
    [
        (None, "127.0.0.1", None, True),
        (None, "::1", None, True),
        (None, "::ffff:127.0.0.1", None, True),
        (None, "10.0.0.7", None, False),
        (None, "10.0.0.7", "anything", False),
        ("s3cret", "10.0.0.7", "s3cret", True),
        ("s3cret", "10.0.0.7", "s3cre", False),
        ("s3cret", "10.0.0.7", "s3cret ", False),
        ("s3cret", "10.0.0.7", None, False),
        ("s3cret", "-", "wrong", False),
        ("s\u00e9cret", "10.0.0.7", "s\u00e9cret".encode().decode("latin-1"), True),
    ],
)
def test_token_rule(token: str | None, remote: str, given: str | None, allowed: bool) -> None:
    """Loopback needs no token; elsewhere only the configured one (header values arrive as
    latin-1, so a UTF-8 token matches its own bytes)."""
    assert is_authorized(token, remote, given) is allowed


def test_drain_command_sends_the_header_the_admin_reads() -> None:
    """drainctl keeps its own copy, so that `drainproxy drain` does not import the admin."""
    assert drainctl.TOKEN_HEADER == admin.TOKEN_HEADER
