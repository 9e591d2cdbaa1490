"""HTTP/1.1 message heads as a proxy needs them: framing checks, hop-by-hop filtering and
serialisation (RFC 9110, RFC 9112). Works on ``(name, value)`` byte pairs as llhttp delivers them,
so header order and duplicates survive untouched."""

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
#: Connection tokens that need no second look at the fields: the hop-by-hop ones are dropped
#: anyway, and "close" is the option itself (RFC 9110 reserves "Close" as a field name).
_NO_EXTRA_DROP = HOP_BY_HOP | {b"close"}

# The fields a proxy must look at; every other field is forwarded as it came.
CONTENT_LENGTH = 1
TRANSFER_ENCODING = 2
CONNECTION = 3
HOST = 4
UPGRADE = 5
FORWARDED_FOR = 6
FORWARDED_PROTO = 7
FORWARDED_HOST = 8
OTHER_HOP_BY_HOP = 9
KEEP_ALIVE = 10

_KIND_BY_LOWER_NAME = {
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"host": HOST,
    b"upgrade": UPGRADE,
    b"x-forwarded-for": FORWARDED_FOR,
    b"x-forwarded-proto": FORWARDED_PROTO,
    b"x-forwarded-host": FORWARDED_HOST,
    b"keep-alive": KEEP_ALIVE,
    b"proxy-connection": OTHER_HOP_BY_HOP,
    b"te": OTHER_HOP_BY_HOP,
    b"trailer": OTHER_HOP_BY_HOP,
}
#: Common end-to-end names as long as one of those (kind 0): no ``lower()`` needed to pass them.
_COMMON_SAME_LENGTH_NAMES = (
    b"Date", b"ETag", b"From", b"Link", b"Vary", b"Expires", b"Referer", b"Warning",
    b"Set-Cookie", b"User-Agent", b"Accept-Charset", b"Accept-Encoding", b"Accept-Language",
    b"X-Frame-Options", b"Content-Encoding", b"Content-Language", b"Content-Location",
    b"WWW-Authenticate", b"If-Modified-Since",
)  # fmt: skip
#: Usual spellings, so the common case needs no ``lower()``.
_FIELD_KINDS = {
    **_KIND_BY_LOWER_NAME,
    **{name.title(): kind for name, kind in _KIND_BY_LOWER_NAME.items()},
    b"TE": OTHER_HOP_BY_HOP,
    b"X-Forwarded-For": FORWARDED_FOR,
    b"X-Forwarded-Proto": FORWARDED_PROTO,
    b"X-Forwarded-Host": FORWARDED_HOST,
    **dict.fromkeys(_COMMON_SAME_LENGTH_NAMES, 0),
}
#: Connection values seen on nearly every message, parsed once.
_COMMON_CONNECTION_TOKENS = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}
#: A name of another length cannot be one of those fields: most skip the dictionary altogether.
_KIND_NAME_LENGTHS = frozenset(len(name) for name in _KIND_BY_LOWER_NAME)

_FIELD_SEPARATOR = b": "
CRLF = b"\r\n"


class FramingError(Exception):
    """A head whose framing is ambiguous or invalid: forwarding it could smuggle a message."""


class HeadInfo:
    """What a proxy needs to know about a message head, found in one pass. The defaults are
    class attributes, so a head sets only the few fields it has (one per message: cheap)."""

    content_length: bytes | None = None
    chunked = False
    connection_tokens: frozenset[bytes] = frozenset()
    host: bytes | None = None
    upgrade: bytes | None = None
    forwarded_for: list[bytes] | None = None
    has_forwarded_proto = False
    has_forwarded_host = False
    #: The Keep-Alive field's value (hop-by-hop, not forwarded); see ``keep_alive_timeout``.
    keep_alive: bytes | None = None


def forward_head(
    out: list[bytes], headers: Headers, *, request: bool, drop: frozenset[int] = frozenset()
) -> HeadInfo:
    """Classify a head that llhttp accepted and append its end-to-end fields to ``out`` as
    ``name``, ``": "``, ``value``, CRLF pieces (for one ``b"".join``), all in one pass.

    Left out: the hop-by-hop fields, those named in Connection, and the X-Forwarded fields whose
    kind (FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST) is in ``drop``. Refused with
    FramingError, as llhttp lets them through but a proxy must not forward them: several Host
    fields, Content-Length beside Transfer-Encoding, a request coding that does not end in
    chunked, a Content-Length that is not plain digits."""
    info = HeadInfo()
    start = len(out)
    transfer_encoding: bytes | None = None
    for name, value in headers:
        kind = 0
        if len(name) in _KIND_NAME_LENGTHS:
            kind = _FIELD_KINDS.get(name, -1)
            if kind < 0:
                kind = _KIND_BY_LOWER_NAME.get(name.lower(), 0)
        if not kind:
            out += (name, _FIELD_SEPARATOR, value, CRLF)
        elif kind == CONTENT_LENGTH:
            if info.content_length is not None and info.content_length != value:
                raise FramingError("several differing Content-Length fields")
            if not value.isdigit():
                raise FramingError("Content-Length is not a number")
            info.content_length = value
            out += (name, _FIELD_SEPARATOR, value, CRLF)
        elif kind == TRANSFER_ENCODING:
            transfer_encoding = (
                value if transfer_encoding is None else transfer_encoding + b"," + value
            )
        elif kind == CONNECTION:
            tokens = _COMMON_CONNECTION_TOKENS.get(value)
            if tokens is None:
                tokens = frozenset(token.strip().lower() for token in value.split(b","))
                tokens -= _NEVER_CONNECTION_OPTIONS
            info.connection_tokens |= tokens
        elif kind == HOST:
            if info.host is not None:
                raise FramingError("several Host fields")
            info.host = value
            out += (name, _FIELD_SEPARATOR, value, CRLF)
        elif kind == UPGRADE:
            info.upgrade = value
        elif kind == OTHER_HOP_BY_HOP:
            pass
        elif kind == KEEP_ALIVE:
            info.keep_alive = value
        else:
            if kind == FORWARDED_FOR:
                info.forwarded_for = (
                    [value] if info.forwarded_for is None else [*info.forwarded_for, value]
                )
            elif kind == FORWARDED_PROTO:
                info.has_forwarded_proto = True
            else:
                info.has_forwarded_host = True
            if kind not in drop:
                out += (name, _FIELD_SEPARATOR, value, CRLF)
    if transfer_encoding is not None:
        if info.content_length is not None:
            raise FramingError("both Content-Length and Transfer-Encoding")
        info.chunked = transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        if request and not info.chunked:
            raise FramingError("Transfer-Encoding does not end in chunked")
    tokens = info.connection_tokens
    if tokens and not tokens <= _NO_EXTRA_DROP:
        _drop_named_fields(out, start, tokens)
    return info


