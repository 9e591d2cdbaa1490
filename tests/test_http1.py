"""The framing decisions in drainproxy/dataplane/http1.py, in process: what a head becomes when
forwarded, and what is refused (issue 11 items 3-8, with the RFC's expected values)."""

from __future__ import annotations

import re
from collections.abc import Callable

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
    keep_alive_timeout,
    response_framing,
    status_line,
    target_authority,
    valid_host,
)

Headers = list[tuple[bytes, bytes]]

pytestmark = pytest.mark.usefixtures("fresh_http1_caches")


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


# --- what each refusal says (issue 17): the reason goes into the 4xx body and the log ----------


def refusal(call: Callable[[], object]) -> FramingError:
    with pytest.raises(FramingError) as refused:
        call()
    return refused.value


def response_of(headers: Headers) -> Callable[[], object]:
    return lambda: forward(headers, request=False)


@pytest.mark.parametrize(
    ("call", "reason", "status"),
    [
        (
            lambda: target_authority(b"a:80"),
            "request target is not in origin or absolute form",
            400,
        ),
        (
            lambda: target_authority(b"ftp://a/"),
            "absolute-form target with a scheme other than http or https",
            400,
        ),
        (
            lambda: target_authority(b"http://good.example@evil.example/"),
            "userinfo in the request target",
            400,
        ),
        (lambda: target_authority(b"http:///x"), "invalid authority in the request target", 400),
        (lambda: target_authority(b"http://a b/"), "invalid authority in the request target", 400),
        (lambda: forward([(b"Host", b"a b")]), "invalid Host", 400),
        (
            lambda: forward([(b"Host", b"h"), (b"Content_Length", b"5")]),
            "field name 'Content_Length' looks like a framing field",
            400,
        ),
        (lambda: forward([(b"Transfer-Encoding", b" , ")]), "empty Transfer-Encoding", 400),
        (response_of([(b"Transfer-Encoding", b",")]), "empty Transfer-Encoding", 400),
        (
            lambda: forward([(b"Transfer-Encoding", b"chunked, chunked")]),
            "chunked applied more than once",
            400,
        ),
        (
            response_of([(b"Transfer-Encoding", b"chunked, gzip, chunked")]),
            "chunked applied more than once",
            400,
        ),
        (
            lambda: forward([(b"Transfer-Encoding", b"gzip, chunked")]),
            "transfer codings other than chunked are not supported",
            501,
        ),
        (
            lambda: check_request_body(
                b"POST", body_info([(b"Content-Length", b"1")]), upgrade=True, get_head_body=True
            ),
            "an Upgrade request with a body",
            400,
        ),
        (
            lambda: check_request_body(
                b"HEAD", body_info([(b"Content-Length", b"1")]), upgrade=False, get_head_body=False
            ),
            "a HEAD request with a body (limits.get_head_body)",
            400,
        ),
        (lambda: status_line(99, b"Odd"), "status 99 outside 100-599", 400),
        (lambda: status_line(200, b"O\x01K"), "control character in the reason phrase", 400),
        (
            lambda: check_interim_head(response_info([(b"Content-Length", b"0")])),
            "Content-Length or Transfer-Encoding on a 1xx response",
            400,
        ),
        (
            lambda: response_framing(response_info([(b"Transfer-Encoding", b"br")]), False, True),
            "a transfer coding an HTTP/1.0 client cannot be sent",
            400,
        ),
    ],
)
def test_each_refusal_names_what_is_wrong(
    call: Callable[[], object], reason: str, status: int
) -> None:
    refused = refusal(call)
    assert (str(refused), refused.status) == (reason, status)


# --- the edges of each rule (issue 17) -----------------------------------------------------------


@pytest.mark.parametrize("status", [100, 101, 599])
def test_status_100_to_599_are_valid(status: int) -> None:
    """RFC 9110 §15: the range is inclusive at both ends (100 Continue is a status)."""
    assert status_line(status, b"R") == b"HTTP/1.1 %d R\r\n" % status


@pytest.mark.parametrize("control", [b"\x0b", b"\x0c", b"\r", b"\n", b"\x00"])
def test_only_space_and_tab_are_whitespace_around_a_value(control: bytes) -> None:
    """RFC 9110 §5.6.3: OWS is SP and HTAB only. Any other control character is part of the
    value, which then is no number, host or coding, though a reader that strips it sees one."""
    for headers in (
        [(b"Content-Length", b"5" + control)],
        [(b"Content-Length", control + b"5")],
        [(b"Host", b"a.example" + control)],
        [(b"Transfer-Encoding", b"chunked" + control)],
        [(b"Transfer-Encoding", b"gzip," + control + b"chunked")],
    ):
        with pytest.raises(FramingError):
            forward(headers)


def test_fields_after_a_repeated_content_length_still_go_out() -> None:
    fields, info = forward(
        [(b"Content-Length", b"5"), (b"Content-Length", b"5"), (b"X-After", b"1")],
        request=False,
    )
    assert fields == [(b"Content-Length", b"5"), (b"X-After", b"1")]
    assert info.content_length == b"5"


