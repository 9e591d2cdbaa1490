"""HTTP/1.1 message heads as a proxy needs them: framing checks, hop-by-hop filtering and
serialisation (RFC 9110, RFC 9112). Works on ``(name, value)`` byte pairs as llhttp delivers them,
so header order and duplicates survive untouched.

The framing decisions are pure functions with no I/O (tested in process, tests/test_http1.py):
what a head becomes when forwarded (``forward_head``), which requests are refused
(``target_authority``, ``check_request_body``) and which responses are invalid
(``status_line``, ``check_interim_head``), and how a response body goes on
(``response_framing``); and, built from those, each head of an exchange whole: the request for
the app (``request_for_app``) and the response for the client (``response_for_client``,
``interim_for_client``; tests/test_http1_exchange.py). The rule behind all of them (issue
11): every byte is read the same way by drainproxy, a strict app and a lenient one, or it is
refused."""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import NamedTuple

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
#: Names that only look like one of those once case, ``_`` and runs of ``-`` are ignored
#: (``Content_Length``, ``X_Forwarded_Proto``): CGI and WSGI map ``_`` to ``-``
#: (``HTTP_CONTENT_LENGTH``), and lenient parsers squeeze separators, so the app would read a
#: field drainproxy never saw. Dropped; in a request, a look-alike of a framing field (or Host)
#: is refused, as the request is built to be read two ways (issue 11).
LOOK_ALIKE = 11
LOOK_ALIKE_FRAMING = 12
_LOOK_ALIKE_KINDS = {name.replace(b"-", b""): kind for name, kind in _KIND_BY_LOWER_NAME.items()}
_FRAMING_KINDS = frozenset({CONTENT_LENGTH, TRANSFER_ENCODING, HOST})

#: Every name seen, with its kind (0: an end-to-end field passed on as it is): one dictionary
#: lookup per field once a name has been seen. Starts with the usual spellings of the fields a
#: proxy must look at; learns at most ``_LEARNED_NAMES`` more (then unseen names pay the
#: classification each time), so a client sending random names cannot grow it.
_USUAL_FIELD_KINDS = {
    **_KIND_BY_LOWER_NAME,
    **{name.title(): kind for name, kind in _KIND_BY_LOWER_NAME.items()},
    b"TE": OTHER_HOP_BY_HOP,
    b"X-Forwarded-For": FORWARDED_FOR,
    b"X-Forwarded-Proto": FORWARDED_PROTO,
    b"X-Forwarded-Host": FORWARDED_HOST,
}
_field_kinds = dict(_USUAL_FIELD_KINDS)
_LEARNED_NAMES = 512
_FIELD_KINDS_LIMIT = len(_USUAL_FIELD_KINDS) + _LEARNED_NAMES


def field_kind(name: bytes) -> int:
    """The kind of a field name not yet in ``_field_kinds`` (0 for an ordinary end-to-end
    field; CONTENT_LENGTH...; LOOK_ALIKE or LOOK_ALIKE_FRAMING), remembered for the next
    message."""
    lower = name.lower()
    kind = _KIND_BY_LOWER_NAME.get(lower, 0)
    # ``0x5F in name`` is a memchr; ``b"_" in name`` would first try the bytes as an int.
    if not kind and (0x5F in name or b"--" in name):
        look_alike = _LOOK_ALIKE_KINDS.get(lower.replace(b"_", b"").replace(b"-", b""))
        if look_alike:
            kind = LOOK_ALIKE_FRAMING if look_alike in _FRAMING_KINDS else LOOK_ALIKE
    if len(_field_kinds) < _FIELD_KINDS_LIMIT:
        _field_kinds[name] = kind
    return kind


#: Connection values seen on nearly every message, parsed once.
_COMMON_CONNECTION_TOKENS = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}

_FIELD_SEPARATOR = b": "
CRLF = b"\r\n"


