"""Issue 17: what a config error or warning says, word for word (operators read these, and
``drainproxy check`` prints them), and the rules around each: in process."""

from __future__ import annotations

import pytest

from drainproxy.config.schema import (
    GRACE_MARGIN,
    PLACEHOLDER_TOKEN,
    ConfigReport,
    ConfigWarning,
    check_wrapper_config,
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
