"""Issue 17: what a config error or warning says, word for word (operators read these, and
``drainproxy check`` prints them), and the rules around each: in process."""

from __future__ import annotations

import pytest
import yaml

from drainproxy.config.schema import (
    GRACE_MARGIN,
    PLACEHOLDER_TOKEN,
    ConfigReport,
    ConfigWarning,
    check_wrapper_config,
    describe_yaml_error,
    read_config_text,
)
from drainproxy.errors import ConfigError

APP = "upstream: http://127.0.0.1:8000\n"


def read(text: str) -> ConfigReport:
    return read_config_text(text, "test.yaml")


def only_error(text: str) -> str:
    (error,) = read(text).errors
    return str(error)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upstream: 8000\n", "upstream.url: 8000 must be an http://host:port URL"),
        (
            "upstream: http://127.0.0.1:8000/app\n",
            "upstream.url: 'http://127.0.0.1:8000/app' must be an http:// or https://host:port "
            "URL with no path",
        ),
        (
            "upstream: ftp://127.0.0.1:8000\n",
            "upstream.url: 'ftp://127.0.0.1:8000' must be an http:// or https://host:port "
            "URL with no path",
        ),
        (
            "upstream: http://127.0.0.1:99999\n",
            "upstream.url: 'http://127.0.0.1:99999' port must be a number from 1 to 65535",
        ),
    ],
)
def test_upstream_url_errors_word_for_word(text: str, message: str) -> None:
    assert only_error(text) == message


def test_an_upstream_url_with_a_bare_slash_is_accepted() -> None:
    assert read("upstream: http://127.0.0.1:8000/\n").errors == ()


def test_wrapper_mode_refuses_another_stop_method_word_for_word() -> None:
    config = read(APP + "app: {stop: none}\n").checked()
    with pytest.raises(ConfigError) as raised:
        check_wrapper_config(config)
    assert (raised.value.field, raised.value.value) == ("app.stop", "none")
    assert str(raised.value) == (
        "app.stop: 'none' is not used in wrapper mode, where the child's process group gets "
        "app.signal: leave it at prestop"
    )
    check_wrapper_config(read(APP).checked())  # prestop, the default: accepted


def test_the_shutdown_budget_names_each_term_in_order() -> None:
    config = read(
        APP + "drain: {readiness_fail_delay: 1s, propagation: 2s, timeout: 3s}\n"
        "app: {stop_timeout: 4s}\n"
    ).checked()
    assert config.shutdown_budget() == [
        ("drain.readiness_fail_delay", 1.0),
        ("drain.propagation", 2.0),
        ("drain.timeout", 3.0),
        ("app.stop_timeout", 4.0),
        ("margin", GRACE_MARGIN),
    ]


def warnings(text: str) -> tuple[ConfigWarning, ...]:
    report = read(text)
    assert report.errors == ()
    return report.warnings


@pytest.mark.parametrize("token", [PLACEHOLDER_TOKEN, "change-me", "Replace_me please"])
def test_a_placeholder_token_is_warned_about_word_for_word(token: str) -> None:
    (warning,) = warnings(APP + f"admin: {{token: '{token}'}}\n")
    assert warning == ConfigWarning(
        "admin-token-placeholder",
        "admin.token",
        "admin.token is a placeholder (shipped in the examples, so public): anyone who can "
        "reach the admin port can drain the pod and release the app's preStop hook",
        "set admin.token to a random value (openssl rand -hex 16) and send the same value "
        "in the app's preStop X-Drainproxy-Token header",
    )


def test_a_random_token_draws_no_warning() -> None:
    assert warnings(APP + "admin: {token: 3f9a0c1e5b7d2468ace0f1b2c3d4e5f6}\n") == ()


def test_a_response_timeout_over_the_drain_timeout_is_warned_about_word_for_word() -> None:
    (warning,) = warnings(
        APP.rstrip("\n").replace("upstream: ", "upstream: {url: ")
        + ", response_timeout: 30s}\ndrain: {timeout: 20s}\n"
    )
    assert warning == ConfigWarning(
        "response-timeout-exceeds-drain",
        "upstream.response_timeout",
        "upstream.response_timeout 30s exceeds drain.timeout 20s: a request the app answers "
        "in between is served normally but cut off (counted as forced) when it is in flight "
        "at a drain",
        "lower upstream.response_timeout to 20s, or raise drain.timeout (and the grace period) "
        "to cover the slowest response",
    )


