"""Issue 17: how ``http1`` classifies header fields, in process. Field names are
case-insensitive (RFC 9110 §5.1): every spelling of a framing, hop-by-hop or forwarding field is
that field, or a client could smuggle a framing field past the checks or spoof X-Forwarded-*
in overwrite mode. The checks llhttp happens to make first (Content-Length beside
Transfer-Encoding, differing Content-Lengths) are drainproxy's own too."""

from __future__ import annotations

import pytest

from drainproxy.dataplane import http1
from drainproxy.dataplane.http1 import (
    FORWARDED_FOR,
    FORWARDED_HOST,
    FORWARDED_PROTO,
    IDEMPOTENT_METHODS,
    FramingError,
    Headers,
    HeadInfo,
    forward_head,
    plain_response,
    reason_phrase,
    status_line,
)

pytestmark = pytest.mark.usefixtures("fresh_http1_caches")

ALL_FORWARDED = frozenset({FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST})


def forward(
    headers: Headers, *, request: bool = True, drop: frozenset[int] = frozenset()
) -> tuple[Headers, HeadInfo]:
    out: list[bytes] = []
    info = forward_head(out, headers, request=request, drop=drop)
    fields = [(out[index], out[index + 2]) for index in range(0, len(out), 4)]
    return fields, info


def spellings(name: bytes) -> list[bytes]:
    """Lower, upper, title and an odd mix: ``x-FoRwArDeD-...``."""
    mixed = bytes(c ^ 0x20 if i % 2 and 0x61 <= c <= 0x7A else c for i, c in enumerate(name))
    return [name, name.upper(), name.title(), mixed]


@pytest.mark.parametrize("name", spellings(b"content-length"))
def test_content_length_in_any_case_frames_the_body(name: bytes) -> None:
    fields, info = forward([(name, b"5")])
    assert info.content_length == b"5"
    assert fields == [(name, b"5")]
    with pytest.raises(FramingError, match="differing Content-Length"):
        forward([(b"Content-Length", b"5"), (name, b"6")])
    with pytest.raises(FramingError, match="both Content-Length and Transfer-Encoding"):
        forward([(name, b"5"), (b"Transfer-Encoding", b"chunked")])


@pytest.mark.parametrize("name", spellings(b"transfer-encoding"))
def test_transfer_encoding_in_any_case_frames_and_is_not_forwarded(name: bytes) -> None:
    fields, info = forward([(name, b"chunked")])
    assert info.chunked and fields == []
    with pytest.raises(FramingError, match="both Content-Length and Transfer-Encoding"):
        forward([(name, b"chunked"), (b"content-length", b"5")])


@pytest.mark.parametrize("name", spellings(b"host"))
def test_host_in_any_case_is_the_host(name: bytes) -> None:
    fields, info = forward([(name, b"a.example")])
    assert info.host == b"a.example" and fields == [(name, b"a.example")]
    with pytest.raises(FramingError, match="several Host"):
        forward([(b"Host", b"a.example"), (name, b"b.example")])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        *((name, FORWARDED_FOR) for name in spellings(b"x-forwarded-for")),
        *((name, FORWARDED_PROTO) for name in spellings(b"x-forwarded-proto")),
        *((name, FORWARDED_HOST) for name in spellings(b"x-forwarded-host")),
    ],
)
def test_forwarding_fields_in_any_case_are_recognised(name: bytes, kind: int) -> None:
    """In overwrite mode the kind is dropped: a spelling not recognised would pass a spoofed
    value through beside drainproxy's own."""
    kept, info = forward([(name, b"spoofed")])
    assert kept == [(name, b"spoofed")], "kept when its kind is not dropped"
    assert info.forwarded_for == ([b"spoofed"] if kind == FORWARDED_FOR else None)
    assert info.has_forwarded_proto is (kind == FORWARDED_PROTO)
    assert info.has_forwarded_host is (kind == FORWARDED_HOST)
    dropped, _ = forward([(name, b"spoofed"), (b"Accept", b"*/*")], drop=frozenset({kind}))
    assert dropped == [(b"Accept", b"*/*")]
    others, _ = forward([(name, b"spoofed")], drop=ALL_FORWARDED - {kind})
    assert others == [(name, b"spoofed")], "only the dropped kinds go"


