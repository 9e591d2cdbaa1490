"""Strict, typed configuration, its schema declared once.

Each key is one dataclass field below: its type, its default, and in its metadata the reader that
turns the YAML value into that type (the rule). One generic reader walks the schema, so a key, its
default and its rule cannot drift apart; ``default.yaml`` beside it documents the same defaults
(a test holds it to the schema). Cross-field rules sit beside the section they concern
(``_rules``).

YAML is loaded with a safe loader that also refuses duplicate keys (the last one would silently
win). Unknown keys are errors, because a typo'd timeout that is silently ignored is exactly the
kind of bug that shows up as 5xx during a rollout. Every error names the dotted field, the value
as written and the rule, and reading goes on after an error so one run reports them all. Values
are read literally: ``${VAR}`` is not expanded (and is refused, since it is always a mistake).

msgspec was measured as the schema library (issue 13): +2.5 MiB RSS on import in the serve
process, and its own error texts and unit-less types would need a hook per key anyway, so plain
dataclasses carry the schema.
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import yaml

from drainproxy.errors import ConfigError, ConfigErrors

T = TypeVar("T")
Reader = Callable[[str, Any], Any]
#: A section's cross-field rules: its dotted name and the mapping as written in, errors out.
SectionRules = Callable[[str, dict[Any, Any]], Iterator[ConfigError]]

#: Seconds kept free between the end of the app's stop and the kubelet's SIGKILL.
GRACE_MARGIN = 2.0
#: Longer than any drain, timeout or grace period anyone means (1e6s is a typo, not a plan).
MAX_DURATION = 24 * 3600.0
#: The admin token the shipped examples carry, to be replaced before use.
PLACEHOLDER_TOKEN = "replace-me-with-a-random-token"

# Go's time.ParseDuration syntax, as Kubernetes writes durations (1m30s, 1h2m3.5s, 500ms).
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
#: ``${VAR}`` (shell, envsubst) and ``$(VAR)`` (Kubernetes' command and args): never expanded
#: here. A bare ``$VAR`` is left alone: a token or a regular expression may hold one.
_UNEXPANDED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$\([A-Za-z_][A-Za-z0-9_]*\)")
_PLACEHOLDER = re.compile(r"^(replace|change)[-_ ]?me", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Durations, kept as written


class Duration(float):
    """Seconds that remember how they were written, so messages show ``1m30s``, not ``90.0``."""

    text: str

    def __new__(cls, seconds: float, text: str | None = None) -> Duration:
        self = super().__new__(cls, seconds)
        self.text = text if text is not None else format_duration(seconds)
        return self

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (Duration, (float(self), self.text))


def format_duration(seconds: float) -> str:
    """Seconds as Go prints a duration: ``0s``, ``500ms``, ``30s``, ``1m30s``, ``277h46m40s``."""
    if isinstance(seconds, Duration):
        return seconds.text
    if seconds == 0:
        return "0s"
    if abs(seconds) < 1:
        return f"{seconds * 1000:.6g}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, rest = divmod(rest, 60.0)
    text = f"{int(hours)}h" if hours else ""
    text += f"{int(minutes)}m" if hours or minutes else ""
    return text + f"{round(rest, 6):g}s"


def parse_duration(name: str, value: object) -> Duration:
    """Seconds from a number (seconds) or a Go duration string such as ``500ms``, ``1m30s``;
    finite, not negative, at most 24h."""
    rule = "must be a duration such as 5s, 500ms or 1m30s"
    if isinstance(value, bool):
        raise ConfigError(name, value, rule)
    if isinstance(value, int | float):
        seconds, text = float(value), None
    elif isinstance(value, str):
        text = value.strip()
        if text == "0":
            seconds = 0.0
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or _DURATION_PART.sub("", text) != "":
                raise ConfigError(name, value, rule)
            seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:
        raise ConfigError(name, value, rule)
    if not math.isfinite(seconds):
        raise ConfigError(name, value, "must be a finite duration")
    if seconds < 0:
        raise ConfigError(name, value, "must not be negative")
    if seconds > MAX_DURATION:
        raise ConfigError(name, value, f"must be at most {format_duration(MAX_DURATION)}")
    return Duration(seconds, text)


def _duration(text: str) -> Duration:
    """A default, written as the docs write it."""
    return parse_duration("default", text)


# ---------------------------------------------------------------------------------------------
# Readers: each takes the dotted name for error messages and the raw YAML value.


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(name: str, value: object) -> Address:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port``."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(name, value, "must be host:port, e.g. 0.0.0.0:8080")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or "[" in host or "]" in host:
            raise ConfigError(name, value, "must be host:port, e.g. 0.0.0.0:8080 or [::1]:8080")
    elif "[" in host or "]" in host or ":" in host:
        # An IPv6 address is bracketed (RFC 3986 section 3.2.2): "::1:8080" is ambiguous.
        raise ConfigError(name, value, "must be host:port, e.g. 0.0.0.0:8080 or [::1]:8080")
    host = host or "0.0.0.0"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(name, value, "port must be a number from 1 to 65535")
    return Address(host, int(port_text))


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_MAX_SIZE = 1024**4


def parse_size(name: str, value: object) -> int:
    """Bytes from a whole number or a string such as ``64KiB`` or ``1MiB``; 1 byte to 1 TiB."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ConfigError(name, value, "must be a size in bytes such as 8192, 64KiB or 1MiB")
    if size < 1:
        raise ConfigError(name, value, "must be at least 1 byte")
    if size > _MAX_SIZE:
        raise ConfigError(name, value, "must be at most 1TiB")
    return size