def test_host_made_from_the_target_is_marked() -> None:
    """An HTTP/1.1 request needs a Host field even in absolute form (RFC 9112 §3.2): the caller
    must know when Host came only from the target."""
    _, info = forward([], authority=b"a.example")
    assert info.host_from_target
    _, info = forward([(b"Host", b"b.example")], authority=b"a.example")
    assert not info.host_from_target
    _, info = forward([(b"Host", b"b.example")])
    assert not info.host_from_target


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip")], b"chunked, gzip"),
        ([(b"Transfer-Encoding", b"gzip"), (b"transfer-encoding", b"br")], b"gzip, br"),
    ],
)
def test_a_response_coding_split_over_fields_keeps_the_whole_label(
    fields: Headers, label: bytes
) -> None:
    """RFC 9110 §5.3: several Transfer-Encoding fields are one list, in order."""
    _, info = forward(fields, request=False)
    assert (info.chunked, info.transfer_codings) == (False, label)


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ([(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")], 501),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], 400),
    ],
)
def test_a_request_coding_split_over_fields_is_judged_whole(fields: Headers, status: int) -> None:
    """The last field alone says chunked; the list says gzip below chunked (501) or chunked
    twice (RFC 9112 §6.1)."""
    assert refusal(lambda: forward([(b"Host", b"h"), *fields])).status == status


def test_a_response_host_field_is_passed_on_as_it_came() -> None:
    """Host is a request field (RFC 9110 §7.2): on a response it frames nothing, so it is not
    judged, as any end-to-end field."""
    fields, _ = forward([(b"Host", b"a b, c")], request=False)
    assert fields == [(b"Host", b"a b, c")]


def test_a_checked_host_stays_valid() -> None:
    assert valid_host(b"a.example")
    assert valid_host(b"a.example"), "the second look (from the table) says the same"
    assert not valid_host(b"a example")
    assert not valid_host(b"a example")


def test_the_valid_host_table_is_bounded() -> None:
    for index in range(300):
        assert valid_host(b"host-%d.example" % index)
    assert len(http1._valid_hosts) == http1._VALID_HOST_CACHE_SIZE


# --- Keep-Alive (issue 12: the app's idle timeout) --------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"timeout=5", 5.0),
        (b"timeout=5, max=1000", 5.0),
        (b"max=100, Timeout = 2", 2.0),
        (b"max=100,TIMEOUT=2", 2.0),
        (b'timeout="3"', 3.0),
        (b"timeout=1.5", 1.5),
        (b"max=100", None),
        (b"", None),
        (b"timeout", None),
        (b"timeout=", None),
        (b"timeout=soon", None),
        (b"timeout=-1", None),
        (b"timeout=1.2.3", None),
        (b"timeout=5X", None),  # only the quotes of a quoted-string are taken off
        (b"timeout=5 max=100", None),
        (b"max=timeout=5", None),
        # The first timeout is the announcement, and x=1 is no value (RFC 9110 §5.6.6: a token
        # or a quoted-string): none to heed, whatever follows.
        (b"timeout=x=1, timeout=5", None),
    ],
)
def test_keep_alive_timeout_is_read_from_the_field(value: bytes, seconds: float | None) -> None:
    """RFC 2068 §19.7.1.1: ``Keep-Alive: timeout=5, max=100``, comma-separated parameters
    whose names are tokens (case-insensitive) and whose values are tokens or quoted strings."""
    assert keep_alive_timeout(value) == seconds
    assert keep_alive_timeout(value) == seconds, "the second look (from the table) says the same"


def test_the_keep_alive_table_is_bounded() -> None:
    for index in range(100):
        assert keep_alive_timeout(b"timeout=%d" % index) == index
    assert len(http1._keep_alive_timeouts) == http1._KEEP_ALIVE_CACHE_SIZE


@pytest.mark.parametrize(
    "fields",
    [
        [(b"Keep-Alive", b"timeout=5")],
        [(b"Keep-Alive", b"timeout=5"), (b"Keep-Alive", b"max=100")],
        [(b"Keep-Alive", b"max=100"), (b"keep-alive", b"timeout=5")],
    ],
)
def test_the_keep_alive_timeout_is_found_in_any_of_several_fields(fields: Headers) -> None:
    """RFC 9110 §5.3: several Keep-Alive fields are one list; not forwarded (hop-by-hop)."""
    out, info = forward([*fields, (b"Content-Length", b"0")], request=False)
    assert out == [(b"Content-Length", b"0")]
    assert info.keep_alive is not None
    assert keep_alive_timeout(info.keep_alive) == 5.0


# --- Upgrade -------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_side", [True, False])
def test_upgrade_split_over_fields_offers_every_protocol_in_order(request_side: bool) -> None:
    """RFC 9110 §7.8 and §5.3: Upgrade is a list, and several fields are one list; hop-by-hop,
    so drainproxy writes it itself from ``info.upgrade``."""
    fields, info = forward(
        [(b"Upgrade", b"websocket"), (b"X-Between", b"1"), (b"upgrade", b"echo/1, other/2")],
        request=request_side,
    )
    assert fields == [(b"X-Between", b"1")]
    assert info.upgrade == b"websocket, echo/1, other/2"