def test_several_x_forwarded_for_fields_are_kept_in_order() -> None:
    _, info = forward([(b"X-Forwarded-For", b"203.0.113.9"), (b"x-forwarded-for", b"10.0.0.1")])
    assert info.forwarded_for == [b"203.0.113.9", b"10.0.0.1"]


@pytest.mark.parametrize(
    "name",
    [
        *spellings(b"keep-alive"),
        *spellings(b"proxy-connection"),
        *spellings(b"te"),
        *spellings(b"trailer"),
        *spellings(b"upgrade"),
        *spellings(b"connection"),
    ],
)
@pytest.mark.parametrize("connection", [None, b"close", b"keep-alive"])
def test_hop_by_hop_fields_never_pass_whatever_connection_names(
    name: bytes, connection: bytes | None
) -> None:
    """Keep-Alive and the others are dropped even when Connection does not name them."""
    headers = [(b"Accept", b"*/*"), (name, b"x"), (b"X-Kept", b"1")]
    if connection is not None:
        headers.insert(0, (b"Connection", connection))
    fields, _ = forward(headers, request=False)
    assert fields == [(b"Accept", b"*/*"), (b"X-Kept", b"1")]


@pytest.mark.parametrize("value", [b"close", b"Close", b"keep-alive", b"Keep-Alive", b"upgrade"])
def test_common_connection_values_are_tokens_in_lower_case(value: bytes) -> None:
    _, info = forward([(b"Connection", value)])
    assert info.connection_tokens == {value.lower()}


def test_connection_options_are_dropped_in_any_case_but_never_the_framing() -> None:
    fields, info = forward(
        [
            (b"Connection", b" X-Private ,close, , Content-Length, HOST"),
            (b"x-private", b"1"),
            (b"X-PRIVATE", b"2"),
            (b"Host", b"a.example"),
            (b"Content-Length", b"0"),
            (b"X-Public", b"3"),
        ]
    )
    assert info.connection_tokens == {b"x-private", b"close"}
    assert fields == [(b"Host", b"a.example"), (b"Content-Length", b"0"), (b"X-Public", b"3")]