def _whole_number(low: int, high: int) -> Reader:
    def read(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(name, value, f"must be a whole number, {low} or more")
        if value > high:
            raise ConfigError(name, value, f"must be at most {high}")
        return value

    return read


_count = _whole_number(1, 1_000_000)


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


def _string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, value, "must be a non-empty string")
    return value


def one_of(choices: Any) -> Reader:
    """The reader of a ``Literal[...]`` type: its values are the choices (declared once)."""
    allowed: tuple[str, ...] = get_args(choices)

    def read(name: str, value: object) -> str:
        if value not in allowed:
            raise ConfigError(name, value, "must be one of " + ", ".join(allowed))
        return str(value)

    return read


def _optional(reader: Reader) -> Reader:
    def read(name: str, value: object) -> Any:
        return None if value is None else reader(name, value)

    return read


def _upstream_url(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, value, "must be an http://host:port URL")
    try:
        parts = urlsplit(value)
    except ValueError:  # an unclosed "[" of an IPv6 literal
        raise ConfigError(name, value, "must be an http:// or https://host:port URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(name, value, "must be an http:// or https://host:port URL with no path")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(name, value, "port must be a number from 1 to 65535") from None
    return value


def _readable_file(name: str, value: object) -> str:
    path = _string(name, value)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(name, value, f"cannot be read: {exc.strerror}") from None
    return path


def _connections_limit(name: str, value: object) -> int | None:
    return None if value == "auto" else _whole_number(1, 100_000_000)(name, value)


def _signal_name(name: str, value: object) -> str:
    if not isinstance(value, str) or value not in signal.Signals.__members__:
        raise ConfigError(name, value, "must be a signal name such as SIGTERM, SIGQUIT or SIGWINCH")
    return value


def _regex(name: str, value: object) -> str:
    text = _string(name, value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ConfigError(name, value, f"is not a valid regular expression: {exc}") from None
    return text


def _http_url(name: str, value: object) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # an unclosed "[" of an IPv6 literal
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, value, "must be an http:// or https:// URL")
    return str(value)


def _argv(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError(name, value, "must be a non-empty list of strings (an argv, no shell)")
    if not value[0]:
        raise ConfigError(name, value, "must name a program first")
    return tuple(value)


def _check_tls_files(
    name: str, cert_file: str | None, key_file: str | None, ca_file: str | None, ca_key: str
) -> Iterator[ConfigError]:
    """Load the certificate files once, so ``drainproxy check`` finds a bad one, not a pod."""
    import ssl  # here, not at the top: `drainproxy drain` and `check` without TLS skip 4 MiB

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            rule = f"cannot be loaded with {name}.key_file: {exc}"
            yield ConfigError(f"{name}.cert_file", cert_file, rule)
    if ca_file is not None:
        try:
            context.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError) as exc:
            yield ConfigError(f"{name}.{ca_key}", ca_file, f"cannot be loaded: {exc}")


# ---------------------------------------------------------------------------------------------
# Declaring keys


def key(default: Any, read: Reader, *, secret: bool = False, required: str | None = None) -> Any:
    """A key with its default and reader; ``secret`` hides its value in every message;
    ``required`` (the reason) makes it required whenever its section is written."""
    meta = {"read": read, "secret": secret, "required": required}
    return field(default=default, metadata=meta)


def required_key(read: Reader, why: str) -> Any:
    """A key with no default: its section cannot be written without it."""
    return field(metadata={"read": read, "required": why})


def section(cls: type[Any], *, shorthand: str | None = None, required: bool = False) -> Any:
    """A nested mapping that is always there (its keys' defaults apply); ``shorthand`` names the
    key a bare scalar stands for (``upstream: http://...``); ``required``: a config file must
    write it, and one that does not is told which of its keys are required."""
    meta = {"section": cls, "shorthand": shorthand, "required_section": required}
    return field(default_factory=cls, metadata=meta)


def optional_section(cls: type[Any]) -> Any:
    """A nested mapping that is off (``None``) unless written."""
    return field(default=None, metadata={"section": cls, "optional": True})


def items(cls: type[Any], shape: str) -> Any:
    """A list of mappings, each read as ``cls``; ``shape`` describes one for error messages."""
    return field(default=(), metadata={"items": cls, "shape": shape})


# ---------------------------------------------------------------------------------------------
# The schema


CheckKind = Literal["tcp", "http"]
#: ``h2c``: HTTP/2 without TLS (prior knowledge: an http:// url); ``h2``: HTTP/2 over TLS,
#: agreed by ALPN (an https:// url). See docs/http2.md.
UpstreamProtocol = Literal["http1", "h2c", "h2"]


@dataclass(frozen=True)
class AppCheck:
    """How drainproxy decides the app is reachable: a TCP connect, or an HTTP GET of ``path``."""

    kind: CheckKind = key("tcp", one_of(CheckKind))
    path: str = key("/", _string)
    interval: float = key(_duration("1s"), parse_duration)
    timeout: float = key(_duration("1s"), parse_duration)

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        if not self.path.startswith("/"):
            yield ConfigError(f"{name}.path", self.path, "must start with /")
        if self.interval <= 0:
            yield ConfigError(f"{name}.interval", self.interval, "must be more than 0")


@dataclass(frozen=True)
class UpstreamTLSConfig:
    """TLS to the app (an ``https://`` upstream URL). Without ``ca_file`` the system CAs apply."""

    ca_file: str | None = key(None, _readable_file)
    verify: bool = key(True, _boolean)
    server_name: str | None = key(None, _string)
    cert_file: str | None = key(None, _readable_file)
    key_file: str | None = key(None, _readable_file)

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (
                ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            )
            yield ConfigError(
                f"{name}.{given}", getattr(self, given), f"and {name}.{missing} go together"
            )
        yield from _check_tls_files(name, self.cert_file, self.key_file, self.ca_file, "ca_file")


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = key("http://127.0.0.1:8000", _upstream_url, required="(the app's http://host:port)")
    connect_timeout: float = key(_duration("5s"), parse_duration)
    response_timeout: float = key(_duration("60s"), parse_duration)
    max_idle_connections: int = key(64, _whole_number(0, 1_000_000))
    #: Below the app's own keep-alive timeout (gunicorn 2 s, Node and uvicorn 5 s), see pool.
    idle_timeout: float = key(_duration("1s"), parse_duration)
    #: Taken from an app's announced ``Keep-Alive: timeout=N``.
    keep_alive_margin: float = key(_duration("1s"), parse_duration)
    check: AppCheck = section(AppCheck)
    #: Set exactly when the URL is https:// (its defaults when not written).
    tls: UpstreamTLSConfig | None = optional_section(UpstreamTLSConfig)
    protocol: UpstreamProtocol = key("http1", one_of(UpstreamProtocol))
    #: From ``url``.
    host: str = field(init=False, compare=False, repr=False)
    port: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        https = parts.scheme == "https"
        object.__setattr__(self, "host", parts.hostname or "")
        object.__setattr__(self, "port", parts.port or (443 if https else 80))
        if https and self.tls is None:
            object.__setattr__(self, "tls", UpstreamTLSConfig())

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        https = self.url.startswith("https:")
        if self.tls is not None and not https:
            yield ConfigError(f"{name}.tls", raw["tls"], f"needs an https:// {name}.url")
        if https and self.protocol == "h2c":
            rule = f"is HTTP/2 over plain TCP and needs an http:// {name}.url (h2 is over TLS)"
            yield ConfigError(f"{name}.protocol", "h2c", rule)
        if not https and self.protocol == "h2":
            rule = f"is HTTP/2 over TLS and needs an https:// {name}.url (h2c is without TLS)"
            yield ConfigError(f"{name}.protocol", "h2", rule)


@dataclass(frozen=True)
class TimeoutsConfig:
    """Client-side timeouts (the app's are in ``upstream``); 0 turns one off."""

    request_head: float = key(_duration("10s"), parse_duration)
    client_idle: float = key(_duration("75s"), parse_duration)
    client_body: float = key(_duration("30s"), parse_duration)


GetHeadBody = Literal["refuse", "forward"]


def _window_size(name: str, value: object) -> int:
    """An HTTP/2 flow-control window: 64 KiB - 1 up to 2^31 - 1 bytes (RFC 9113 §6.9.1)."""
    size = parse_size(name, value)
    if not 65535 <= size <= 2**31 - 1:
        raise ConfigError(name, value, "must be from 65535 bytes to 2GiB - 1")
    return size


@dataclass(frozen=True)
class LimitsConfig:
    """Sizes and counts that bound what one client may make drainproxy hold."""

    max_request_line: int = key(8192, parse_size)
    max_header_bytes: int = key(32768, parse_size)
    max_headers: int = key(100, _count)
    #: A response's status line and header fields (1xx heads included), and the chunk framing
    #: of its body beyond its data (chunk extensions, trailer fields): more is answered 502.
    max_response_header_bytes: int = key(65536, parse_size)
    #: None: no limit on request bodies.
    max_body_bytes: int | None = key(None, _optional(parse_size))
    #: None: ``auto``, half the open-file limit (each connection may need one to the app too).
    max_connections: int | None = key(None, _connections_limit)
    #: GET and HEAD requests with a body: ``refuse`` (400), or ``forward`` for apps that read
    #: them. An app that ignores a GET body reads it as the next request (issue 11).
    get_head_body: GetHeadBody = key("refuse", one_of(GetHeadBody))
    #: HTTP/2 (docs/http2.md): streams open at once per connection (SETTINGS_MAX_CONCURRENT_
    #: STREAMS), and the flow-control windows, which bound request bytes held per stream and
    #: per connection.
    max_concurrent_streams: int = key(100, _count)
    http2_stream_window: int = key(256 * 1024, _window_size)
    http2_connection_window: int = key(1024 * 1024, _window_size)


ClientCertMode = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class ListenerTLSConfig:
    """TLS termination on ``listen``; the files are re-read when they change."""

    cert_file: str = required_key(_readable_file, "when tls is set")
    key_file: str = required_key(_readable_file, "when tls is set")
    client_ca_file: str | None = key(None, _readable_file)
    client_cert: ClientCertMode = key("none", one_of(ClientCertMode))
    reload_interval: float = key(_duration("10s"), parse_duration)

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        if (self.client_cert != "none") != (self.client_ca_file is not None):
            yield ConfigError(
                f"{name}.client_cert",
                self.client_cert,
                f"must be optional or required exactly when {name}.client_ca_file is set",
            )
        if self.reload_interval <= 0:
            yield ConfigError(
                f"{name}.reload_interval", self.reload_interval, "must be more than 0"
            )
        yield from _check_tls_files(
            name, self.cert_file, self.key_file, self.client_ca_file, "client_ca_file"
        )


ForwardedMode = Literal["preserve", "overwrite", "off"]
ForwardedForMode = Literal["append", "off"]


@dataclass(frozen=True)
class ForwardedConfig:
    """X-Forwarded-* handling. ``preserve`` keeps a value an upstream balancer already set."""

    x_forwarded_for: ForwardedForMode = key("append", one_of(ForwardedForMode))
    x_forwarded_proto: ForwardedMode = key("preserve", one_of(ForwardedMode))
    x_forwarded_host: ForwardedMode = key("preserve", one_of(ForwardedMode))


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = key(Address("0.0.0.0", 9901), parse_address)
    token: str | None = key(None, _optional(_string), secret=True)


@dataclass(frozen=True)
class ProberRule:
    """How many consecutive failed readiness checks make one prober mark the pod unready."""

    failure_threshold: int = required_key(_count, "")
    address: str | None = key(None, _string)
    #: A regular expression searched in the prober's User-Agent.
    user_agent: str | None = key(None, _regex)

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        if self.address is None and self.user_agent is None:
            yield ConfigError(name, raw, "needs an address or a user_agent to match probers")


PropagationMode = Literal["fixed", "evidence"]


@dataclass(frozen=True)
class DrainConfig:
    readiness_fail_delay: float = key(_duration("0s"), parse_duration)
    propagation: float = key(_duration("5s"), parse_duration)
    min: float = key(_duration("0s"), parse_duration)
    timeout: float = key(_duration("20s"), parse_duration)
    idle_grace: float = key(_duration("500ms"), parse_duration)
    close_spread: float = key(_duration("0s"), parse_duration)
    #: ``fixed`` waits all of ``propagation``; ``evidence`` may end it early (see docs/drain.md).
    propagation_mode: PropagationMode = key("fixed", one_of(PropagationMode))
    propagation_min: float = key(_duration("1s"), parse_duration)
    propagation_margin: float = key(_duration("1s"), parse_duration)
    quiet: float = key(_duration("1s"), parse_duration)
    default_failure_threshold: int = key(3, _count)
    probers: tuple[ProberRule, ...] = items(ProberRule, "{address, user_agent, failure_threshold}")

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        if self.min > self.timeout:
            yield ConfigError(
                f"{name}.min",
                self.min,
                f"must not exceed {name}.timeout ({format_duration(self.timeout)})",
            )
        if self.propagation_mode == "evidence" and self.propagation_min > self.propagation:
            yield ConfigError(
                f"{name}.propagation_min",
                self.propagation_min,
                f"must not exceed {name}.propagation ({format_duration(self.propagation)})",
            )


AppStopMethod = Literal["prestop", "signal", "http", "exec", "none"]
HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]