class FramingError(Exception):
    """A head whose framing is ambiguous or invalid: forwarding it could smuggle a message.
    ``status`` is the answer to a request that has it (a response that has it is a 502)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class HeadInfo:
    """What a proxy needs to know about a message head, found in one pass. The defaults are
    class attributes, so a head sets only the few fields it has (one per message: cheap)."""

    #: Canonical decimal digits (no OWS, no leading zeros).
    content_length: bytes | None = None
    #: Transfer-Encoding ends in chunked.
    chunked = False
    #: The transfer codings other than a final chunked, as ``b"gzip"`` or ``b"chunked, gzip"``:
    #: the label the body keeps when it is re-framed (None: no other coding).
    transfer_codings: bytes | None = None
    connection_tokens: frozenset[bytes] = frozenset()
    host: bytes | None = None
    #: The request had no Host field; ``host`` was made from an absolute-form target.
    host_from_target = False
    #: The Upgrade fields' values as one list (hop-by-hop: drainproxy writes its own).
    upgrade: bytes | None = None
    forwarded_for: list[bytes] | None = None
    has_forwarded_proto = False
    has_forwarded_host = False
    #: The Keep-Alive fields' values as one list (hop-by-hop, not forwarded); see
    #: ``keep_alive_timeout``.
    keep_alive: bytes | None = None


_OWS = b" \t"

#: RFC 9112 §3.2 / RFC 3986 §3.2.2: ``uri-host [ ":" port ]``.
_HOST = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^#]*)")
_valid_hosts: set[bytes] = set()
_VALID_HOST_CACHE_SIZE = 256


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a valid Host field value, ``uri-host [ ":" port ]`` (RFC 9112
    §3.2, RFC 3986 §3.2.2): no userinfo, path, list, whitespace or non-ASCII byte. The few
    hosts a proxy sees are checked once."""
    if value in _valid_hosts:
        return True
    if _HOST.fullmatch(value) is None:
        return False
    if len(_valid_hosts) < _VALID_HOST_CACHE_SIZE:
        _valid_hosts.add(value)
    return True


def target_authority(target: bytes) -> bytes | None:
    """The authority of an absolute-form request target (``http://host:port/path``), which
    replaces the Host field (RFC 9112 §3.2.2: a proxy regenerates Host from the target); None
    for the origin and asterisk forms. FramingError for a scheme other than http(s), userinfo
    (RFC 9110 §4.2.4: treat as an error), or an empty or invalid authority."""
    if target[:1] == b"/" or target == b"*":
        return None
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise FramingError("request target is not in origin or absolute form")
    scheme, authority = match.group(1).lower(), match.group(2)
    if scheme not in (b"http", b"https"):
        raise FramingError("absolute-form target with a scheme other than http or https")
    if b"@" in authority:
        raise FramingError("userinfo in the request target")
    if not authority or not valid_host(authority):
        raise FramingError("invalid authority in the request target")
    return authority


def _transfer_codings(value: bytes) -> tuple[bool, bytes | None]:
    """``(ends in chunked, the codings but a final chunked)`` of a Transfer-Encoding value;
    FramingError when chunked is applied more than once (RFC 9112 §6.1) or nothing is named."""
    codings = [coding for coding in (c.strip(_OWS).lower() for c in value.split(b",")) if coding]
    if not codings:
        raise FramingError("empty Transfer-Encoding")
    if codings.count(b"chunked") > 1:
        raise FramingError("chunked applied more than once")
    chunked = codings[-1] == b"chunked"
    if chunked:
        codings.pop()
    return chunked, b", ".join(codings) if codings else None


