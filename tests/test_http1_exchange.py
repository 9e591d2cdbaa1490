"""The two heads of an exchange, decided whole by pure functions (issue 13 item 3): the request
as it goes to the app (``http1.request_for_app``) and the response as it goes to the client
(``http1.response_for_client``, ``http1.interim_for_client``). In process; the property tests
read what comes out with llhttp (httptools), an independent parser, as the next hop would."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drainproxy.dataplane.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    FORWARDED_FOR,
    FORWARDED_HOST,
    FORWARDED_PROTO,
    FRAME_CHUNKED,
    FRAME_NONE,
    FRAME_RAW,
    ForwardingPolicy,
    FramingError,
    interim_for_client,
    request_for_app,
    response_for_client,
    switch_offered,
    upgrade_offered,
)

Headers = list[tuple[bytes, bytes]]

POLICY = ForwardingPolicy(
    drop=frozenset({FORWARDED_FOR}),
    default_host_line=b"Host: app:8080\r\n",
    forwarded_proto_line=b"X-Forwarded-Proto: http\r\n",
)
PEER = b"10.0.0.7"


def for_app(
    headers: Headers,
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    version: str = "1.1",
    upgrade: bool = False,
    policy: ForwardingPolicy = POLICY,
) -> tuple[bytes, int]:
    return request_for_app(method, target, version, headers, upgrade, policy, PEER)


@dataclass
class Parsed:
    """A message head as llhttp reads it."""

    url: bytes = b""
    status: int = 0
    method: bytes = b""
    version: str = ""
    fields: Headers = field(default_factory=list)
    keep_alive: bool = False
    complete: bool = False
    parser: httptools.HttpResponseParser | None = None

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.fields if key.lower() == name]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True
        if self.parser is not None:  # read here: a body that ends at once resets it
            self.keep_alive = self.parser.should_keep_alive()


def parse_request_head(head: bytes) -> Parsed:
    parsed = Parsed()
    parser = httptools.HttpRequestParser(parsed)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(head)
    assert parsed.complete, head
    parsed.method = parser.get_method()
    parsed.version = parser.get_http_version()
    return parsed


def parse_response_head(head: bytes) -> Parsed:
    parsed = Parsed()
    parsed.parser = parser = httptools.HttpResponseParser(parsed)
    parser.feed_data(head)
    assert parsed.complete, head
    parsed.status = parser.get_status_code()
    return parsed


# --- the request for the app ------------------------------------------------------------------


def test_an_ordinary_request_goes_on_as_http11_with_this_hops_fields() -> None:
    head, body = for_app([(b"Host", b"example.com"), (b"Accept", b"*/*")])
    assert head == (
        b"GET / HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: example.com\r\n\r\n"
    )
    assert body == BODY_NONE


def test_prior_forwarded_for_values_are_joined_before_the_peer() -> None:
    head, _ = for_app(
        [(b"Host", b"h"), (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")]
    )
    assert parse_request_head(head).values(b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 10.0.0.7"]


@pytest.mark.parametrize(
    ("policy", "proto", "host"),
    [
        (POLICY, [b"https"], [b"edge"]),  # set: the request's own are kept
        (
            replace(
                POLICY,
                drop=frozenset({FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST}),
                overwrite_xfp=True,
                overwrite_xfh=True,
            ),
            [b"http"],
            [b"h"],
        ),
        (replace(POLICY, set_xfp=False, set_xfh=False), [b"https"], [b"edge"]),
    ],
    ids=["set", "overwrite", "off"],
)
def test_forwarded_proto_and_host_follow_the_policy(
    policy: ForwardingPolicy, proto: list[bytes], host: list[bytes]
) -> None:
    headers = [(b"Host", b"h"), (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"edge")]
    parsed = parse_request_head(for_app(headers, policy=policy)[0])
    assert parsed.values(b"x-forwarded-proto") == proto
    assert parsed.values(b"x-forwarded-host") == host


def test_forwarded_for_passed_as_it_came_when_not_appending() -> None:
    policy = replace(POLICY, drop=frozenset(), xff_append=False)
    head, _ = for_app([(b"Host", b"h"), (b"X-Forwarded-For", b"1.1.1.1")], policy=policy)
    assert parse_request_head(head).values(b"x-forwarded-for") == [b"1.1.1.1"]


def test_absolute_form_target_regenerates_host() -> None:
    head, _ = for_app([(b"Host", b"wrong")], target=b"http://right:81/p?q")
    parsed = parse_request_head(head)
    assert parsed.url == b"http://right:81/p?q"
    assert parsed.values(b"host") == [b"right:81"]


def test_http10_without_host_gets_the_apps_own() -> None:
    head, _ = for_app([], version="1.0")
    parsed = parse_request_head(head)
    assert parsed.version == "1.1"
    assert parsed.values(b"host") == [b"app:8080"]
    assert parsed.values(b"x-forwarded-host") == []


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ([(b"Content-Length", b"5")], BODY_LENGTH),
        ([(b"Content-Length", b"0")], BODY_NONE),
        ([(b"Transfer-Encoding", b"chunked")], BODY_CHUNKED),
        ([], BODY_NONE),
    ],
)
def test_body_framing_follows_the_head(framing: Headers, body: int) -> None:
    head, found = for_app([(b"Host", b"h"), *framing], method=b"POST")
    assert found == body
    parsed = parse_request_head(head)
    assert parsed.values(b"transfer-encoding") == ([b"chunked"] if body == BODY_CHUNKED else [])


def test_upgrade_goes_on_but_h2c_is_answered_as_http11() -> None:
    headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    parsed = parse_request_head(for_app(headers, upgrade=True)[0])
    assert (parsed.values(b"connection"), parsed.values(b"upgrade")) == (
        [b"upgrade"],
        [b"websocket"],
    )
    h2c = [(b"Host", b"h"), (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")]
    parsed = parse_request_head(for_app(h2c, upgrade=True)[0])
    assert parsed.values(b"connection") == parsed.values(b"upgrade") == []
    assert parsed.values(b"http2-settings") == []


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (b"h2c, websocket", [b"websocket"]),
        (b"websocket,H2C", [b"websocket"]),
        (b"h2c ,\th2c", []),
        (b"echo/1, h2c, layer/2", [b"echo/1, layer/2"]),
    ],
)
def test_h2c_is_taken_out_of_an_upgrade_list(offered: bytes, expected: list[bytes]) -> None:
    """h2c is never offered to the app, whatever else the list holds (RFC 9113 §3.1): an app
    that spoke h2c after a 101 would bypass drainproxy's HTTP/2 handling."""
    headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", offered)]
    parsed = parse_request_head(for_app(headers, upgrade=True)[0])
    assert parsed.values(b"upgrade") == expected
    assert parsed.values(b"connection") == ([b"upgrade"] if expected else [])