#: The keys each stop method uses beyond stop, stop_timeout and signal.
_APP_STOP_KEYS = {
    "signal": ("pidfile", "process", "kill_after_timeout"),
    "http": ("url", "method"),
    "exec": ("command",),
}


@dataclass(frozen=True)
class AppConfig:
    """How the app is told to stop after the drain (waiting preStop calls are released after it)."""

    stop: AppStopMethod = key("prestop", one_of(AppStopMethod))
    stop_timeout: float = key(_duration("3s"), parse_duration)
    #: A ``signal.Signals`` name; used by ``stop: signal`` and by wrapper mode.
    signal: str = key("SIGTERM", _signal_name)
    pidfile: str | None = key(None, _string)
    process: str | None = key(None, _regex)
    kill_after_timeout: bool = key(False, _boolean)
    url: str | None = key(None, _http_url)
    method: HttpMethod = key("POST", one_of(HttpMethod))
    command: tuple[str, ...] | None = key(None, _argv)

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        for method, keys in _APP_STOP_KEYS.items():
            for used in keys:
                if used in raw and self.stop != method:
                    yield ConfigError(
                        f"{name}.{used}", raw[used], f"is only used with {name}.stop: {method}"
                    )
        if self.stop == "signal" and (self.pidfile is None) == (self.process is None):
            yield ConfigError(
                f"{name}.stop",
                self.stop,
                f"needs exactly one of {name}.pidfile (a file holding the app's process id) and "
                f"{name}.process (a regular expression matching its command line)",
            )
        if self.stop == "http" and self.url is None:
            yield ConfigError(f"{name}.stop", self.stop, f"needs {name}.url (the URL to call)")
        if self.stop == "exec" and self.command is None:
            yield ConfigError(
                f"{name}.stop", self.stop, f"needs {name}.command (an argv list to run)"
            )


LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = key("text", one_of(LogFormat))
    level: LogLevel = key("info", one_of(LogLevel))
    access_log: bool = key(False, _boolean)


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class Config:
    listen: Address = key(Address("0.0.0.0", 8080), parse_address)
    #: Required in a file (only a run without --config falls back to its defaults): a config
    #: that does not say where the app is was written for another pod, or is half-written.
    upstream: UpstreamConfig = section(UpstreamConfig, shorthand="url", required=True)
    forwarded: ForwardedConfig = section(ForwardedConfig)
    admin: AdminConfig = section(AdminConfig)
    drain: DrainConfig = section(DrainConfig)
    app: AppConfig = section(AppConfig)
    log: LogConfig = section(LogConfig)
    termination_grace_period: float = key(_duration("30s"), parse_duration)
    timeouts: TimeoutsConfig = section(TimeoutsConfig)
    limits: LimitsConfig = section(LimitsConfig)
    tls: ListenerTLSConfig | None = optional_section(ListenerTLSConfig)

    def shutdown_budget(self) -> list[tuple[str, float]]:
        """The terms that must fit in the termination grace period, in the order they elapse."""
        return [
            ("drain.readiness_fail_delay", self.drain.readiness_fail_delay),
            ("drain.propagation", self.drain.propagation),
            ("drain.timeout", self.drain.timeout),
            ("app.stop_timeout", self.app.stop_timeout),
            ("margin", GRACE_MARGIN),
        ]

    def _rules(self, name: str, raw: dict[Any, Any]) -> Iterator[ConfigError]:
        if self.listen == self.admin.listen:
            yield ConfigError("admin.listen", str(self.admin.listen), "must differ from listen")
        elif _listeners_clash(self.listen, self.admin.listen):
            yield ConfigError(
                "admin.listen",
                str(self.admin.listen),
                f"must differ from listen ({self.listen}): a wildcard address takes the port "
                "on every address of its family, so the second bind would fail",
            )
        for own, address in (("listen", self.listen), ("admin.listen", self.admin.listen)):
            if _same_socket(self.upstream.host, self.upstream.port, address):
                yield ConfigError(
                    "upstream.url",
                    self.upstream.url,
                    f"is drainproxy's own {own} ({address}): it would proxy to itself; "
                    "point it at the port the app listens on",
                )
        terms = self.shutdown_budget()
        total = sum(seconds for _, seconds in terms)
        if total > self.termination_grace_period:
            shown = " + ".join(f"{name} {format_duration(seconds)}" for name, seconds in terms)
            needed = format_duration(total)
            yield ConfigError(
                "termination_grace_period",
                self.termination_grace_period,
                f"is shorter than the shutdown needs: {shown} = {needed}; raise it to at least "
                f"{needed} (and terminationGracePeriodSeconds in the pod spec) or shorten the "
                "drain",
            )


