"""HTTP/1.1 message heads as a proxy needs them: framing checks, hop-by-hop filtering and
serialisation (RFC 9110, RFC 9112). Pure functions over ``(name, value)`` byte pairs, so header
order and duplicates survive untouched."""

from __future__ import annotations

from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 §7.6.1 plus the de-facto Keep-Alive and Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Statuses whose responses never have a body (RFC 9110 §6.4.1).
BODYLESS_STATUSES = frozenset({204, 304})

#: Methods a proxy may retry after a connection failure with no response (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: Connection may name fields to drop at this hop, but never these: dropping Content-Length or
#: Host while the body is still framed by it would let the next hop read the body as a request.
_NEVER_CONNECTION_OPTIONS = frozenset({b"", b"content-length", b"host"})

_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"


class FramingError(Exception):
    """A head whose framing is ambiguous or invalid: forwarding it could smuggle a message."""


class HeadInfo:
    """What a proxy needs to know about a message head, found in one pass."""

    __slots__ = (
        "chunked",
        "connection_tokens",
        "content_length",
        "forwarded_for",
        "has_forwarded_host",
        "has_forwarded_proto",
        "host",
        "upgrade",
    )

    def __init__(self) -> None:
        self.content_length: bytes | None = None
        self.chunked = False
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.host: bytes | None = None
        self.upgrade: bytes | None = None
        self.forwarded_for: list[bytes] | None = None
        self.has_forwarded_proto = False
        self.has_forwarded_host = False


def inspect_head(headers: Headers, *, request: bool) -> HeadInfo:
    """Classify a head that llhttp accepted, and refuse what llhttp lets through but a proxy must
    not forward: several Host fields, Content-Length beside Transfer-Encoding, a request coding
    that does not end in chunked, a Content-Length that is not plain digits."""
    info = HeadInfo()
    transfer_encoding: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            if info.content_length is not None and info.content_length != value:
                raise FramingError("several differing Content-Length fields")
            if not value.isdigit():
                raise FramingError("Content-Length is not a number")
            info.content_length = value
        elif lower == b"transfer-encoding":
            transfer_encoding = (
                value if transfer_encoding is None else transfer_encoding + b"," + value
            )
        elif lower == b"connection":
            tokens = frozenset(token.strip().lower() for token in value.split(b","))
            info.connection_tokens |= tokens - _NEVER_CONNECTION_OPTIONS
        elif lower == b"host":
            if info.host is not None:
                raise FramingError("several Host fields")
            info.host = value
        elif lower == b"upgrade":
            info.upgrade = value
        elif lower == _XFF:
            info.forwarded_for = (
                [value] if info.forwarded_for is None else [*info.forwarded_for, value]
            )
        elif lower == _XFP:
            info.has_forwarded_proto = True
        elif lower == _XFH:
            info.has_forwarded_host = True
    if transfer_encoding is not None:
        if info.content_length is not None:
            raise FramingError("both Content-Length and Transfer-Encoding")
        info.chunked = transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        if request and not info.chunked:
            raise FramingError("Transfer-Encoding does not end in chunked")
    return info


def end_to_end(headers: Headers, info: HeadInfo, drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers without the hop-by-hop ones, those named in Connection, and ``drop``."""
    tokens = info.connection_tokens
    if tokens:
        return [
            (name, value)
            for name, value in headers
            if (lower := name.lower()) not in HOP_BY_HOP
            and lower not in tokens
            and lower not in drop
        ]
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in HOP_BY_HOP and lower not in drop
    ]


def serialize_head(start_line: bytes, headers: Headers) -> bytes:
    parts = [start_line]
    for name, value in headers:
        parts.append(name + b": " + value)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s" % (status, reason)


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def plain_response(status: int, message: str, *, close: bool) -> bytes:
    """A complete short text response that drainproxy itself writes (400, 502, 504...)."""
    body = (message + "\n").encode()
    headers: Headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return serialize_head(status_line(status, reason_phrase(status)), headers) + body


def chunk_size_line(size: int) -> bytes:
    """The line before a chunk of ``size`` bytes, for writing a chunk without copying it."""
    return b"%x\r\n" % size


LAST_CHUNK = b"0\r\n\r\n"