@pytest.mark.parametrize(
    ("upgrade", "offered"),
    [
        ([b"H2C"], b""),
        ([b"h2c", b"websocket"], b"websocket"),
        ([b"websocket", b"h2c"], b"websocket"),
        ([b"echo/1", b"other/2"], b"echo/1, other/2"),
    ],
)
def test_what_the_app_was_offered_is_read_back_from_the_fields(
    upgrade: list[bytes], offered: bytes
) -> None:
    """``upgrade_offered`` (the 101 check's side) agrees with the head ``request_for_app``
    wrote, across several Upgrade fields."""
    headers = [(b"Host", b"h"), (b"Connection", b"Upgrade")]
    headers += [(b"Upgrade", value) for value in upgrade]
    parsed = parse_request_head(for_app(headers, upgrade=True)[0])
    assert parsed.values(b"upgrade") == ([offered] if offered else [])
    assert upgrade_offered(headers) == offered


@pytest.mark.parametrize(
    ("offered", "chosen", "allowed"),
    [
        (b"websocket", b"websocket", True),
        (b"websocket", b"WebSocket", True),
        (b"echo/1, other/2", b"echo/1, other/2", True),
        (b"echo/1, other/2", b"echo/1, layer/2", False),
        (b"websocket", b"h2c", False),
        (b"", b"websocket", False),
        (b"websocket", None, False),
        (b"websocket", b"websocket, ", False),
    ],
)
def test_a_101_may_switch_only_to_what_the_app_was_offered(
    offered: bytes, chosen: bytes | None, allowed: bool
) -> None:
    """RFC 9110 §7.8: a server MUST NOT switch to a protocol the client did not indicate."""
    assert switch_offered(offered, chosen) is allowed