def _listeners_clash(a: Address, b: Address) -> bool:
    """Would binding both fail (EADDRINUSE)? The same port with a wildcard host on one side and
    an address of its family on the other (``::`` takes IPv4 too: Linux binds it dual-stack)."""
    if a.port != b.port:
        return False
    if a.host == b.host or "::" in (a.host, b.host):
        return True
    pairs = ((a.host, b.host), (b.host, a.host))
    return any(wild == "0.0.0.0" and ":" not in other for wild, other in pairs)


def _same_socket(host: str, port: int, address: Address) -> bool:
    """Would connecting to ``host:port`` reach a listener bound to ``address``?"""
    if port != address.port:
        return False
    if address.host in _WILDCARD_HOSTS:
        return host in _LOOPBACK_HOSTS or host in _WILDCARD_HOSTS
    return host == address.host or (host in _LOOPBACK_HOSTS and address.host in _LOOPBACK_HOSTS)


# ---------------------------------------------------------------------------------------------
# Reading the schema


@dataclass(frozen=True)
class ConfigWarning:
    """Something that loads but is likely wrong; ``name`` is stable (check maps it to a rule)."""

    name: str
    field: str
    message: str
    fix: str


class _Reading:
    """One pass over the YAML: every error is collected, a bad value leaves its default."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.written: set[str] = set()

    def section(self, cls: type[T], name: str, raw: object) -> T | None:
        """``cls`` read from ``raw``; None when it cannot be built (a required key is missing)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.errors.append(
                ConfigError(name or "config", raw, "must be a mapping of keys to values")
            )
            return None
        schema = {item.name: item for item in fields(cls) if item.init}  # type: ignore[arg-type]
        errors_before = len(self.errors)
        values: dict[str, Any] = {}
        for key_name, value in raw.items():
            dotted = f"{name}.{key_name}" if name else str(key_name)
            item = schema.get(key_name)
            if item is None:
                known = ", ".join(sorted(schema))
                self.errors.append(
                    ConfigError(dotted, value, f"is not a known key (known here: {known})")
                )
                continue
            self.written.add(dotted)
            try:
                values[key_name] = self._value(item, dotted, value)
            except ConfigError as exc:
                self.errors.append(exc.hidden() if item.metadata.get("secret") else exc)
        for item in schema.values():
            if item.name in raw:
                continue
            dotted = f"{name}.{item.name}" if name else item.name
            why = item.metadata.get("required")
            if why is not None:
                self.errors.append(ConfigError(dotted, None, f"is required {why}".rstrip()))
            elif item.metadata.get("required_section"):
                # Read as if written empty, so its own required keys are named (upstream.url).
                values[item.name] = self._value(item, dotted, None)
        try:
            instance = cls(**values)
        except TypeError:  # a required key is missing (reported above)
            return None
        rules: SectionRules | None = getattr(instance, "_rules", None)
        if rules is not None and len(self.errors) == errors_before:
            self.errors.extend(rules(name, raw))
        return instance

    def _value(self, item: Field[Any], dotted: str, value: object) -> Any:
        meta = item.metadata
        if isinstance(value, str) and (unexpanded := _UNEXPANDED.search(value)):
            raise ConfigError(
                dotted,
                value,
                f"holds {unexpanded.group()}, but drainproxy reads its config literally and "
                "expands no variables: write the value itself (or render the file, e.g. with "
                "envsubst, before drainproxy reads it)",
            )
        if "section" in meta:
            if value is None and meta.get("optional"):
                return None
            if meta.get("shorthand") and not isinstance(value, dict | type(None)):
                value = {meta["shorthand"]: value}
                self.written.add(f"{dotted}.{meta['shorthand']}")
            # None when a required key is missing (reported): only an optional section can
            # lack one (a section must build from its defaults, as Config() does), and None is
            # its default.
            return self.section(meta["section"], dotted, value)
        if "items" in meta:
            if not isinstance(value, list):
                raise ConfigError(dotted, value, f"must be a list of {meta['shape']}")
            built_items = (
                self.section(meta["items"], f"{dotted}[{index}]", one)
                for index, one in enumerate(value)
            )
            return tuple(one for one in built_items if one is not None)
        return meta["read"](dotted, value)