def forward_head(
    out: list[bytes],
    headers: Headers,
    *,
    request: bool,
    drop: frozenset[int] = frozenset(),
    authority: bytes | None = None,
) -> HeadInfo:
    """Classify a head that llhttp accepted and append its end-to-end fields to ``out`` as
    ``name``, ``": "``, ``value``, CRLF pieces (for one ``b"".join``), all in one pass.

    Left out: the hop-by-hop fields, those named in Connection, the X-Forwarded fields whose
    kind (FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST) is in ``drop``, and names
    that only look like a field a proxy must look at (``X_Forwarded_For``, ``Transfer---
    Encoding``: an app behind CGI or WSGI reads them as that field). Content-Length goes out
    once, in canonical decimal. With ``authority`` (from an absolute-form target), Host is
    that, whatever the request said (RFC 9112 §3.2.2).

    Refused with FramingError, as llhttp lets them through but a proxy must not forward them:
    several Host fields or an invalid one (RFC 9112 §3.2), Content-Length beside
    Transfer-Encoding, a request coding other than chunked (501), chunked applied twice,
    a Content-Length that is not digits (OWS aside, RFC 9110 §5.5), and in a request a name
    that looks like Content-Length, Transfer-Encoding or Host."""
    info = HeadInfo()
    start = len(out)
    transfer_encoding: bytes | None = None
    for name, value in headers:
        kind = _field_kinds.get(name)
        if kind is None:
            kind = field_kind(name)
        if not kind:
            out += (name, _FIELD_SEPARATOR, value, CRLF)
        elif kind == CONTENT_LENGTH:
            if not value.isdigit():
                value = value.strip(_OWS)
                if not value.isdigit():
                    raise FramingError("Content-Length is not a number")
            if value[0] == 0x30 and len(value) > 1:
                value = b"%d" % int(value)  # 010 is ten, not the eight a C parser reads
            if info.content_length is not None:
                if info.content_length != value:
                    raise FramingError("several differing Content-Length fields")
                continue
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
            if request and value not in _valid_hosts and not valid_host(value):
                value = value.strip(_OWS)
                if not valid_host(value):
                    raise FramingError("invalid Host")
            if authority is not None:
                value = authority
            info.host = value
            out += (name, _FIELD_SEPARATOR, value, CRLF)
        elif kind == UPGRADE:
            # Several fields are one list (RFC 9110 §5.3): every protocol offered, in order.
            info.upgrade = value if info.upgrade is None else info.upgrade + b", " + value
        elif kind == OTHER_HOP_BY_HOP:
            pass
        elif kind == KEEP_ALIVE:
            # Several fields are one list (RFC 9110 §5.3): ``timeout`` may be in any of them.
            info.keep_alive = value if info.keep_alive is None else info.keep_alive + b", " + value
        elif kind >= LOOK_ALIKE:
            if request and kind == LOOK_ALIKE_FRAMING:
                raise FramingError(
                    f"field name {name.decode('latin-1')!r} looks like a framing field"
                )
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
        if transfer_encoding == b"chunked":
            info.chunked = True
        else:
            info.chunked, info.transfer_codings = _transfer_codings(transfer_encoding)
        if request:
            if not info.chunked:
                raise FramingError("Transfer-Encoding does not end in chunked")
            if info.transfer_codings is not None:
                # RFC 9112 §6.1 (SHOULD 501), as nginx and Apache do: many apps cannot decode
                # a coding below chunked, and would read the coded body as plain.
                raise FramingError("transfer codings other than chunked are not supported", 501)
    if authority is not None and info.host is None:
        info.host = authority
        info.host_from_target = True
        out += (b"Host", _FIELD_SEPARATOR, authority, CRLF)
    tokens = info.connection_tokens
    if tokens and not tokens <= _NO_EXTRA_DROP:
        drop_fields(out, start, tokens)
    return info


def has_body(info: HeadInfo) -> bool:
    """Whether a request head announces a body (a chunked one, or a length above 0)."""
    return info.chunked or (info.content_length is not None and info.content_length != b"0")


def check_request_body(
    method: bytes, info: HeadInfo, *, upgrade: bool, get_head_body: bool
) -> None:
    """FramingError for a request body that the next hop may not read as one:
    - with an Upgrade the app may switch protocols at the end of the head, and llhttp does: the
      body would be neither forwarded as a body nor safely tunnelled (issue 11);
    - on GET and HEAD, unless ``get_head_body``: an app that ignores such a body reads it as
      the next request (RFC 9110 §9.3.1: it "might lead some implementations to reject the
      request and close the connection because of its potential as a request smuggling
      attack")."""
    if not has_body(info):
        return
    if upgrade:
        raise FramingError("an Upgrade request with a body")
    if not get_head_body and (method == b"GET" or method == b"HEAD"):
        raise FramingError(f"a {method.decode()} request with a body (limits.get_head_body)")