@pytest.mark.parametrize(
    ("kwargs", "headers", "status", "message"),
    [
        ({"version": "2.0"}, [(b"Host", b"h")], 505, "HTTP/2.0 is not supported"),
        ({}, [], 400, "malformed request: HTTP/1.1 without Host"),
        ({"target": b"http://h/"}, [], 400, "malformed request: HTTP/1.1 without Host"),
        (
            {"target": b"*"},
            [(b"Host", b"h")],
            400,
            "malformed request: asterisk-form target without OPTIONS",
        ),
        (
            {"target": b"0x"},
            [(b"Host", b"h")],
            400,
            "malformed request: request target is not in origin or absolute form",
        ),
        (
            {"method": b"POST", "upgrade": True},
            [(b"Host", b"h"), (b"Content-Length", b"5"), (b"Upgrade", b"websocket")],
            400,
            "malformed request: ",
        ),
        (
            {"version": "1.0", "method": b"POST"},
            [(b"Transfer-Encoding", b"chunked")],
            400,
            "malformed request: Transfer-Encoding in HTTP/1.0",
        ),
        (
            {"method": b"POST"},
            [(b"Host", b"h"), (b"Content-Length", b"1025")],
            413,
            "request body larger than limits.max_body_bytes",
        ),
        (
            {"method": b"POST"},
            [(b"Host", b"h"), (b"Transfer-Encoding", b"gzip, chunked")],
            501,
            "malformed request: transfer codings other than chunked",
        ),
        (
            {},
            [(b"Host", b"h"), (b"Content-Length", b"3")],
            400,
            "malformed request: a GET request with a body",
        ),
        ({}, [(b"Host", b"h"), (b"Host", b"i")], 400, "malformed request: several Host"),
    ],
)
def test_refusals_carry_their_status_and_whole_reason(
    kwargs: dict[str, object], headers: Headers, status: int, message: str
) -> None:
    """The reason goes into the 4xx body and the log as written (a prefix match: some carry
    the offending value after it)."""
    policy = replace(POLICY, max_body_bytes=1024)
    with pytest.raises(FramingError) as refused:
        for_app(headers, policy=policy, **kwargs)  # type: ignore[arg-type]
    assert str(refused.value).startswith(message), str(refused.value)
    assert refused.value.status == status


def test_a_body_of_exactly_max_body_bytes_goes_on() -> None:
    policy = replace(POLICY, max_body_bytes=1024)
    headers = [(b"Host", b"h"), (b"Content-Length", b"1024")]
    assert for_app(headers, method=b"POST", policy=policy)[1] == BODY_LENGTH


def test_a_get_body_goes_on_when_the_policy_forwards_it() -> None:
    """``limits.get_head_body: forward``."""
    headers = [(b"Host", b"h"), (b"Content-Length", b"3")]
    policy = replace(POLICY, get_head_body=True)
    assert for_app(headers, policy=policy)[1] == BODY_LENGTH


def test_nothing_is_offered_without_an_upgrade_field() -> None:
    assert upgrade_offered([(b"Host", b"h"), (b"Connection", b"upgrade")]) == b""


def test_protocol_names_keep_their_letters() -> None:
    """Only optional whitespace is trimmed from list items (RFC 9110 §5.6.1)."""
    headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"XMPP/X, h2c")]
    assert parse_request_head(for_app(headers, upgrade=True)[0]).values(b"upgrade") == [b"XMPP/X"]