@dataclass(frozen=True)
class ConfigReport:
    """A config read as far as it goes: ``config`` has the defaults where ``errors`` are."""

    config: Config
    errors: tuple[ConfigError, ...]
    warnings: tuple[ConfigWarning, ...]
    #: The dotted keys the file sets.
    written: frozenset[str]

    def checked(self) -> Config:
        """The config, or every error at once."""
        if self.errors:
            raise ConfigErrors(self.errors)
        return self.config


def read_mapping(raw: object) -> ConfigReport:
    """Read and cross-check already-parsed YAML, collecting every error and warning."""
    reading = _Reading()
    config = reading.section(Config, "", raw) or Config()
    errors = tuple(reading.errors)
    warnings = () if errors else tuple(config_warnings(config, frozenset(reading.written)))
    return ConfigReport(config, errors, warnings, frozenset(reading.written))


def config_from_mapping(raw: object) -> Config:
    """Build and cross-check a Config from already-parsed YAML; raises every error at once."""
    return read_mapping(raw).checked()


def config_warnings(config: Config, written: frozenset[str]) -> Iterator[ConfigWarning]:
    """What loads but should not go to production as is."""
    token = config.admin.token
    if token is not None and (token == PLACEHOLDER_TOKEN or _PLACEHOLDER.match(token)):
        yield ConfigWarning(
            "admin-token-placeholder",
            "admin.token",
            "admin.token is a placeholder (shipped in the examples, so public): anyone who can "
            "reach the admin port can drain the pod and release the app's preStop hook",
            "set admin.token to a random value (openssl rand -hex 16) and send the same value "
            "in the app's preStop X-Drainproxy-Token header",
        )
    response, drain = config.upstream.response_timeout, config.drain.timeout
    # The defaults (60s, 20s) are a known pair, documented in default.yaml; warn once either is
    # chosen.
    chosen = (
        "upstream.response_timeout" in written and response != UpstreamConfig().response_timeout
    ) or ("drain.timeout" in written and drain != DrainConfig().timeout)
    if response > drain and chosen:
        yield ConfigWarning(
            "response-timeout-exceeds-drain",
            "upstream.response_timeout",
            f"upstream.response_timeout {format_duration(response)} exceeds drain.timeout "
            f"{format_duration(drain)}: a request the app answers in between is served normally "
            "but cut off (counted as forced) when it is in flight at a drain",
            f"lower upstream.response_timeout to {format_duration(drain)}, or raise drain.timeout "
            "(and the grace period) to cover the slowest response",
        )


