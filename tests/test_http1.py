"""The framing decisions in drainproxy/dataplane/http1.py, in process: what a head becomes when
forwarded, and what is refused (issue 11 items 3-8, with the RFC's expected values)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drainproxy.dataplane import http1
from drainproxy.dataplane.http1 import (
    FORWARDED_FOR,
    FRAME_CHUNKED,
    FRAME_NONE,
    FRAME_RAW,
    FramingError,
    HeadInfo,
    check_interim_head,
    check_request_body,
    drop_fields,
    forward_head,
    response_framing,
    status_line,
    target_authority,
    valid_host,
)

Headers = list[tuple[bytes, bytes]]


def forward(
    headers: Headers, *, request: bool = True, **kwargs: object
) -> tuple[list[tuple[bytes, bytes]], HeadInfo]:
    out: list[bytes] = []
    info = forward_head(out, headers, request=request, **kwargs)  # type: ignore[arg-type]
    assert len(out) % 4 == 0
    return [(out[i], out[i + 2]) for i in range(0, len(out), 4)], info


# --- Content-Length (items 4 and 7) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        (b"5", b"5"),
        (b"0", b"0"),
        (b"010", b"10"),  # ten (RFC 9110 §8.6: decimal), never the eight strtol reads
        (b"00000000000000000005", b"5"),
        (b"000", b"0"),
        (b"5 ", b"5"),  # trailing OWS is not part of the value (RFC 9110 §5.5)
        (b"5\t", b"5"),
        (b" 5", b"5"),
    ],
)
@pytest.mark.parametrize("request_side", [True, False])
def test_content_length_goes_out_canonical(
    value: bytes, canonical: bytes, request_side: bool
) -> None:
    fields, info = forward([(b"Content-Length", value)], request=request_side)
    assert fields == [(b"Content-Length", canonical)]
    assert info.content_length == canonical


@pytest.mark.parametrize("value", [b"-1", b"+5", b"0x5", b"5 5", b"5,5", b"", b" ", b"5a"])
def test_content_length_not_digits_is_refused(value: bytes) -> None:
    with pytest.raises(FramingError):
        forward([(b"Content-Length", value)])


def test_identical_content_lengths_go_out_once_and_differing_are_refused() -> None:
    fields, _ = forward([(b"Content-Length", b"5"), (b"content-length", b"05 ")])
    assert fields == [(b"Content-Length", b"5")]
    with pytest.raises(FramingError):
        forward([(b"Content-Length", b"5"), (b"Content-Length", b"6")])


@given(st.integers(min_value=0, max_value=10**20), st.integers(min_value=0, max_value=20))
def test_any_zero_padded_length_is_its_decimal(length: int, zeros: int) -> None:
    fields, _ = forward([(b"Content-Length", b"0" * zeros + b"%d" % length)])
    assert fields == [(b"Content-Length", b"%d" % length)]


def test_drop_fields_removes_by_lower_case_name() -> None:
    out: list[bytes] = [b"HTTP/1.1 204 No Content\r\n"]
    forward_head(out, [(b"Content-Length", b"2"), (b"ETag", b"x")], request=False)
    drop_fields(out, 1, frozenset({b"content-length"}))
    assert out == [b"HTTP/1.1 204 No Content\r\n", b"ETag", b": ", b"x", b"\r\n"]


# --- look-alike names (item 3) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [b"Content_Length", b"Transfer_Encoding", b"Transfer---Encoding", b"HOST_", b"Ho_st"]
)
def test_request_look_alike_of_a_framing_field_is_refused(name: bytes) -> None:
    with pytest.raises(FramingError, match="looks like"):
        forward([(b"Host", b"h"), (name, b"5")])


@pytest.mark.parametrize(
    "name",
    [
        b"X_Forwarded_For",
        b"X_Forwarded_Proto",
        b"X_Forwarded_Host",
        b"x-forwarded_for",
        b"X--Forwarded--Proto",
        b"Keep_Alive",
        b"Proxy_Connection",
        b"Connection_",
        b"Up_grade",
    ],
)
@pytest.mark.parametrize("request_side", [True, False])
def test_look_alike_of_a_forwarding_or_hop_field_is_dropped(
    name: bytes, request_side: bool
) -> None:
    fields, info = forward([(name, b"v"), (b"X-Other_Name", b"kept")], request=request_side)
    assert fields == [(b"X-Other_Name", b"kept")]
    assert info.forwarded_for is None and not info.has_forwarded_proto


def test_response_look_alike_of_framing_is_dropped_not_refused() -> None:
    fields, _ = forward([(b"Content_Length", b"9"), (b"Content-Length", b"2")], request=False)
    assert fields == [(b"Content-Length", b"2")]


def test_real_forwarding_fields_are_still_classified() -> None:
    fields, info = forward([(b"X-Forwarded-For", b"10.0.0.1")], drop=frozenset({FORWARDED_FOR}))
    assert (fields, info.forwarded_for) == ([], [b"10.0.0.1"])


# --- Host and the target (item 5) -----------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"a, evil.example", b"good@evil.example/x", b"\xffa\xff", b"a b", b"a/b", b"[::1", b"a:b:c"],
)
def test_invalid_host_is_refused(value: bytes) -> None:
    """RFC 9112 §3.2: a Host field with an invalid value gets 400."""
    assert not valid_host(value)
    with pytest.raises(FramingError, match="invalid Host"):
        forward([(b"Host", value)])


@pytest.mark.parametrize(
    "value",
    [b"", b"a", b"good.example:8080", b"127.0.0.1", b"[::1]:80", b"xn--bcher-kva.example", b"a:"],
)
def test_valid_host_is_forwarded(value: bytes) -> None:
    assert valid_host(value)
    fields, info = forward([(b"Host", value)])
    assert (fields, info.host) == ([(b"Host", value)], value)


def test_host_ows_is_not_part_of_it() -> None:
    fields, _ = forward([(b"Host", b"a ")])
    assert fields == [(b"Host", b"a")]


@pytest.mark.parametrize(
    ("target", "authority"),
    [
        (b"/x", None),
        (b"*", None),
        (b"http://evil.example/admin", b"evil.example"),
        (b"HTTPS://Evil.example:8443", b"Evil.example:8443"),
        (b"http://[::1]:80/?q", b"[::1]:80"),
    ],
)
def test_target_authority(target: bytes, authority: bytes | None) -> None:
    assert target_authority(target) == authority


@pytest.mark.parametrize(
    "target",
    [b"http://good.example@evil.example/", b"ftp://a/", b"http:///x", b"http://a b/", b"a:80"],
)
def test_bad_absolute_form_is_refused(target: bytes) -> None:
    with pytest.raises(FramingError):
        target_authority(target)


def test_absolute_form_regenerates_host() -> None:
    """RFC 9112 §3.2.2: the proxy generates Host from the target, not the received Host."""
    fields, info = forward([(b"Host", b"good.example")], authority=b"evil.example")
    assert (fields, info.host) == ([(b"Host", b"evil.example")], b"evil.example")
    fields, info = forward([], authority=b"evil.example")  # HTTP/1.0, no Host
    assert (fields, info.host) == ([(b"Host", b"evil.example")], b"evil.example")


# --- bodies on GET, HEAD and Upgrade (items 1 and 6) ----------------------------------------


def body_info(headers: Headers) -> HeadInfo:
    return forward([(b"Host", b"h"), *headers])[1]


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize(
    "framing", [[(b"Content-Length", b"5")], [(b"Transfer-Encoding", b"chunked")]]
)
def test_get_and_head_bodies_are_refused_unless_allowed(method: bytes, framing: Headers) -> None:
    info = body_info(framing)
    with pytest.raises(FramingError, match="with a body"):
        check_request_body(method, info, upgrade=False, get_head_body=False)
    check_request_body(method, info, upgrade=False, get_head_body=True)
    check_request_body(b"POST", info, upgrade=False, get_head_body=False)


@pytest.mark.parametrize("headers", [[], [(b"Content-Length", b"0")], [(b"Content-Length", b"00")]])
def test_get_without_a_body_passes(headers: Headers) -> None:
    check_request_body(b"GET", body_info(headers), upgrade=False, get_head_body=False)
    check_request_body(b"GET", body_info(headers), upgrade=True, get_head_body=False)


@pytest.mark.parametrize(
    "framing", [[(b"Content-Length", b"130")], [(b"Transfer-Encoding", b"chunked")]]
)
def test_upgrade_with_a_body_is_refused_even_where_bodies_are_allowed(framing: Headers) -> None:
    with pytest.raises(FramingError, match="Upgrade"):
        check_request_body(b"POST", body_info(framing), upgrade=True, get_head_body=True)


# --- transfer codings (item 8, and the request side) ----------------------------------------


@pytest.mark.parametrize(
    ("value", "chunked", "codings"),
    [
        (b"chunked", True, None),
        (b"Chunked", True, None),
        (b"gzip, chunked", True, b"gzip"),
        (b"gzip,chunked", True, b"gzip"),
        (b"chunked, gzip", False, b"chunked, gzip"),
        (b"gzip", False, b"gzip"),
        (b"gzip, , deflate", False, b"gzip, deflate"),
    ],
)
def test_response_codings_are_kept_for_the_label(
    value: bytes, chunked: bool, codings: bytes | None
) -> None:
    fields, info = forward([(b"Transfer-Encoding", value)], request=False)
    assert fields == []  # hop-by-hop: drainproxy writes its own
    assert (info.chunked, info.transfer_codings) == (chunked, codings)


@pytest.mark.parametrize("value", [b"chunked, chunked", b"chunked, gzip, chunked", b" , "])
def test_chunked_twice_or_no_coding_is_refused(value: bytes) -> None:
    for request_side in (True, False):
        with pytest.raises(FramingError):
            forward([(b"Transfer-Encoding", value)], request=request_side)


def test_request_coding_other_than_chunked_is_501() -> None:
    with pytest.raises(FramingError) as refused:
        forward([(b"Transfer-Encoding", b"gzip, chunked")])
    assert refused.value.status == 501
    with pytest.raises(FramingError) as refused:
        forward([(b"Transfer-Encoding", b"chunked, gzip")])
    assert refused.value.status == 400


# --- status lines and 1xx (item 8) ----------------------------------------------------------


@pytest.mark.parametrize("status", [0, 99, 600, 999])
def test_status_outside_100_599_is_invalid(status: int) -> None:
    """RFC 9110 §15: valid status codes are 100-599; llhttp reads ``099`` as 99."""
    with pytest.raises(FramingError, match="status"):
        status_line(status, b"Odd")


@pytest.mark.parametrize("reason", [b"O\x01K", b"O\x7fK", b"O\x00K", b"O\nK", b"O\rK"])
def test_control_character_in_reason_is_invalid(reason: bytes) -> None:
    with pytest.raises(FramingError, match="reason"):
        status_line(200, reason)


@pytest.mark.parametrize("reason", [b"OK", b"", b"Not\tFound", b"Caf\xe9", b"A (B) ~"])
def test_valid_reason_phrases_pass(reason: bytes) -> None:
    assert status_line(200, reason) == b"HTTP/1.1 200 " + reason + b"\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        [(b"Content-Length", b"2")],
        [(b"Content-Length", b"0")],
        [(b"Transfer-Encoding", b"chunked")],
    ],
)
def test_framing_on_a_1xx_is_invalid(framing: Headers) -> None:
    """RFC 9110 §8.6: no Content-Length on a 1xx; a 1xx has no content."""
    with pytest.raises(FramingError, match="1xx"):
        check_interim_head(forward(framing, request=False)[1])
    check_interim_head(forward([(b"Link", b"</a>")], request=False)[1])


# --- response framing (item 8) ----------------------------------------------------------------


def response_info(headers: Headers) -> HeadInfo:
    return forward(headers, request=False)[1]


@pytest.mark.parametrize(
    ("headers", "bodyless", "http10", "expected"),
    [
        ([(b"Content-Length", b"2")], False, False, (FRAME_RAW, b"", False, False)),
        ([(b"Content-Length", b"2")], True, False, (FRAME_NONE, b"", False, False)),
        ([(b"Transfer-Encoding", b"gzip")], True, True, (FRAME_NONE, b"", False, False)),
        (
            [(b"Transfer-Encoding", b"chunked")],
            False,
            False,
            (FRAME_CHUNKED, b"Transfer-Encoding: chunked\r\n", False, False),
        ),
        ([], False, False, (FRAME_CHUNKED, b"Transfer-Encoding: chunked\r\n", True, False)),
        ([(b"Transfer-Encoding", b"chunked")], False, True, (FRAME_RAW, b"", False, True)),
        ([], False, True, (FRAME_RAW, b"", True, True)),
        (
            [(b"Transfer-Encoding", b"gzip, chunked")],
            False,
            False,
            (FRAME_CHUNKED, b"Transfer-Encoding: gzip, chunked\r\n", False, False),
        ),
        (
            [(b"Transfer-Encoding", b"chunked, gzip")],
            False,
            False,
            (FRAME_RAW, b"Transfer-Encoding: chunked, gzip\r\n", True, True),
        ),
        (
            [(b"Transfer-Encoding", b"GZIP")],
            False,
            False,
            (FRAME_RAW, b"Transfer-Encoding: gzip\r\n", True, True),
        ),
    ],
)
def test_response_framing(
    headers: Headers, bodyless: bool, http10: bool, expected: tuple[int, bytes, bool, bool]
) -> None:
    assert tuple(response_framing(response_info(headers), bodyless, http10)) == expected


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"chunked, gzip", b"br"])
def test_response_coding_for_http10_client_is_invalid(coding: bytes) -> None:
    with pytest.raises(FramingError, match=r"HTTP/1\.0"):
        response_framing(response_info([(b"Transfer-Encoding", coding)]), False, True)


# --- property: what goes out reads the same to a strict and a lenient app ---------------------

_WATCHED = [
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"connection",
    b"upgrade",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"keep-alive",
    b"te",
]


@st.composite
def look_alike_names(draw: st.DrawFn) -> bytes:
    """A watched name with its case changed and its separators replaced by ``_``/``-`` runs."""
    name = draw(st.sampled_from(_WATCHED)).decode()
    out = []
    for char in name:
        if char == "-" or draw(st.integers(0, 12)) == 0:
            out.append(draw(st.sampled_from(["-", "_", "--", "_-", "-_", "___"])))
        if char != "-":
            out.append(char.upper() if draw(st.booleans()) else char)
    return "".join(out).strip("-_").encode() or b"x"


@given(st.lists(st.tuples(look_alike_names(), st.sampled_from([b"1", b"h", b"chunked"]))))
def test_no_name_reads_as_a_watched_field_unless_it_is_one(headers: Headers) -> None:
    """Whatever forward_head lets out, a WSGI-style reader (case folded, ``_`` and runs of ``-``
    as ``-``) finds a watched field only under its own name, never a look-alike."""
    for request_side in (True, False):
        out: list[bytes] = []
        try:
            forward_head(out, headers, request=request_side)
        except FramingError:
            continue
        for name in out[0::4]:
            lenient = re.sub(rb"[-_]+", b"-", name.lower())
            if lenient in _WATCHED:
                assert name.lower() == lenient, name


def test_learned_field_names_are_bounded() -> None:
    """A client sending a new name in every request cannot grow the name table without end,
    and names past the bound are still classified right."""
    for index in range(2000):
        forward([(b"X-Random-%d" % index, b"v"), (b"Host", b"h")])
    assert len(http1._field_kinds) <= http1._FIELD_KINDS_LIMIT
    with pytest.raises(FramingError, match="looks like"):
        forward([(b"Host", b"h"), (b"CONTENT__LENGTH", b"1")])
    assert forward([(b"X-Unseen-Name", b"v")])[0] == [(b"X-Unseen-Name", b"v")]