@pytest.mark.parametrize(
    "text",
    [
        APP,  # both defaults: a documented pair
        APP + "drain: {timeout: 20s}\n",  # the default written out
        "upstream: {url: 'http://127.0.0.1:8000', response_timeout: 60s}\n",
        APP + "drain: {timeout: 60s}\ntermination_grace_period: 2m\n",
    ],
)
def test_the_default_timeouts_or_a_covering_drain_draw_no_warning(text: str) -> None:
    assert warnings(text) == ()


def test_a_chosen_drain_timeout_under_the_default_response_timeout_is_warned_about() -> None:
    (warning,) = warnings(APP + "drain: {timeout: 10s}\n")
    assert warning.name == "response-timeout-exceeds-drain"


# Each rule's message as operators read it: the dotted field, the value as written, the rule.
# Inputs without an upstream get APP first, so each holds exactly one error.
MESSAGES = [
    (
        "app: {stop: exec, command: ['', -s]}",
        "app.command: ['', '-s'] must name a program first",
    ),
    (
        "app: {stop: http, url: 'ftp://127.0.0.1/quit'}",
        "app.url: 'ftp://127.0.0.1/quit' must be an http:// or https:// URL",
    ),
    (
        "app: {stop: signal}",
        "app.stop: 'signal' needs exactly one of app.pidfile (a file holding the app's process "
        "id) and app.process (a regular expression matching its command line)",
    ),
    (
        "app: {url: 'http://127.0.0.1/quit'}",
        "app.url: 'http://127.0.0.1/quit' is only used with app.stop: http",
    ),
    ("app: {stop: signal, pidfile: ''}", "app.pidfile: '' must be a non-empty string"),
    ("log: {access_log: 'yes'}", "log.access_log: 'yes' must be true or false"),
    (
        "drain: {probers: [{user_agent: '(', failure_threshold: 1}]}",
        "drain.probers[0].user_agent: '(' is not a valid regular expression: missing ), "
        "unterminated subpattern at position 0",
    ),
    (
        "drain: {probers: [{user_agent: '', failure_threshold: 1}]}",
        "drain.probers[0].user_agent: '' must be a non-empty string",
    ),
    (
        "drain: {probers: [{address: 10.0.0.5}]}",
        "drain.probers[0].failure_threshold: None is required",
    ),
    (
        "upstream: {url: 'https://app:8443', tls: {ca_file: ''}}",
        "upstream.tls.ca_file: '' must be a non-empty string",
    ),
    (
        "limits: {http2_stream_window: 65534}",
        "limits.http2_stream_window: 65534 must be from 65535 bytes to 2GiB - 1",
    ),
    (
        "limits: {http2_connection_window: 2GiB}",
        "limits.http2_connection_window: '2GiB' must be from 65535 bytes to 2GiB - 1",
    ),
    (
        "limits: {http2_stream_window: lots}",
        "limits.http2_stream_window: 'lots' must be a size in bytes such as 8192, 64KiB or 1MiB",
    ),
    (
        "limits: {max_connections: 100000001}",
        "limits.max_connections: 100000001 must be at most 100000000",
    ),
    (
        "limits: {max_connections: 0}",
        "limits.max_connections: 0 must be a whole number, 1 or more",
    ),
    ("listen: ':65536'", "listen: ':65536' port must be a number from 1 to 65535"),
    (
        "limits: {max_header_bytes: 10 KB}",
        "limits.max_header_bytes: '10 KB' must be a size in bytes such as 8192, 64KiB or 1MiB",
    ),
    (
        "drain: {timeout: [5s]}",
        "drain.timeout: ['5s'] must be a duration such as 5s, 500ms or 1m30s",
    ),
    (
        "admin: {listen: '127.0.0.1:8080'}",
        "admin.listen: '127.0.0.1:8080' must differ from listen (0.0.0.0:8080): a wildcard "
        "address takes the port on every address of its family, so the second bind would fail",
    ),
    (
        "upstream: http://127.0.0.1:9901",
        "upstream.url: 'http://127.0.0.1:9901' is drainproxy's own admin.listen (0.0.0.0:9901): "
        "it would proxy to itself; point it at the port the app listens on",
    ),
    (
        "termination_grace_period: 10s",
        "termination_grace_period: 10s is shorter than the shutdown needs: "
        "drain.readiness_fail_delay 0s + drain.propagation 5s + drain.timeout 20s + "
        "app.stop_timeout 3s + margin 2s = 30s; raise it to at least 30s (and "
        "terminationGracePeriodSeconds in the pod spec) or shorten the drain",
    ),
    (
        "upstream: {url: 'https://app:8443', protocol: h2c}",
        "upstream.protocol: 'h2c' is HTTP/2 over plain TCP and needs an http:// upstream.url "
        "(h2 is over TLS)",
    ),
    (
        "upstream: {url: 'http://app:8080', protocol: h2}",
        "upstream.protocol: 'h2' is HTTP/2 over TLS and needs an https:// upstream.url "
        "(h2c is without TLS)",
    ),
    (
        "upstream: ${APP_URL}",
        "upstream: '${APP_URL}' holds ${APP_URL}, but drainproxy reads its config literally and "
        "expands no variables: write the value itself (or render the file, e.g. with envsubst, "
        "before drainproxy reads it)",
    ),
    (
        "timeouts: {head: 5s}",
        "timeouts.head: '5s' is not a known key (known here: client_body, client_idle, "
        "request_head)",
    ),
    ("{}", "upstream.url: None is required (the app's http://host:port)"),
]