#: How drainproxy writes a response body to the client: none, as it comes, or chunked.
FRAME_NONE, FRAME_RAW, FRAME_CHUNKED = 0, 1, 2
_TRANSFER_ENCODING_CHUNKED = b"Transfer-Encoding: chunked\r\n"


class ResponseFraming(NamedTuple):
    """How a response body goes from the app to the client."""

    #: FRAME_NONE, FRAME_RAW or FRAME_CHUNKED.
    frame: int
    #: The Transfer-Encoding line for the client's head, with its CRLF (b"": none).
    transfer_encoding: bytes
    #: The app ends the body by closing (no length, last coding not chunked: RFC 9112 §6.3).
    until_app_close: bool
    #: The client's body ends at drainproxy's close: the connection closes after it, and a
    #: response cut short must end with a reset, never a FIN (issue 11).
    until_client_close: bool


_NO_BODY = ResponseFraming(FRAME_NONE, b"", False, False)
_BY_LENGTH = ResponseFraming(FRAME_RAW, b"", False, False)
_RECHUNKED = ResponseFraming(FRAME_CHUNKED, _TRANSFER_ENCODING_CHUNKED, False, False)
_CHUNKED_FROM_CLOSE = ResponseFraming(FRAME_CHUNKED, _TRANSFER_ENCODING_CHUNKED, True, False)
_HTTP10_FROM_CHUNKED = ResponseFraming(FRAME_RAW, b"", False, True)
_HTTP10_FROM_CLOSE = ResponseFraming(FRAME_RAW, b"", True, True)


def response_framing(info: HeadInfo, bodyless: bool, client_http10: bool) -> ResponseFraming:
    """How to pass on the body of a response whose head is ``info``: ``bodyless`` for a HEAD
    request's response, 204 and 304; ``client_http10`` when the client spoke HTTP/1.0.

    A Content-Length body goes as it comes; otherwise an HTTP/1.1 client gets it chunked and an
    HTTP/1.0 client until the close. A transfer coding other than chunked stays labelled, as
    the body is re-framed, never decoded: ``gzip, chunked`` is re-chunked as ``gzip, chunked``;
    a list that does not end in chunked ends at the close both ways, named as it came (chunked
    may not be applied twice). FramingError for a coding an HTTP/1.0 client cannot be told of
    (RFC 9112 §6.1: no Transfer-Encoding to HTTP/1.0)."""
    if bodyless:
        return _NO_BODY
    if info.content_length is not None:
        return _BY_LENGTH
    codings = info.transfer_codings
    if client_http10:
        if codings is not None:
            raise FramingError("a transfer coding an HTTP/1.0 client cannot be sent")
        return _HTTP10_FROM_CHUNKED if info.chunked else _HTTP10_FROM_CLOSE
    if codings is None:
        return _RECHUNKED if info.chunked else _CHUNKED_FROM_CLOSE
    if info.chunked:
        line = b"Transfer-Encoding: " + codings + b", chunked\r\n"
        return ResponseFraming(FRAME_CHUNKED, line, False, False)
    return ResponseFraming(FRAME_RAW, b"Transfer-Encoding: " + codings + CRLF, True, True)


def check_interim_head(info: HeadInfo) -> None:
    """FramingError for a 1xx response with framing fields (RFC 9110 §8.6, RFC 9112 §6.1: a
    1xx never has content, so a field that says otherwise is a broken or hostile app)."""
    if info.content_length is not None or info.chunked or info.transfer_codings is not None:
        raise FramingError("Content-Length or Transfer-Encoding on a 1xx response")


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


