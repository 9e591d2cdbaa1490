"""The admin token is compared with ``hmac.compare_digest``, whose import loads OpenSSL's digests
(``_hashlib``, about 0.7 MiB of RSS in every pod): serve imports it at the first token to
compare, not before. Seen from a real process with ``python -X importtime``; that the token is
still checked from outside loopback is test_admin_remote's."""

from __future__ import annotations

import signal

from tests.conftest import StartProxy
from tests.proxy_support import RawApp, RawClient
from tests.test_imports import IMPORTTIME, imported


async def test_probes_status_and_a_loopback_drain_load_no_openssl_digest(
    raw_app: RawApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        raw_app.port,
        {"admin": {"token": "s3cret"}, "drain": {"propagation": "0s"}},
        launcher=IMPORTTIME,
    )
    admin = await RawClient.connect(int(proxy.admin_url.rpartition(":")[2]))
    try:
        assert (await admin.request(b"GET", b"/ready")).status == 200
        assert (await admin.request(b"GET", b"/status")).status == 200
        assert (await admin.request(b"POST", b"/drain")).status == 202  # loopback: no token
    finally:
        await admin.close()
    await proxy.log.wait(r"phase stopping_app -> drained")
    proxy.send(signal.SIGTERM)
    assert await proxy.exited() == 0
    modules = imported(proxy.log.text())
    assert "drainproxy.control.admin" in modules  # the run is the one this test is about
    assert not {"hmac", "hashlib", "_hashlib"} & modules