@pytest.mark.parametrize(
    ("fields", "chunked"),
    [
        ([(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")], True),
        ([(b"Transfer-Encoding", b"chunked"), (b"transfer-encoding", b"gzip")], False),
        ([(b"TRANSFER-ENCODING", b"gzip, chunked")], True),
        ([(b"Transfer-Encoding", b"gzip, Chunked ")], True),
    ],
)
def test_transfer_encoding_split_over_fields_is_one_list(fields: Headers, chunked: bool) -> None:
    """RFC 9110 §5.3: several fields are one comma-separated list; chunked must be last."""
    _, info = forward(fields, request=False)
    assert info.chunked is chunked


def test_a_request_whose_split_coding_does_not_end_in_chunked_is_refused() -> None:
    with pytest.raises(FramingError, match="does not end in chunked"):
        forward([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip")])


def test_identical_content_lengths_are_one_length() -> None:
    _, info = forward([(b"Content-Length", b"5"), (b"content-length", b"5")])
    assert info.content_length == b"5"


@pytest.mark.parametrize("value", [b"-1", b"0x5", b"5 5", b""])
def test_content_length_must_be_digits(value: bytes) -> None:
    with pytest.raises(FramingError):
        forward([(b"Content-Length", value)])


def test_ordinary_fields_pass_untouched_in_order() -> None:
    headers = [(b"Date", b"d"), (b"X-A", b"1"), (b"accept", b"*/*"), (b"X-A", b"2")]
    fields, info = forward(headers)
    assert fields == headers
    assert info.content_length is None and not info.chunked and info.host is None


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
def test_idempotent_methods_may_be_retried(method: bytes) -> None:
    """RFC 9110 §9.2.2: the methods a retry after a lost connection may repeat."""
    assert method in IDEMPOTENT_METHODS


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT", b"get"])
def test_other_methods_are_never_retried(method: bytes) -> None:
    assert method not in IDEMPOTENT_METHODS


def test_an_unregistered_status_has_an_empty_reason() -> None:
    """RFC 9112 §4: the reason phrase may be empty; the SP before it may not be dropped."""
    assert reason_phrase(599) == b""
    assert status_line(599, b"") == b"HTTP/1.1 599 \r\n"
    assert plain_response(599, "odd", close=False).startswith(b"HTTP/1.1 599 \r\n")
    assert reason_phrase(503) == b"Service Unavailable"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"


def test_status_lines_are_built_once_and_the_cache_is_bounded() -> None:
    first = status_line(200, b"OK")
    assert first == b"HTTP/1.1 200 OK\r\n"
    assert status_line(200, b"OK") is first, "the line an app uses is built once"
    for index in range(300):
        assert status_line(200, b"R%d" % index) == b"HTTP/1.1 200 R%d\r\n" % index
    assert len(http1._status_lines) == 256


def test_plain_response_frames_its_body() -> None:
    assert plain_response(502, "bad gateway", close=True) == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 12\r\nConnection: close\r\n\r\nbad gateway\n"
    )
    assert plain_response(400, "x", close=False) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 2\r\n\r\nx\n"
    )


def test_framing_errors_say_what_is_wrong() -> None:
    cases = [
        ([(b"Content-Length", b"x")], "Content-Length is not a number"),
        (
            [(b"Content-Length", b"1"), (b"Content-Length", b"2")],
            "several differing Content-Length fields",
        ),
        ([(b"Host", b"a"), (b"Host", b"b")], "several Host fields"),
        (
            [(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")],
            "both Content-Length and Transfer-Encoding",
        ),
        ([(b"Transfer-Encoding", b"gzip")], "Transfer-Encoding does not end in chunked"),
    ]
    for headers, message in cases:
        with pytest.raises(FramingError) as raised:
            forward(headers)
        assert str(raised.value) == message


def test_the_last_of_several_codings_decides_chunked() -> None:
    _, info = forward([(b"Transfer-Encoding", b"gzip, deflate, chunked")], request=False)
    assert info.chunked
    _, info = forward([(b"Transfer-Encoding", b"chunked, gzip, deflate")], request=False)
    assert not info.chunked


def test_an_unknown_name_as_long_as_a_watched_one_is_an_ordinary_field() -> None:
    headers = [(b"X-Request-Id-1", b"a"), (b"X-Custom-Header1", b"b"), (b"Accept-Ranges", b"c")]
    fields, info = forward(headers)
    assert fields == headers
    assert info.content_length is None and info.host is None


def test_connection_tokens_of_several_fields_add_up() -> None:
    fields, info = forward(
        [(b"Connection", b"X-A"), (b"Connection", b"close"), (b"X-A", b"1"), (b"Upgrade", b"h2c")]
    )
    assert info.connection_tokens == {b"x-a", b"close"}
    assert info.upgrade == b"h2c"
    assert fields == []


def test_a_connection_naming_only_hop_by_hop_fields_keeps_the_others() -> None:
    every = b"connection, keep-alive, proxy-connection, te, trailer, transfer-encoding, upgrade"
    fields, _ = forward([(b"Connection", every + b", close"), (b"Close", b"1")], request=False)
    assert fields == [(b"Close", b"1")]


def test_chunk_size_lines_are_lower_case_hex() -> None:
    assert http1.chunk_size_line(255) == b"ff\r\n"
    assert http1.chunk_size_line(0) == b"0\r\n"


def test_gathering_starts_from_the_last_two_bytes_fed() -> None:
    assert http1.gather_start(b"GET / HTTP/1.1\r") == bytearray(b"1\r")
    assert http1.gather_start(b"\r") == bytearray(b"\n\r"), "padded with LF"
    assert http1.gather_start(b"abc") == bytearray(b"bc")