def drop_fields(out: list[bytes], start: int, names: frozenset[bytes]) -> None:
    """Remove from ``out[start:]`` (4 pieces per field) the fields with these lower-case names
    (those Connection named; Content-Length on a 204); rare, so it is a second pass rather
    than a cost on every field."""
    kept: list[bytes] = []
    for index in range(start, len(out), 4):
        if out[index].lower() not in names:
            kept += out[index : index + 4]
    out[start:] = kept


_status_lines: dict[tuple[int, bytes], bytes] = {}
_STATUS_LINE_CACHE_SIZE = 256


#: RFC 9112 §4: ``reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )``.
_REASON_PHRASE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 200 OK`` and its CRLF; the few lines an app uses are built (and checked)
    once. FramingError for a status outside 100-599 (RFC 9110 §15: invalid; llhttp reads
    ``099`` as 99 and accepts up to 999) or a control character in the reason phrase."""
    key = (status, reason)
    line = _status_lines.get(key)
    if line is None:
        if not 100 <= status <= 599:
            raise FramingError(f"status {status} outside 100-599")
        if _REASON_PHRASE.fullmatch(reason) is None:
            raise FramingError("control character in the reason phrase")
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
    return bytearray(fed[-2:].rjust(2, b"\n"))


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


# --- the two heads of an exchange, decided whole (issue 13) ---------------------------------

#: How a request body goes on to the app: none, as it came (Content-Length), or chunked.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED = 0, 1, 2

_CONNECTION_UPGRADE = b"Connection: upgrade\r\n"
_CONNECTION_CLOSE = b"Connection: close\r\n"
_CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CONTENT_LENGTH_NAME = frozenset({b"content-length"})


@dataclass(frozen=True, slots=True)
class ForwardingPolicy:
    """What this hop adds to a request for the app and what it refuses, decided once from the
    config's ``forwarded:``, ``limits:`` and ``upstream:`` (``context.ProxyContext``)."""

    #: The kinds of X-Forwarded fields (FORWARDED_*) this hop replaces rather than passes on.
    drop: frozenset[int]
    #: ``Host: <upstream.host>:<upstream.port>`` and its CRLF, for a request without Host.
    default_host_line: bytes
    #: ``X-Forwarded-Proto: <scheme of the listener>`` and its CRLF.
    forwarded_proto_line: bytes
    #: ``forwarded.x_forwarded_for`` is ``append`` (else ``off``).
    xff_append: bool = True
    #: ``forwarded.x_forwarded_proto`` and ``x_forwarded_host``: ``preserve`` adds the field if
    #: the request has none, ``overwrite`` replaces it, ``off`` passes on what came.
    set_xfp: bool = True
    overwrite_xfp: bool = False
    set_xfh: bool = True
    overwrite_xfh: bool = False
    #: ``limits.get_head_body`` is ``forward``.
    get_head_body: bool = False
    #: ``limits.max_body_bytes`` (None: no limit).
    max_body_bytes: int | None = None


def add_forwarded_fields(
    head: list[bytes], info: HeadInfo, policy: ForwardingPolicy, peer: bytes
) -> None:
    """Append to ``head`` the X-Forwarded-* fields this hop adds for a client at address
    ``peer``, as ``policy`` says (HTTP/1.1 and HTTP/2 clients alike): X-Forwarded-For gets the
    peer appended to the request's own values, joined in one field; X-Forwarded-Proto and
    X-Forwarded-Host are added when the request has none (``preserve``) or always (``overwrite``:
    the request's own were dropped by ``forward_head``)."""
    if policy.xff_append:
        prior = info.forwarded_for
        if prior is None:
            head += (b"X-Forwarded-For: ", peer, CRLF)
        else:
            head += (b"X-Forwarded-For: ", b", ".join([*prior, peer]), CRLF)
    if policy.set_xfp and (policy.overwrite_xfp or not info.has_forwarded_proto):
        head.append(policy.forwarded_proto_line)
    if (
        policy.set_xfh
        and info.host is not None
        and (policy.overwrite_xfh or not info.has_forwarded_host)
    ):
        head += (b"X-Forwarded-Host: ", info.host, CRLF)