# ---------------------------------------------------------------------------------------------
# YAML


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping (the last would win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = self.construct_object(key_node)  # a key that is not a scalar is unhashable
            try:
                first = seen.setdefault(name, key_node)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {name!r} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A scalar its explicit tag cannot make (``!!int abc``) is a YAML error with its line,
        not a traceback."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {tag}", node.start_mark
            ) from None


#: The implicit scalar types YAML 1.1 has and 1.2's core schema resolves otherwise.
_YAML11_SCALARS = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp", "value")
)
#: YAML 1.2's core schema (yaml.org/spec/1.2.2 §10.3.2): each tag, its pattern and the
#: characters it may start with; int before float, which would match a whole number too.
_YAML12_SCALARS = (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
)


class _ConfigLoader(_StrictLoader):
    """drainproxy's config is read with YAML 1.2's core schema: only true and false are
    booleans, so ``x_forwarded_for: off`` is the word off and ``access_log: yes`` is refused
    (YAML 1.1 makes them False and True); ``1:30``, ``010`` and ``2024-01-01`` are strings (1.1
    reads 90, 8 and a date), refused by the key's rule with the key named."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal (``010`` is ten), ``0o`` octal or ``0x`` hexadecimal."""
    text = str(loader.construct_scalar(node))
    return int(text, {"0o": 8, "0x": 16}.get(text[:2], 10))


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_SCALARS]
    for first, resolvers in _StrictLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in _YAML12_SCALARS:
    _ConfigLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first)
    )
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document (YAML 1.2's core schema), duplicate keys refused; errors name
    ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(
            "config", source, f"is not valid YAML: {describe_yaml_error(exc)}"
        ) from None


def parse_yaml_stream(text: str) -> list[Any]:
    """Every document of a multi-document YAML stream, duplicate keys refused."""
    return list(yaml.load_all(text, Loader=_StrictLoader))


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem``, without PyYAML's ``in "<unicode string>"``."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow: no mark
        return f"character #x{exc.character:04x} at position {exc.position}: {exc.reason}"
    return str(exc)


def read_config_text(text: str, source: str) -> ConfigReport:
    """Read a config file's text; a file that is not YAML, or sets nothing, raises ConfigError."""
    raw = parse_yaml(text, source)
    if raw is None:
        raise ConfigError(
            "config",
            source,
            "is empty (only comments or nothing): write at least upstream: http://127.0.0.1:PORT, "
            "or leave out --config to run on the built-in defaults",
        )
    return read_mapping(raw)


def read_config(path: str | Path | None) -> ConfigReport:
    """Read a YAML file, or the schema's defaults when ``path`` is None."""
    if path is None:
        return ConfigReport(Config(), (), (), frozenset())
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", str(path), f"is not UTF-8 text: {exc.reason}") from None
    return read_config_text(text, str(path))


def load_config(path: str | Path | None) -> Config:
    """A YAML file's config, or the schema's defaults when ``path`` is None; every error in the
    file is raised at once (``ConfigErrors``)."""
    return read_config(path).checked()


def check_wrapper_config(config: Config) -> None:
    """``drainproxy wrap`` signals its child's process group itself: no other stop method."""
    if config.app.stop != "prestop":
        raise ConfigError(
            "app.stop",
            config.app.stop,
            "is not used in wrapper mode, where the child's process group gets app.signal: "
            "leave it at prestop",
        )


def default_file_text() -> str:
    """The commented default config shipped in the package (it documents every key)."""
    from importlib import resources  # 1 MiB (tempfile, shutil, random) only when used

    return resources.files("drainproxy.config").joinpath("default.yaml").read_text()


def shown_value(value: object) -> str:
    """A config value as a user writes it: durations as ``30s`` (a Duration's str is as
    written), addresses as ``host:port``."""
    return str(value)