_keep_alive_timeouts: dict[bytes, float | None] = {}
_KEEP_ALIVE_CACHE_SIZE = 64


def keep_alive_timeout(value: bytes) -> float | None:
    """The ``timeout`` parameter of a Keep-Alive field (``timeout=5, max=100``), in seconds: how
    long the sender keeps an idle connection open (RFC 2068 §19.7.1.1; Node, Apache and others
    announce it on every response, so the few values an app sends are parsed once). None when
    absent or not a number."""
    try:
        return _keep_alive_timeouts[value]
    except KeyError:
        pass
    seconds = _parse_keep_alive_timeout(value)
    if len(_keep_alive_timeouts) < _KEEP_ALIVE_CACHE_SIZE:
        _keep_alive_timeouts[value] = seconds
    return seconds


def _parse_keep_alive_timeout(value: bytes) -> float | None:
    for parameter in value.split(b","):
        name, _, number = parameter.partition(b"=")
        if name.strip().lower() == b"timeout":
            number = number.strip().strip(b'"')
            return float(number) if number.replace(b".", b"", 1).isdigit() else None
    return None


def _drop_named_fields(out: list[bytes], start: int, names: frozenset[bytes]) -> None:
    """Remove from ``out[start:]`` (4 pieces per field) the fields Connection named; rare, so
    it is a second pass rather than a cost on every field."""
    kept: list[bytes] = []
    for index in range(start, len(out), 4):
        if out[index].lower() not in names:
            kept += out[index : index + 4]
    out[start:] = kept


_status_lines: dict[tuple[int, bytes], bytes] = {}
_STATUS_LINE_CACHE_SIZE = 256


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 200 OK`` and its CRLF; the few lines an app uses are built once."""
    key = (status, reason)
    line = _status_lines.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % key
        if len(_status_lines) < _STATUS_LINE_CACHE_SIZE:
            _status_lines[key] = line
    return line


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def plain_response(status: int, message: str, *, close: bool) -> bytes:
    """A complete short text response that drainproxy itself writes (400, 502, 504...)."""
    body = (message + "\n").encode()
    return b"".join(
        (
            status_line(status, reason_phrase(status)),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            CRLF,
            body,
        )
    )


def chunk_size_line(size: int) -> bytes:
    """The line before a chunk of ``size`` bytes, for writing a chunk without copying it."""
    return b"%x\r\n" % size


LAST_CHUNK = b"0\r\n\r\n"
#: Chunked framing that body data pays for (chunk-size lines, extensions, trailer fields, CRLFs):
#: twice the data's size plus this much per piece. What goes beyond adds up against a limit, so
#: a peer cannot make the parser chew without end on bytes that carry no data (Go's net/http
#: uses the same rule).
CHUNK_OVERHEAD_ALLOWANCE = 16

#: A head that spans socket reads is gathered until it may be complete, or this size, before the
#: parser sees it: httptools joins the pieces of a field by concatenation, so a field fed one
#: tiny read at a time costs the square of its size in copying (issue 11).
GATHER_BYTES = 4096


def gather_start(fed: bytes) -> bytearray:
    """The buffer for gathering a head, after a read ``fed`` to the parser ended inside it: it
    starts with the last 2 bytes fed (a shorter read is padded with LF, which can only make
    ``may_end_head`` say yes early, never hold back a complete head)."""
    return bytearray((b"\n\n" + fed[-2:])[-2:])


def gather_more(gathered: bytearray, data: bytes) -> bytes | None:
    """Add a read to a head being gathered (see ``gather_start``): None while the head cannot
    have ended and fewer than ``GATHER_BYTES`` are held, else the bytes to feed now."""
    tail = bytes(gathered[-2:])
    gathered += data
    if len(gathered) < GATHER_BYTES + 2 and not may_end_head(tail, data):
        return None
    return bytes(gathered[2:])


def may_end_head(tail: bytes, data: bytes) -> bool:
    """Whether a head whose bytes so far end with ``tail`` (its last 2 bytes) may end within
    ``data``: an empty line, CRLF or bare LF (llhttp refuses a bare LF, but must see it to)."""
    probe = tail + data
    return b"\n\n" in probe or b"\n\r\n" in probe