def request_for_app(
    method: bytes,
    target: bytes,
    version: str,
    headers: Headers,
    upgrade: bool,
    policy: ForwardingPolicy,
    peer: bytes,
) -> tuple[bytes, int]:
    """The head of an HTTP/1.x request as drainproxy sends it to the app, and how its body
    follows: ``(head, BODY_NONE | BODY_LENGTH | BODY_CHUNKED)``. ``method``, ``target`` (not
    empty), ``version`` (``"1.1"``) and ``headers`` as llhttp read them; ``upgrade``: llhttp
    will stop at the end of this head for an Upgrade; ``peer``: the client's address.

    The request line goes out as HTTP/1.1 and the end-to-end fields as ``forward_head`` passes
    them; Host is regenerated from an absolute-form target (RFC 9112 §3.2.2), or is the app's
    own for an HTTP/1.0 request without one; a chunked body stays chunked (llhttp has checked
    its framing); an Upgrade is passed on, but for ``h2c`` (RFC 9113 §3.1 deprecates it: the
    request is answered as HTTP/1.1); then X-Forwarded-* (``add_forwarded_fields``).

    Raises FramingError whose ``status`` answers the request and whose text is the whole
    reason: 505 for a version other than 1.0 and 1.1; 400 for HTTP/1.1 without Host (RFC 9112
    §3.2), the asterisk-form but for OPTIONS (§3.2.4), Transfer-Encoding in HTTP/1.0 (§6.1),
    and the heads ``target_authority``, ``forward_head`` and ``check_request_body`` refuse
    (501 for a coding other than chunked); 413 for a Content-Length over ``max_body_bytes``."""
    if version != "1.1" and version != "1.0":
        raise FramingError(f"HTTP/{version} is not supported", 505)
    head = [method, b" ", target, b" HTTP/1.1\r\n"]
    try:
        # Not origin-form (``/...``): absolute-form, or CONNECT's authority-form (answered 405
        # by the proxy), or asterisk-form.
        authority = None
        if target[0] != 0x2F and method != b"CONNECT":
            authority = target_authority(target)
        info = forward_head(head, headers, request=True, drop=policy.drop, authority=authority)
        if info.content_length is not None or info.chunked:
            check_request_body(method, info, upgrade=upgrade, get_head_body=policy.get_head_body)
    except FramingError as exc:
        raise FramingError(f"malformed request: {exc}", exc.status) from None
    if version == "1.1" and (info.host is None or info.host_from_target):
        # RFC 9112 §3.2: 400 for any HTTP/1.1 request without Host, absolute-form included.
        raise FramingError("malformed request: HTTP/1.1 without Host")
    if target == b"*" and method != b"OPTIONS":
        raise FramingError("malformed request: asterisk-form target without OPTIONS")
    body = BODY_NONE
    if info.chunked:
        if version == "1.0":
            raise FramingError("malformed request: Transfer-Encoding in HTTP/1.0")
        body = BODY_CHUNKED
    elif info.content_length is not None:
        length = int(info.content_length)
        max_body = policy.max_body_bytes
        if max_body is not None and length > max_body:
            raise FramingError("request body larger than limits.max_body_bytes", 413)
        if length:
            body = BODY_LENGTH
    if info.host is None:
        head.append(policy.default_host_line)
    if body == BODY_CHUNKED:
        head.append(_TRANSFER_ENCODING_CHUNKED)
    if upgrade and info.upgrade is not None:
        offered = offered_upgrades(info.upgrade)
        if offered:
            head += (_CONNECTION_UPGRADE, b"Upgrade: ", offered, CRLF)
    add_forwarded_fields(head, info, policy, peer)
    head.append(CRLF)
    return b"".join(head), body