def test_asterisk_form_options_and_connect_authority_pass() -> None:
    assert (
        parse_request_head(for_app([(b"Host", b"h")], method=b"OPTIONS", target=b"*")[0]).url
        == b"*"
    )
    head, _ = for_app([(b"Host", b"h:443")], method=b"CONNECT", target=b"h:443", upgrade=True)
    assert head.startswith(b"CONNECT h:443 HTTP/1.1\r\n")


# Field names that a proxy passes on untouched, and values llhttp accepts.
_TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+.^`|~",
    min_size=1,
    max_size=12,
)
_ORDINARY_NAMES = _TOKEN.map(lambda name: ("X-" + name).encode())
_VALUES = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ,;=/:.-_", max_size=20).map(
    lambda value: value.strip().encode()
)
_PATHS = st.text("abcdefghijklmnopqrstuvwxyz0123456789/?=&%-._~", max_size=20).map(
    lambda path: ("/" + path).encode()
)


@st.composite
def policies(draw: st.DrawFn) -> ForwardingPolicy:
    xff_append, overwrite_xfp, overwrite_xfh = draw(st.booleans()), False, False
    set_xfp, set_xfh = draw(st.booleans()), draw(st.booleans())
    if set_xfp:
        overwrite_xfp = draw(st.booleans())
    if set_xfh:
        overwrite_xfh = draw(st.booleans())
    drop = {FORWARDED_FOR} if xff_append else set()
    drop |= {FORWARDED_PROTO} if overwrite_xfp else set()
    drop |= {FORWARDED_HOST} if overwrite_xfh else set()
    return replace(
        POLICY,
        drop=frozenset(drop),
        xff_append=xff_append,
        set_xfp=set_xfp,
        overwrite_xfp=overwrite_xfp,
        set_xfh=set_xfh,
        overwrite_xfh=overwrite_xfh,
    )


@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
    target=_PATHS,
    version=st.sampled_from(["1.1", "1.0"]),
    host=st.none() | st.sampled_from([b"example.com", b"h:8080", b"[::1]:80"]),
    ordinary=st.lists(st.tuples(_ORDINARY_NAMES, _VALUES), max_size=6),
    framing=st.sampled_from(
        [
            [],
            [(b"Content-Length", b"0")],
            [(b"Content-Length", b"17")],
            [(b"Transfer-Encoding", b"chunked")],
        ]
    ),
    prior_for=st.lists(st.sampled_from([b"1.1.1.1", b"2001:db8::1"]), max_size=2),
    hop=st.lists(
        st.sampled_from(
            [
                (b"Connection", b"keep-alive"),
                (b"Keep-Alive", b"timeout=5"),
                (b"TE", b"trailers"),
                (b"Proxy-Connection", b"close"),
            ]
        ),
        max_size=2,
    ),
    policy=policies(),
)
def test_the_apps_reading_of_the_head_is_the_clients_plus_this_hop(
    method: bytes,
    target: bytes,
    version: str,
    host: bytes | None,
    ordinary: Headers,
    framing: Headers,
    prior_for: list[bytes],
    hop: Headers,
    policy: ForwardingPolicy,
) -> None:
    """Whatever a valid request holds, the app (llhttp) reads: its method and target; its
    end-to-end fields unchanged and in order; one Host (the client's, or the app's own); no
    hop-by-hop field; the body framing ``request_for_app`` announces; X-Forwarded-For as the
    policy says."""
    headers: Headers = [(b"Host", host)] if host is not None else []
    headers += ordinary + framing + hop + [(b"X-Forwarded-For", value) for value in prior_for]
    has_body = framing != [] and framing != [(b"Content-Length", b"0")]
    try:
        head, body = for_app(
            headers,
            method=method,
            target=target,
            version=version,
            policy=replace(policy, get_head_body=True),
        )
    except FramingError as refused:
        # Only for what the RFC refuses: no Host in HTTP/1.1, chunked in HTTP/1.0.
        assert (version == "1.1" and host is None) or (
            version == "1.0" and framing == [(b"Transfer-Encoding", b"chunked")]
        ), refused
        return
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    parsed = parse_request_head(head)
    assert (parsed.method, parsed.url, parsed.version) == (method, target, "1.1")
    seen = [
        (name, value)
        for name, value in parsed.fields
        if name.startswith(b"X-") and not name.lower().startswith(b"x-forwarded-")
    ]
    assert seen == ordinary
    assert parsed.values(b"host") == [host if host is not None else b"app:8080"]
    for name in (b"connection", b"keep-alive", b"te", b"proxy-connection"):
        assert parsed.values(name) == []
    assert body == (
        BODY_CHUNKED
        if framing[:1] == [(b"Transfer-Encoding", b"chunked")]
        else BODY_LENGTH
        if has_body
        else BODY_NONE
    )
    assert parsed.values(b"transfer-encoding") == ([b"chunked"] if body == BODY_CHUNKED else [])
    assert parsed.values(b"content-length") == [
        value for name, value in framing if name == b"Content-Length"
    ]
    if policy.xff_append:
        assert parsed.values(b"x-forwarded-for") == [b", ".join([*prior_for, PEER])]
    else:
        assert parsed.values(b"x-forwarded-for") == prior_for


# --- the response for the client --------------------------------------------------------------


def for_client(
    headers: Headers,
    status: int = 200,
    *,
    reason: bytes = b"OK",
    head_request: bool = False,
    http10: bool = False,
    close: bool = False,
) -> tuple[bytes, int | None, bool]:
    """The head joined, its body frame (None: 101) and whether the connection closes."""
    out, _, framing, closes = response_for_client(
        status, reason, headers, head_request, http10, close
    )
    return b"".join(out), None if framing is None else framing.frame, closes


def test_a_content_length_response_keeps_the_connection() -> None:
    head, frame, close = for_client([(b"Content-Length", b"5"), (b"Server", b"x")])
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\n"
    assert (frame, close) == (FRAME_RAW, False)


def test_a_close_the_caller_decided_is_announced() -> None:
    head, _, close = for_client([(b"Content-Length", b"5")], close=True)
    assert close and head.endswith(b"\r\nConnection: close\r\n\r\n")


def test_an_http10_client_kept_alive_is_told_so() -> None:
    head, _, close = for_client([(b"Content-Length", b"5")], http10=True)
    assert not close and head.endswith(b"\r\nConnection: keep-alive\r\n\r\n")


def test_no_length_is_chunked_for_http11_and_closes_for_http10() -> None:
    head, frame, close = for_client([])
    assert (frame, close) == (FRAME_CHUNKED, False)
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    head, frame, close = for_client([], http10=True)
    assert (frame, close) == (FRAME_RAW, True)
    assert b"Transfer-Encoding" not in head and head.endswith(b"Connection: close\r\n\r\n")


@pytest.mark.parametrize(("status", "head_request"), [(204, False), (304, False), (200, True)])
def test_bodyless_responses_pass_no_body(status: int, head_request: bool) -> None:
    head, frame, close = for_client([(b"Content-Length", b"42")], status, head_request=head_request)
    assert (frame, close) == (FRAME_NONE, False)
    # RFC 9110 §8.6: a 204's Content-Length can only mislead; a HEAD's or 304's tells the size.
    assert (b"Content-Length" in head) == (status != 204)


def test_the_reason_phrase_is_filled_in_when_the_app_sent_none() -> None:
    assert for_client([(b"Content-Length", b"0")], 404, reason=b"")[0].startswith(
        b"HTTP/1.1 404 Not Found\r\n"
    )


def test_101_leaves_the_switch_to_the_caller() -> None:
    out, info, framing, close = response_for_client(
        101, b"Switching Protocols", [(b"Upgrade", b"websocket")], False, False, False
    )
    assert framing is None and close
    assert info.upgrade == b"websocket"
    assert b"".join(out) == b"HTTP/1.1 101 Switching Protocols\r\n"


@pytest.mark.parametrize(
    ("status", "headers", "http10"),
    [
        (200, [(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")], False),
        (200, [(b"Transfer-Encoding", b"gzip")], True),
        (999, [], False),
        (200, [(b"Content-Length", b"x")], False),
    ],
)
def test_invalid_responses_are_refused(status: int, headers: Headers, http10: bool) -> None:
    with pytest.raises(FramingError):
        for_client(headers, status, http10=http10)


def test_interim_heads_go_to_http11_clients_only() -> None:
    link = [(b"Link", b"</s.css>; rel=preload")]
    out = interim_for_client(103, b"Early Hints", link, False)
    assert out is not None
    assert b"".join(out) == b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    assert interim_for_client(103, b"Early Hints", link, True) is None
    with pytest.raises(FramingError, match="1xx"):
        interim_for_client(100, b"Continue", [(b"Content-Length", b"0")], True)


def test_interim_and_final_heads_pass_a_host_field_as_it_came() -> None:
    """Host is a request's field (RFC 9110 §7.2): on a response it is just a field, never
    validated as an authority."""
    odd_host = [(b"Host", b"a b")]
    out = interim_for_client(103, b"Early Hints", odd_host, False)
    assert out is not None and b"\r\nHost: a b\r\n" in b"".join(out)
    head, _, _ = for_client([*odd_host, (b"Content-Length", b"0")])
    assert b"\r\nHost: a b\r\n" in head


_FRAMINGS = st.sampled_from(
    [
        [],
        [(b"Content-Length", b"0")],
        [(b"Content-Length", b"13")],
        [(b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"gzip, chunked")],
        [(b"Transfer-Encoding", b"gzip")],
    ]
)


@given(
    status=st.sampled_from([200, 201, 204, 206, 301, 304, 400, 404, 500, 503]),
    ordinary=st.lists(st.tuples(_ORDINARY_NAMES, _VALUES), max_size=6),
    framing=_FRAMINGS,
    hop=st.lists(
        st.sampled_from(
            [
                (b"Connection", b"keep-alive"),
                (b"Connection", b"close"),
                (b"Keep-Alive", b"timeout=5"),
            ]
        ),
        max_size=2,
    ),
    head_request=st.booleans(),
    http10=st.booleans(),
    close=st.booleans(),
)
def test_the_clients_reading_of_the_head_matches_the_framing(
    status: int,
    ordinary: Headers,
    framing: Headers,
    hop: Headers,
    head_request: bool,
    http10: bool,
    close: bool,
) -> None:
    """Whatever the app's final response, the client (llhttp) reads: its status and end-to-end
    fields in order; never both Content-Length and Transfer-Encoding; at most one Connection
    field, ``close`` exactly when the connection closes; a body delimited the way the framing
    says it is written: by its length, chunked, or by the close."""
    try:
        out, info, found, closes = response_for_client(
            status, b"", ordinary + framing + hop, head_request, http10, close
        )
    except FramingError:
        # Only a coding other than chunked, which an HTTP/1.0 client cannot be told of.
        assert http10 and framing[0][1].startswith(b"gzip") and not head_request
        assert status not in (204, 304)
        return
    assert found is not None
    head = b"".join(out)
    parsed = parse_response_head(head)
    assert parsed.status == status
    assert [f for f in parsed.fields if f[0].startswith(b"X-")] == ordinary
    lengths, codings = parsed.values(b"content-length"), parsed.values(b"transfer-encoding")
    assert not (lengths and codings)
    assert parsed.values(b"keep-alive") == []
    connection = parsed.values(b"connection")
    assert connection == ([b"close"] if closes else [b"keep-alive"] if http10 else [])
    assert closes >= close
    if found.frame == FRAME_NONE:
        assert head_request or status in (204, 304)
    elif lengths:
        assert found.frame == FRAME_RAW and lengths == [info.content_length]
    elif found.frame == FRAME_CHUNKED:
        assert codings and codings[-1].endswith(b"chunked") and not http10
    else:  # delimited by the close: the client must be told the connection closes
        assert found.until_client_close and closes
    if not head_request:
        assert parsed.keep_alive == (not closes)