@pytest.mark.parametrize(("text", "message"), MESSAGES, ids=[m for _, m in MESSAGES])
def test_each_rule_names_field_value_and_rule_word_for_word(text: str, message: str) -> None:
    body = text if "upstream" in text or text == "{}" else APP + text
    assert only_error(body) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            "is empty (only comments or nothing): write at least upstream: "
            "http://127.0.0.1:PORT, or leave out --config to run on the built-in defaults",
        ),
        (
            "listen: [",
            "is not valid YAML: line 1, column 10: expected the node content, but "
            "found '<stream end>'",
        ),
        (
            APP + "listen: '\x07'\n",
            "is not valid YAML: character #x0007 at position 41: special characters are not "
            "allowed",
        ),
        (
            APP + "listen: !!int abc\n",
            "is not valid YAML: line 2, column 9: 'abc' is not a valid !!int",
        ),
    ],
)
def test_a_file_that_cannot_be_read_as_a_config_names_itself(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        read(text)
    assert (raised.value.field, raised.value.value) == ("config", "test.yaml")
    assert str(raised.value) == f"config: 'test.yaml' {message}"


def test_a_key_that_is_a_list_or_a_mapping_is_a_yaml_error_after_any_duplicate() -> None:
    for text in ("drain: {[a]: 1}\n", "drain: {{a: 1}: 1}\n"):
        with pytest.raises(ConfigError) as raised:
            read(APP + text)
        assert str(raised.value).endswith(
            "is not valid YAML: line 2, column 9: found unhashable key"
        )
    with pytest.raises(ConfigError) as raised:
        read(APP + "drain: {[a]: 1, quiet: 1s, quiet: 2s}\n")
    assert str(raised.value).endswith("line 2, column 28: duplicate key 'quiet' (first at line 2)")


def test_a_mapping_that_holds_itself_is_refused_by_the_schema_not_a_traceback() -> None:
    assert [str(error) for error in read(APP + "drain: &d {probers: [*d]}\n").errors] == [
        "drain.probers[0].probers: [{'probers': [...]}] is not a known key (known here: address, "
        "failure_threshold, user_agent)",
        "drain.probers[0].failure_threshold: None is required",
    ]


def test_a_yaml_error_without_a_mark_is_described_by_its_text() -> None:
    assert describe_yaml_error(yaml.YAMLError("no document")) == "no document"
