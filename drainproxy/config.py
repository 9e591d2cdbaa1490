"""Strict, typed configuration.

YAML is loaded with ``yaml.safe_load`` into frozen dataclasses. Unknown keys are errors, because a
typo'd timeout that is silently ignored is exactly the kind of bug that shows up as 5xx during a
rollout. Every error names the dotted field, the bad value and the rule.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from drainproxy.errors import ConfigError

T = TypeVar("T")

#: Seconds kept free between the end of the app's stop and the kubelet's SIGKILL.
GRACE_MARGIN = 2.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AppCheck:
    """How drainproxy decides the app is reachable: a TCP connect, or an HTTP GET of ``path``."""

    kind: Literal["tcp", "http"] = "tcp"
    path: str = "/"
    interval: float = 1.0
    timeout: float = 1.0


@dataclass(frozen=True)
class UpstreamTLSConfig:
    """TLS to the app (an ``https://`` upstream URL). Without ``ca_file`` the system CAs apply."""

    ca_file: str | None = None
    verify: bool = True
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    max_idle_connections: int = 64
    idle_timeout: float = 30.0
    check: AppCheck = field(default_factory=AppCheck)
    #: Set exactly when the URL is https://.
    tls: UpstreamTLSConfig | None = None


@dataclass(frozen=True)
class TimeoutsConfig:
    """Client-side timeouts (the app's are in ``upstream``); 0 turns one off."""

    request_head: float = 10.0
    client_idle: float = 75.0
    client_body: float = 30.0


@dataclass(frozen=True)
class LimitsConfig:
    """Sizes and counts that bound what one client may make drainproxy hold."""

    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    #: A response's status line and header fields (1xx heads included), and the chunk framing
    #: of its body beyond its data (chunk extensions, trailer fields): more is answered 502.
    max_response_header_bytes: int = 65536
    #: None: no limit on request bodies.
    max_body_bytes: int | None = None
    #: None: ``auto``, half the open-file limit (each connection may need one to the app too).
    max_connections: int | None = None


ClientCertMode = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class ListenerTLSConfig:
    """TLS termination on ``listen``; the files are re-read when they change."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_cert: ClientCertMode = "none"
    reload_interval: float = 10.0


ForwardedMode = Literal["preserve", "overwrite", "off"]


@dataclass(frozen=True)
class ForwardedConfig:
    """X-Forwarded-* handling. ``preserve`` keeps a value an upstream balancer already set."""

    x_forwarded_for: Literal["append", "off"] = "append"
    x_forwarded_proto: ForwardedMode = "preserve"
    x_forwarded_host: ForwardedMode = "preserve"


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = Address("0.0.0.0", 9901)
    token: str | None = None


@dataclass(frozen=True)
class ProberRule:
    """How many consecutive failed readiness checks make one prober mark the pod unready."""

    failure_threshold: int
    address: str | None = None
    #: A regular expression searched in the prober's User-Agent.
    user_agent: str | None = None


@dataclass(frozen=True)
class DrainConfig:
    readiness_fail_delay: float = 0.0
    propagation: float = 5.0
    min: float = 0.0
    timeout: float = 20.0
    idle_grace: float = 0.5
    close_spread: float = 0.0
    #: ``fixed`` waits all of ``propagation``; ``evidence`` may end it early (see docs/drain.md).
    propagation_mode: Literal["fixed", "evidence"] = "fixed"
    propagation_min: float = 1.0
    propagation_margin: float = 1.0
    quiet: float = 1.0
    default_failure_threshold: int = 3
    probers: tuple[ProberRule, ...] = ()


AppStopMethod = Literal["prestop", "signal", "http", "exec", "none"]


@dataclass(frozen=True)
class AppConfig:
    """How the app is told to stop after the drain (waiting preStop calls are released after it)."""

    stop: AppStopMethod = "prestop"
    stop_timeout: float = 3.0
    #: A ``signal.Signals`` name; used by ``stop: signal`` and by wrapper mode.
    signal: str = "SIGTERM"
    pidfile: str | None = None
    process: str | None = None
    kill_after_timeout: bool = False
    url: str | None = None
    method: str = "POST"
    command: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LogConfig:
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False


@dataclass(frozen=True)
class Config:
    listen: Address = Address("0.0.0.0", 8080)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    forwarded: ForwardedConfig = field(default_factory=ForwardedConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    app: AppConfig = field(default_factory=AppConfig)
    log: LogConfig = field(default_factory=LogConfig)
    termination_grace_period: float = 30.0
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: ListenerTLSConfig | None = None

    def shutdown_budget(self) -> list[tuple[str, float]]:
        """The terms that must fit in the termination grace period, in the order they elapse."""
        return [
            ("drain.readiness_fail_delay", self.drain.readiness_fail_delay),
            ("drain.propagation", self.drain.propagation),
            ("drain.timeout", self.drain.timeout),
            ("app.stop_timeout", self.app.stop_timeout),
            ("margin", GRACE_MARGIN),
        ]


# ---------------------------------------------------------------------------------------------
# Field readers: each takes the dotted name for error messages and the raw YAML value.


def parse_duration(name: str, value: object) -> float:
    """Seconds from a number (seconds) or a string such as ``500ms``, ``5s``, ``1m``."""
    if isinstance(value, bool):
        raise ConfigError(name, value, "must be a duration such as 5s, 500ms or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ConfigError(name, value, "must be a duration such as 5s, 500ms or 1m")
    if seconds < 0:
        raise ConfigError(name, value, "must not be negative")
    return seconds


def parse_address(name: str, value: object) -> Address:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port``."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(name, value, "must be host:port, e.g. 0.0.0.0:8080")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    port = _port(name, value, port_text)
    return Address(host, port)


def _port(name: str, value: object, port_text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(name, value, "port must be a number from 1 to 65535")
    return int(port_text)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(name, value, "must be a whole number, 0 or more")
    return value


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


def _string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, value, "must be a non-empty string")
    return value


def _choice(*choices: str) -> Callable[[str, object], Any]:
    def read(name: str, value: object) -> str:
        if value not in choices:
            raise ConfigError(name, value, "must be one of " + ", ".join(choices))
        return str(value)

    return read


def _optional(reader: Callable[[str, object], T]) -> Callable[[str, object], T | None]:
    def read(name: str, value: object) -> T | None:
        return None if value is None else reader(name, value)

    return read


def _section(
    name: str, raw: object, readers: Mapping[str, Callable[[str, object], Any]]
) -> dict[str, Any]:
    """Read a mapping whose every key must be known; returns only the keys present."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(name or "config", raw, "must be a mapping of keys to values")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}" if name else str(key)
        reader = readers.get(key) if isinstance(key, str) else None
        if reader is None:
            known = ", ".join(sorted(readers))
            raise ConfigError(dotted, value, f"is not a known key (known here: {known})")
        values[key] = reader(dotted, value)
    return values


def _upstream_url(name: str, value: object) -> dict[str, Any]:
    if not isinstance(value, str):
        raise ConfigError(name, value, "must be an http://host:port URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(name, value, "must be an http:// or https://host:port URL with no path")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(name, value, "port must be a number from 1 to 65535") from None
    return {"url": value, "host": parts.hostname, "port": port}


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(name: str, value: object) -> int:
    """Bytes from a whole number or a string such as ``64KiB`` or ``1MiB``; at least 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ConfigError(name, value, "must be a size in bytes such as 8192, 64KiB or 1MiB")
    if size < 1:
        raise ConfigError(name, value, "must be at least 1 byte")
    return size


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "must be a whole number, 1 or more")
    return value


def _readable_file(name: str, value: object) -> str:
    path = _string(name, value)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(name, value, f"cannot be read: {exc.strerror}") from None
    return path


def _upstream_tls(name: str, raw: object) -> UpstreamTLSConfig:
    tls = UpstreamTLSConfig(
        **_section(
            name,
            raw,
            {
                "ca_file": _readable_file,
                "verify": _boolean,
                "server_name": _string,
                "cert_file": _readable_file,
                "key_file": _readable_file,
            },
        )
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{name}.cert_file", tls.cert_file, f"and {name}.key_file go together")
    _check_tls_files(name, tls.cert_file, tls.key_file, tls.ca_file, "ca_file")
    return tls


def _check_tls_files(
    name: str, cert_file: str | None, key_file: str | None, ca_file: str | None, ca_key: str
) -> None:
    """Load the certificate files once, so ``drainproxy check`` finds a bad one, not a pod."""
    import ssl  # here, not at the top: `drainproxy drain` and `check` without TLS skip 4 MiB

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            rule = f"cannot be loaded with {name}.key_file: {exc}"
            raise ConfigError(f"{name}.cert_file", cert_file, rule) from None
    if ca_file is not None:
        try:
            context.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{name}.{ca_key}", ca_file, f"cannot be loaded: {exc}") from None


def _timeouts(name: str, raw: object) -> TimeoutsConfig:
    return TimeoutsConfig(
        **_section(
            name,
            raw,
            {
                "request_head": parse_duration,
                "client_idle": parse_duration,
                "client_body": parse_duration,
            },
        )
    )


def _connections_limit(name: str, value: object) -> int | None:
    return None if value == "auto" else _count(name, value)


def _limits(name: str, raw: object) -> LimitsConfig:
    return LimitsConfig(
        **_section(
            name,
            raw,
            {
                "max_request_line": parse_size,
                "max_header_bytes": parse_size,
                "max_headers": _count,
                "max_response_header_bytes": parse_size,
                "max_body_bytes": _optional(parse_size),
                "max_connections": _connections_limit,
            },
        )
    )


def _listener_tls(name: str, raw: object) -> ListenerTLSConfig | None:
    if raw is None:
        return None
    values = _section(
        name,
        raw,
        {
            "cert_file": _readable_file,
            "key_file": _readable_file,
            "client_ca_file": _readable_file,
            "client_cert": _choice("none", "optional", "required"),
            "reload_interval": parse_duration,
        },
    )
    for key in ("cert_file", "key_file"):
        if key not in values:
            raise ConfigError(f"{name}.{key}", None, "is required when tls is set")
    tls = ListenerTLSConfig(**values)
    if (tls.client_cert != "none") != (tls.client_ca_file is not None):
        raise ConfigError(
            f"{name}.client_cert",
            tls.client_cert,
            f"must be optional or required exactly when {name}.client_ca_file is set",
        )
    if tls.reload_interval <= 0:
        raise ConfigError(f"{name}.reload_interval", tls.reload_interval, "must be more than 0")
    _check_tls_files(name, tls.cert_file, tls.key_file, tls.client_ca_file, "client_ca_file")
    return tls


def _app_check(name: str, raw: object) -> AppCheck:
    values = _section(
        name,
        raw,
        {
            "kind": _choice("tcp", "http"),
            "path": _string,
            "interval": parse_duration,
            "timeout": parse_duration,
        },
    )
    check = AppCheck(**values)
    if not check.path.startswith("/"):
        raise ConfigError(f"{name}.path", check.path, "must start with /")
    if check.interval <= 0:
        raise ConfigError(f"{name}.interval", check.interval, "must be more than 0")
    return check


def _upstream(name: str, raw: object) -> UpstreamConfig:
    if isinstance(raw, str):
        return _upstream(name, {"url": raw})
    values = _section(
        name,
        raw,
        {
            "url": _upstream_url,
            "connect_timeout": parse_duration,
            "response_timeout": parse_duration,
            "max_idle_connections": _positive_int,
            "idle_timeout": parse_duration,
            "check": _app_check,
            "tls": _optional(_upstream_tls),
        },
    )
    if "url" not in values:
        raise ConfigError(f"{name}.url", None, "is required (the app's http://host:port)")
    values.update(values.pop("url"))
    https = values["url"].startswith("https:")
    if values.get("tls") is not None and not https:
        given = cast(dict[str, Any], raw)["tls"]
        raise ConfigError(f"{name}.tls", given, f"needs an https:// {name}.url")
    if https and values.get("tls") is None:
        values["tls"] = UpstreamTLSConfig()
    return UpstreamConfig(**values)


def _forwarded(name: str, raw: object) -> ForwardedConfig:
    mode = _choice("preserve", "overwrite", "off")
    return ForwardedConfig(
        **_section(
            name,
            raw,
            {
                "x_forwarded_for": _choice("append", "off"),
                "x_forwarded_proto": mode,
                "x_forwarded_host": mode,
            },
        )
    )


def _admin(name: str, raw: object) -> AdminConfig:
    return AdminConfig(
        **_section(name, raw, {"listen": parse_address, "token": _optional(_string)})
    )


def _drain(name: str, raw: object) -> DrainConfig:
    return DrainConfig(
        **_section(
            name,
            raw,
            {
                "readiness_fail_delay": parse_duration,
                "propagation": parse_duration,
                "min": parse_duration,
                "timeout": parse_duration,
                "idle_grace": parse_duration,
                "close_spread": parse_duration,
                "propagation_mode": _choice("fixed", "evidence"),
                "propagation_min": parse_duration,
                "propagation_margin": parse_duration,
                "quiet": parse_duration,
                "default_failure_threshold": _count,
                "probers": _probers,
            },
        )
    )


def _probers(name: str, raw: object) -> tuple[ProberRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError(name, raw, "must be a list of {address, user_agent, failure_threshold}")
    rules = []
    for index, item in enumerate(raw):
        dotted = f"{name}[{index}]"
        values = _section(
            dotted,
            item,
            {"address": _string, "user_agent": _regex, "failure_threshold": _count},
        )
        if "failure_threshold" not in values:
            raise ConfigError(f"{dotted}.failure_threshold", None, "is required")
        if "address" not in values and "user_agent" not in values:
            raise ConfigError(dotted, item, "needs an address or a user_agent to match probers")
        rules.append(ProberRule(**values))
    return tuple(rules)


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
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, value, "must be an http:// or https:// URL")
    return str(value)


def _argv(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError(name, value, "must be a non-empty list of strings (an argv, no shell)")
    if not value[0]:
        raise ConfigError(name, value, "must name a program first")
    return tuple(value)


#: The keys each stop method uses beyond stop, stop_timeout and signal.
_APP_STOP_KEYS = {
    "signal": ("pidfile", "process", "kill_after_timeout"),
    "http": ("url", "method"),
    "exec": ("command",),
}


def _app(name: str, raw: object) -> AppConfig:
    values = _section(
        name,
        raw,
        {
            "stop": _choice("prestop", "signal", "http", "exec", "none"),
            "stop_timeout": parse_duration,
            "signal": _signal_name,
            "pidfile": _string,
            "process": _regex,
            "kill_after_timeout": _boolean,
            "url": _http_url,
            "method": _choice("GET", "POST", "PUT", "PATCH", "DELETE"),
            "command": _argv,
        },
    )
    app = AppConfig(**values)
    for method, keys in _APP_STOP_KEYS.items():
        for key in keys:
            if key in values and app.stop != method:
                raise ConfigError(
                    f"{name}.{key}", values[key], f"is only used with {name}.stop: {method}"
                )
    if app.stop == "signal" and (app.pidfile is None) == (app.process is None):
        raise ConfigError(
            f"{name}.stop",
            app.stop,
            f"needs exactly one of {name}.pidfile (a file holding the app's process id) and "
            f"{name}.process (a regular expression matching its command line)",
        )
    if app.stop == "http" and app.url is None:
        raise ConfigError(f"{name}.stop", app.stop, f"needs {name}.url (the URL to call)")
    if app.stop == "exec" and app.command is None:
        raise ConfigError(f"{name}.stop", app.stop, f"needs {name}.command (an argv list to run)")
    return app


def _log(name: str, raw: object) -> LogConfig:
    return LogConfig(
        **_section(
            name,
            raw,
            {
                "format": _choice("text", "json"),
                "level": _choice("debug", "info", "warning", "error"),
                "access_log": _boolean,
            },
        )
    )


_TOP_LEVEL: dict[str, Callable[[str, object], Any]] = {
    "listen": parse_address,
    "upstream": _upstream,
    "forwarded": _forwarded,
    "admin": _admin,
    "drain": _drain,
    "app": _app,
    "log": _log,
    "termination_grace_period": parse_duration,
    "timeouts": _timeouts,
    "limits": _limits,
    "tls": _listener_tls,
}


def config_from_mapping(raw: object) -> Config:
    """Build and cross-check a Config from already-parsed YAML."""
    config = Config(**_section("", raw, _TOP_LEVEL))
    check_cross_field_rules(config)
    return config


def check_cross_field_rules(config: Config) -> None:
    if config.listen == config.admin.listen:
        raise ConfigError("admin.listen", str(config.admin.listen), "must differ from listen")
    if config.drain.min > config.drain.timeout:
        raise ConfigError(
            "drain.min",
            config.drain.min,
            f"must not exceed drain.timeout ({config.drain.timeout:g}s)",
        )
    evidence = config.drain.propagation_mode == "evidence"
    if evidence and config.drain.propagation_min > config.drain.propagation:
        raise ConfigError(
            "drain.propagation_min",
            config.drain.propagation_min,
            f"must not exceed drain.propagation ({config.drain.propagation:g}s)",
        )
    terms = config.shutdown_budget()
    total = sum(seconds for _, seconds in terms)
    if total > config.termination_grace_period:
        shown = " + ".join(f"{name} {seconds:g}s" for name, seconds in terms)
        raise ConfigError(
            "termination_grace_period",
            config.termination_grace_period,
            f"is shorter than the shutdown needs: {shown} = {total:g}s; raise it to at least "
            f"{total:g}s (and terminationGracePeriodSeconds in the pod spec) or shorten the drain",
        )


def load_config(path: str | Path | None) -> Config:
    """Load a YAML file, or the embedded defaults when ``path`` is None."""
    if path is None:
        from importlib import resources  # 1 MiB (tempfile, shutil, random) only when used

        text = resources.files("drainproxy").joinpath("default.yaml").read_text()
        source = "<embedded defaults>"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError("config", str(path), f"cannot be read: {exc.strerror}") from None
        source = str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", source, f"is not valid YAML: {exc}") from None
    return config_from_mapping(raw if raw is not None else {})
