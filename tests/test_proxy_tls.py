"""TLS on the listener (with client certificates and reloading) and TLS to the app, with
certificates from trustme."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.conftest import StartProxy
from tests.proxy_support import RawApp, launch_proxy
from tests.support import free_port

HELLO = b"GET /tls HTTP/1.1\r\nHost: localhost\r\n\r\n"


class SecretDir:
    """Files laid out as the kubelet mounts a Secret: names link into ``..data``, which links to
    a versioned directory; an update swaps ``..data`` in one rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    def publish(self, files: dict[str, bytes]) -> None:
        self.version += 1
        versioned = self.root / f"..v{self.version}"
        versioned.mkdir()
        for name, data in files.items():
            (versioned / name).write_bytes(data)
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        (self.root / "..data_tmp").symlink_to(versioned.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")

    def path(self, name: str) -> str:
        return str(self.root / name)


def cert_files(cert: trustme.LeafCert) -> dict[str, bytes]:
    return {"tls.crt": cert.cert_chain_pems[0].bytes(), "tls.key": cert.private_key_pem.bytes()}


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def served_certificate(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """The certificate the listener presents, and the answer to one request."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    writer.write(HELLO)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    return der, head


def listener_tls(secret: SecretDir, **settings: str) -> dict[str, Any]:
    """Config overrides for TLS on the listener with the secret's tls.crt and tls.key."""
    files = {"cert_file": secret.path("tls.crt"), "key_file": secret.path("tls.key")}
    return {"tls": {**files, **settings}}


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def test_tls_termination_and_certificate_reload(
    raw_app: RawApp, start_proxy: StartProxy, tmp_path: Path
) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    secret = SecretDir(tmp_path)
    secret.publish(cert_files(first))
    proxy = await start_proxy(raw_app.port, listener_tls(secret, reload_interval="100ms"))
    context = client_context(ca)
    seen, head = await served_certificate(proxy.port, context)
    assert seen == der(first)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert raw_app.requests[-1].header(b"x-forwarded-proto") == [b"https"]

    # A connection opened before the rotation keeps working after it.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=context, server_hostname="localhost"
    )
    secret.publish(cert_files(second))
    await proxy.log.wait(r"TLS certificate reloaded")
    seen, _ = await served_certificate(proxy.port, context)
    assert seen == der(second)
    writer.write(HELLO)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    writer.close()

    # A broken update is refused; the last good certificate stays in service.
    secret.publish({"tls.crt": b"garbage\n", "tls.key": b"garbage\n"})
    await proxy.log.wait(r"TLS files changed but cannot be loaded")
    seen, _ = await served_certificate(proxy.port, context)
    assert seen == der(second)


async def test_client_certificates_required(
    raw_app: RawApp, start_proxy: StartProxy, tmp_path: Path
) -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost")
    secret = SecretDir(tmp_path)
    secret.publish({**cert_files(server), "ca.crt": client_ca.cert_pem.bytes()})
    overrides = listener_tls(secret, client_ca_file=secret.path("ca.crt"), client_cert="required")
    proxy = await start_proxy(raw_app.port, overrides)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await served_certificate(proxy.port, client_context(ca))
    stranger = trustme.CA().issue_cert("client@example")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await served_certificate(proxy.port, client_context(ca, stranger))
    allowed = client_ca.issue_cert("client@example")
    _, head = await served_certificate(proxy.port, client_context(ca, allowed))
    assert head.startswith(b"HTTP/1.1 200 ")


async def test_tls_to_the_app(tmp_path: Path) -> None:
    ca = trustme.CA()
    app_cert = ca.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    app_cert.configure_cert(server_context)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secure {request.secure}")

    web_app = web.Application()
    web_app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(web_app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context).start()
    ca_file = tmp_path / "app-ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    wrong_ca = tmp_path / "wrong-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    trusted = await launch_proxy(
        port,
        tmp_path,
        {
            "upstream": {
                "url": f"https://localhost:{port}",
                "tls": {"ca_file": str(ca_file)},
                "check": {"kind": "http", "path": "/health"},
            }
        },
        wait_ready=True,  # the HTTP check speaks TLS too
    )
    untrusted = await launch_proxy(
        port,
        tmp_path,
        {"upstream": {"url": f"https://localhost:{port}", "tls": {"ca_file": str(wrong_ca)}}},
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # the second and third reuse the pooled TLS connection
                async with session.get(trusted.url + "/x") as response:
                    assert (response.status, await response.text()) == (200, "secure True")
            async with session.get(untrusted.url + "/x") as response:
                assert response.status == 502
                assert "certificate verify failed" in await response.text()
    finally:
        trusted.stop()
        untrusted.stop()
        await runner.cleanup()