def offered_upgrades(protocols: bytes) -> bytes:
    """The protocols of a request's Upgrade list (``h2c, websocket``) that are offered to the
    app: all but ``h2c``, whatever its case and spacing, which is answered as HTTP/1.1 here
    (RFC 9113 §3.1 deprecates it; prior-knowledge HTTP/2 is served on this port instead).
    Empty when nothing is left."""
    return b", ".join(
        token
        for item in protocols.split(b",")
        if (token := item.strip(_OWS)) and token.lower() != b"h2c"
    )


def upgrade_offered(headers: Headers) -> bytes:
    """What ``request_for_app`` offered the app in Upgrade, from the request's fields as llhttp
    read them (several fields are one list, RFC 9110 §5.3); empty when nothing was offered."""
    values = [value for name, value in headers if name.lower() == b"upgrade"]
    return offered_upgrades(b", ".join(values))


def switch_offered(offered: bytes, chosen: bytes | None) -> bool:
    """Whether a 101 whose Upgrade list is ``chosen`` switches only to protocols the app was
    ``offered`` (RFC 9110 §7.8: a server MUST NOT switch to a protocol the client did not
    indicate; §15.2.2: a 101 names the protocols switched to). Protocols compare without
    regard to case (``WebSocket`` is ``websocket``, RFC 6455 §4.2.1)."""
    if not offered or chosen is None:
        return False
    allowed = {item.strip(_OWS).lower() for item in offered.split(b",")}
    switched = [item.strip(_OWS).lower() for item in chosen.split(b",")]
    return all(protocol and protocol in allowed for protocol in switched)


def response_for_client(
    status: int,
    reason: bytes,
    headers: Headers,
    head_request: bool,
    client_http10: bool,
    close: bool,
) -> tuple[list[bytes], HeadInfo, ResponseFraming | None, bool]:
    """The head of the app's final response as drainproxy sends it to the client, and how the
    body follows: ``(pieces, info, framing, close)``. ``pieces`` join into the head, the blank
    line included; ``info`` is the app's head (its Content-Length and Keep-Alive); ``close``
    (in: the connection closes after this response anyway) is True when it does, and the head
    then says ``Connection: close``; an HTTP/1.0 client kept alive is told ``keep-alive``.

    The body goes as ``response_framing`` says, with nothing for a HEAD request's response, 204
    and 304 (RFC 9110 §6.4.1), whose Content-Length on a 204 is dropped (§8.6: it can only
    mislead). A body the client can delimit only by the close closes the connection.

    A 101 (Switching Protocols) gets ``framing`` None and no blank line: whether it switches
    is the caller's (``Connection: upgrade`` and the Upgrade field complete the head).

    Raises FramingError for what ``status_line``, ``forward_head`` and ``response_framing``
    refuse (the answer to the client is then 502)."""
    out = [status_line(status, reason or reason_phrase(status))]
    info = forward_head(out, headers, request=False)
    if status == 204 and info.content_length is not None:
        drop_fields(out, 1, _CONTENT_LENGTH_NAME)
    if status == 101:
        return out, info, None, True
    if head_request or status in BODYLESS_STATUSES:
        framing = _NO_BODY
    elif info.content_length is not None:
        framing = _BY_LENGTH
    else:
        framing = response_framing(info, False, client_http10)
        out.append(framing.transfer_encoding)
        close = close or framing.until_client_close
    if close:
        out.append(_CONNECTION_CLOSE)
    elif client_http10:
        out.append(_CONNECTION_KEEP_ALIVE)
    out.append(CRLF)
    return out, info, framing, close


def interim_for_client(
    status: int, reason: bytes, headers: Headers, client_http10: bool
) -> list[bytes] | None:
    """The head of a 1xx response (but 101) as drainproxy passes it on, as pieces that join
    into it; None for an HTTP/1.0 client, which must not be sent one (RFC 9110 §15.2).
    Raises FramingError as ``status_line`` and ``forward_head`` do, and for framing fields on
    it (``check_interim_head``), for an HTTP/1.0 client too: the app's response is broken."""
    out = [status_line(status, reason)]
    check_interim_head(forward_head(out, headers, request=False))
    if client_http10:
        return None
    out.append(CRLF)
    return out
