"""TLS contexts: the listener's, with certificates re-read when their files change, and the one
for connecting to an https app.

The listener is created once with one ``SSLContext``; asyncio offers no way to swap it. That
context's ``sni_callback`` runs for every handshake (with or without SNI) and points the new
connection at the newest context, so a rotated certificate applies to new connections without
touching the listener, and open connections keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl

from drainproxy.config.schema import ListenerTLSConfig, UpstreamTLSConfig
from drainproxy.errors import ConfigError

log = logging.getLogger("drainproxy.tls")

_CLIENT_CERT_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}

FileStamp = tuple[tuple[int, int, int, int], ...]


class ListenerTLS:
    """The listener's SSLContext (``context``) and the reloading behind it."""

    def __init__(self, config: ListenerTLSConfig) -> None:
        self.config = config
        self._files = [
            path
            for path in (config.cert_file, config.key_file, config.client_ca_file)
            if path is not None
        ]
        self._stamp = self._file_stamp()
        try:
            self.context = self._build()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "tls.cert_file", config.cert_file, f"cannot be loaded: {exc}"
            ) from None
        self._current = self.context
        self.context.sni_callback = self._select
        self.reloads = 0

    def _build(self) -> ssl.SSLContext:
        config = self.config
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(config.cert_file, config.key_file)
        if config.client_ca_file is not None:
            context.load_verify_locations(config.client_ca_file)
        context.verify_mode = _CLIENT_CERT_MODES[config.client_cert]
        # HTTP/2 first, as clients that offer it prefer it (docs/http2.md).
        context.set_alpn_protocols(["h2", "http/1.1"])
        return context

    def _select(
        self,
        connection: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        base: ssl.SSLContext,
    ) -> None:
        if self._current is not base:
            connection.context = self._current

    def _file_stamp(self) -> FileStamp:
        """Identity and age of every file, following symlinks (a Secret update swaps a link)."""
        stamps = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0, 0))
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def check_files(self) -> None:
        """Re-read the files if they changed. A set that does not load (a half-written update)
        is logged, and the previous certificate stays in use until the files change again."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            context = self._build()
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "TLS files changed but cannot be loaded (%s); still serving the previous "
                "certificate",
                exc,
                extra={"event": "tls_reload_failed"},
            )
            return
        self._current = context
        self.reloads += 1
        log.info(
            "TLS certificate reloaded from %s", self.config.cert_file, extra={"event": "tls_reload"}
        )


def upstream_context(config: UpstreamTLSConfig) -> ssl.SSLContext:
    """The client context for an https app."""
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
        if config.cert_file is not None and config.key_file is not None:
            context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("upstream.tls", config.ca_file, f"cannot be loaded: {exc}") from None
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context
