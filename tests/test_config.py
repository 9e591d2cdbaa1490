"""Bad configs are refused with the dotted field, the value and the rule, and a non-zero exit:
by ``drainproxy check`` (the table runs the real entry point in-process, for speed; the last
tests run it as a process) and by ``drainproxy serve``, which must not print a traceback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
import yaml
from aiohttp import web

from drainproxy.cli import EXIT_CONFIG, main
from drainproxy.config.schema import (
    PLACEHOLDER_TOKEN,
    Address,
    Config,
    ConfigReport,
    DrainConfig,
    Duration,
    ForwardedConfig,
    ProberRule,
    UpstreamConfig,
    UpstreamTLSConfig,
    _duration,
    _optional,
    _Reading,
    _string,
    config_from_mapping,
    default_file_text,
    format_duration,
    items,
    key,
    load_config,
    one_of,
    optional_section,
    parse_address,
    parse_size,
    parse_yaml_stream,
    read_config,
    read_config_text,
    required_key,
    section,
    shown_value,
)
from drainproxy.control.appcheck import ReachabilityLog
from drainproxy.errors import ConfigError, ConfigErrors
from tests.conftest import StartApp, StartProxy
from tests.support import REPO, ProxyProcess, base_config, deep_merge, free_port

APP = {"upstream": "http://127.0.0.1:8000"}
APP_TEXT = "upstream: http://127.0.0.1:8000\n"


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    files = {
        "cert": directory / "tls.crt",
        "key": directory / "tls.key",
        "ca": directory / "ca.crt",
        "garbage": directory / "garbage.pem",
    }
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    files["garbage"].write_text("not a certificate\n")
    return {name: str(path) for name, path in files.items()}


# Each case: the YAML (with {cert}, {key}, {ca}, {garbage} filled in), then the text the error
# must contain: the dotted field with the bad value, and the rule.
BAD_CONFIGS = [
    ("listen: 8080", "listen: 8080 must be host:port"),
    # An unclosed or unbracketed IPv6 address: refused here, not at bind time.
    ("listen: '[::1'", "listen: '[::1' must be host:port"),
    ("listen: '::1:8080'", "listen: '::1:8080' must be host:port"),
    ("admin: {listen: '[]:9901'}", "admin.listen: '[]:9901' must be host:port"),
    # A bracket left open or doubled, on either side, inside or outside the brackets.
    ("listen: '[::1:8080'", "listen: '[::1:8080' must be host:port"),
    ("listen: '[[::1]:8080'", "listen: '[[::1]:8080' must be host:port"),
    ("listen: '[::1]]:8080'", "listen: '[::1]]:8080' must be host:port"),
    ("listen: 'a]b:8080'", "listen: 'a]b:8080' must be host:port"),
    ("listen: 'a[b:8080'", "listen: 'a[b:8080' must be host:port"),
    ("listen: '0.0.0.0:99999'", "listen: '0.0.0.0:99999' port must be a number from 1 to 65535"),
    ("listn: ':8080'", "listn: ':8080' is not a known key (known here:"),
    (
        "upstream: ftp://127.0.0.1:21",
        "upstream.url: 'ftp://127.0.0.1:21' must be an http:// or https://host:port URL",
    ),
    ("upstream: {connect_timeout: 5s}", "upstream.url: None is required"),
    ("upstream: http://127.0.0.1:8000/app", "with no path"),
    # urlsplit raises on an unclosed IPv6 literal: a message, never a traceback.
    (
        "upstream: 'http://[::1:8000'",
        "upstream.url: 'http://[::1:8000' must be an http:// or https://host:port URL",
    ),
    (
        "app: {stop: http, url: 'http://[::1/quit'}",
        "app.url: 'http://[::1/quit' must be an http:// or https:// URL",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', connect_timeout: fast}",
        "upstream.connect_timeout: 'fast' must be a duration such as 5s, 500ms or 1m",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', response_timeout: -1}",
        "upstream.response_timeout: -1 must not be negative",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', max_idle_connections: lots}",
        "upstream.max_idle_connections: 'lots' must be a whole number",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', keepalive: 5}",
        "upstream.keepalive: 5 is not a known key",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', check: {kind: udp}}",
        "upstream.check.kind: 'udp' must be one of tcp, http",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', check: {path: health}}",
        "upstream.check.path: 'health' must start with /",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', tls: {verify: false}}",
        "upstream.tls: {'verify': False} needs an https:// upstream.url",
    ),
    (
        "upstream: {url: 'https://127.0.0.1:8443', tls: {ca_file: /nonexistent/ca.crt}}",
        "upstream.tls.ca_file: '/nonexistent/ca.crt' cannot be read: No such file or directory",
    ),
    (
        "upstream: {url: 'https://127.0.0.1:8443', tls: {ca_file: '{garbage}'}}",
        "upstream.tls.ca_file: '{garbage}' cannot be loaded",
    ),
    (
        "upstream: {url: 'https://127.0.0.1:8443', tls: {cert_file: '{cert}'}}",
        "upstream.tls.cert_file: '{cert}' and upstream.tls.key_file go together",
    ),
    ("forwarded: {x_forwarded_for: overwrite}", "must be one of append, off"),
    (
        "forwarded: {x_forwarded_proto: keep}",
        "forwarded.x_forwarded_proto: 'keep' must be one of preserve, overwrite, off",
    ),
    ("admin: {listen: '0.0.0.0:8080'}", "admin.listen: '0.0.0.0:8080' must differ from listen"),
    (
        "admin: {listen: '127.0.0.1:8080'}",
        "admin.listen: '127.0.0.1:8080' must differ from listen (0.0.0.0:8080): a wildcard",
    ),
    (
        "{listen: '127.0.0.1:9901', upstream: 'http://127.0.0.1:8000'}",
        "admin.listen: '0.0.0.0:9901' must differ from listen (127.0.0.1:9901): a wildcard",
    ),
    ("admin: {listen: '[::]:8080'}", "admin.listen: '[::]:8080' must differ from listen"),
    ("drain: {timeout: 1 minute}", "drain.timeout: '1 minute' must be a duration"),
    ("drain: {min: 25s, timeout: 20s}", "drain.min: 25s must not exceed drain.timeout (20s)"),
    ("termination_grace_period: 10s", "termination_grace_period: 10s is shorter than"),
    ("log: {level: verbose}", "log.level: 'verbose' must be one of debug, info, warning, error"),
    ("timeouts: {request_head: soon}", "timeouts.request_head: 'soon' must be a duration"),
    ("timeouts: {client_idle: true}", "timeouts.client_idle: True must be a duration"),
    ("timeouts: {head: 5s}", "timeouts.head: '5s' is not a known key"),
    ("limits: {max_header_bytes: 10 KB}", "limits.max_header_bytes: '10 KB' must be a size"),
    ("limits: {max_request_line: 0}", "limits.max_request_line: 0 must be at least 1 byte"),
    ("limits: {max_headers: 0}", "limits.max_headers: 0 must be a whole number, 1 or more"),
    (
        "limits: {max_response_header_bytes: lots}",
        "limits.max_response_header_bytes: 'lots' must be a size",
    ),
    ("limits: {max_connections: many}", "limits.max_connections: 'many' must be a whole number"),
    (
        "tls: {cert_file: /nonexistent/tls.crt, key_file: '{key}'}",
        "tls.cert_file: '/nonexistent/tls.crt' cannot be read: No such file or directory",
    ),
    ("tls: {key_file: '{key}'}", "tls.cert_file: None is required when tls is set"),
    (
        "tls: {cert_file: '{garbage}', key_file: '{key}'}",
        "tls.cert_file: '{garbage}' cannot be loaded with tls.key_file",
    ),
    (
        "tls: {cert_file: '{cert}', key_file: '{key}', client_cert: required}",
        "tls.client_cert: 'required' must be optional or required exactly when "
        "tls.client_ca_file is set",
    ),
    (
        "tls: {cert_file: '{cert}', key_file: '{key}', reload_interval: 0}",
        "tls.reload_interval: 0s must be more than 0",
    ),
    ("- just\n- a list", "config: ['just', 'a list'] must be a mapping of keys to values"),
    ("listen: [", "is not valid YAML: line 1, column 10: expected the node content"),
    # issue 15: durations as Kubernetes writes them, and nothing absurd
    ("drain: {timeout: .inf}", "drain.timeout: inf must be a finite duration"),
    ("drain: {timeout: .nan}", "drain.timeout: nan must be a finite duration"),
    ("drain: {timeout: 1.0e+6}", "drain.timeout: 1000000.0 must be at most 24h"),
    ("drain: {timeout: 25h}", "drain.timeout: '25h' must be at most 24h"),
    ("drain: {timeout: 1m30}", "drain.timeout: '1m30' must be a duration such as"),
    ("drain: {timeout: -5s}", "drain.timeout: '-5s' must be a duration such as"),
    ("drain: {timeout: 5 minutes}", "drain.timeout: '5 minutes' must be a duration"),
    ("limits: {max_body_bytes: 2TiB}", "limits.max_body_bytes: '2TiB' must be at most 1TiB"),
    ("limits: {max_headers: 1000000000}", "limits.max_headers: 1000000000 must be at most"),
    ("limits: {max_connections: .inf}", "limits.max_connections: inf must be a whole number"),
    # issue 15: YAML pitfalls
    ("listen: ':8080'\nlisten: ':8081'", "duplicate key 'listen' (first at line 1)"),
    ("drain:\n  timeout: 5s\n  timeout: 6s", "line 3, column 3: duplicate key 'timeout'"),
    ("# only a comment\n", "is empty (only comments or nothing)"),
    ("", "is empty (only comments or nothing)"),
    (
        "upstream: ${APP_URL}",
        "upstream: '${APP_URL}' holds ${APP_URL}, but drainproxy reads its config literally",
    ),
    ("admin: {token: '${DRAINPROXY_TOKEN}'}", "admin.token: <hidden> holds ${DRAINPROXY_TOKEN}"),
    ("admin: {token: 12345}", "admin.token: <hidden> must be a non-empty string"),
    ("admin: {token: $(ADMIN_TOKEN)}", "admin.token: <hidden> holds $(ADMIN_TOKEN), but"),
    # issue 15: an upstream that is drainproxy itself
    (
        "upstream: http://127.0.0.1:8080",
        "upstream.url: 'http://127.0.0.1:8080' is drainproxy's own listen (0.0.0.0:8080): it "
        "would proxy to itself",
    ),
    (
        "upstream: http://localhost:9901",
        "upstream.url: 'http://localhost:9901' is drainproxy's own admin.listen (0.0.0.0:9901)",
    ),
    (
        "listen: 127.0.0.1:8080\nupstream: http://127.0.0.1:8080",
        "is drainproxy's own listen (127.0.0.1:8080)",
    ),
    (
        "listen: '[::]:8080'\nupstream: 'http://[::1]:8080'",
        "upstream.url: 'http://[::1]:8080' is drainproxy's own listen ([::]:8080)",
    ),
    ("listen: ':0'", "listen: ':0' port must be a number from 1 to 65535"),
    ("app: {signal: SIGFOO}", "app.signal: 'SIGFOO' must be a signal name such as SIGTERM"),
    (
        "app: {stop: http, url: 'ftp://127.0.0.1/quit'}",
        "app.url: 'ftp://127.0.0.1/quit' must be an",
    ),
    ("app: {stop: exec, command: []}", "app.command: [] must be a non-empty list of strings"),
    ("app: {stop: http}", "app.stop: 'http' needs app.url (the URL to call)"),
    ("app: {stop: exec}", "app.stop: 'exec' needs app.command (an argv list to run)"),
    (
        "upstream: {url: 'http://127.0.0.1:8000', check: {interval: 0s}}",
        "upstream.check.interval: 0s must be more than 0",
    ),
    (
        "listen: 127.0.0.1:8080\nupstream: http://localhost:8080",
        "upstream.url: 'http://localhost:8080' is drainproxy's own listen (127.0.0.1:8080)",
    ),
    # issue 17: the rules a mutant may remove
    (
        "drain: {propagation_mode: evidence, propagation: 3s, propagation_min: 3500ms}",
        "drain.propagation_min: 3500ms must not exceed drain.propagation (3s)",
    ),
    (
        "drain: {probers: [{user_agent: '^kube-probe/'}]}",
        "drain.probers[0].failure_threshold: None is required",
    ),
    (
        "drain: {probers: [{failure_threshold: 2}]}",
        "drain.probers[0]: {'failure_threshold': 2} needs an address or a user_agent",
    ),
    (
        "drain: {probers: {address: 10.0.0.5}}",
        "drain.probers: {'address': '10.0.0.5'} must be a list",
    ),
    ("tls: {cert_file: '{cert}'}", "tls.key_file: None is required when tls is set"),
    (
        "upstream: {url: 'https://127.0.0.1:8443', tls: {key_file: '{key}'}}",
        "upstream.tls.key_file: '{key}' and upstream.tls.cert_file go together",
    ),
    # A value of the wrong type is refused with its key named, never converted: YAML 1.2's
    # booleans (yes/on are words, not true), and no 1.1 sexagesimal, octal or date readings.
    ("log: {access_log: yes}", "log.access_log: 'yes' must be true or false"),
    ("log: {access_log: 'true'}", "log.access_log: 'true' must be true or false"),
    ("log: {access_log: 1}", "log.access_log: 1 must be true or false"),
    ("app: {stop: signal, process: x, kill_after_timeout: on}", "kill_after_timeout: 'on' must"),
    ("drain: {timeout: on}", "drain.timeout: 'on' must be a duration such as"),
    ("drain: {timeout: 1:30}", "drain.timeout: '1:30' must be a duration such as"),
    ("drain: {timeout: 2024-01-01}", "drain.timeout: '2024-01-01' must be a duration such as"),
    ("drain: {timeout: [5s]}", "drain.timeout: ['5s'] must be a duration such as"),
    ("limits: {max_headers: '100'}", "limits.max_headers: '100' must be a whole number, 1 or"),
    ("limits: {max_headers: 100.0}", "limits.max_headers: 100.0 must be a whole number, 1 or"),
    ("limits: {max_headers: yes}", "limits.max_headers: 'yes' must be a whole number, 1 or"),
    ("limits: {max_body_bytes: 1_000}", "limits.max_body_bytes: '1_000' must be a size in"),
    ("admin: {listen: 9901}", "admin.listen: 9901 must be host:port"),
    ("drain: [timeout, 5s]", "drain: ['timeout', '5s'] must be a mapping of keys to values"),
    ("drain: 5s", "drain: '5s' must be a mapping of keys to values"),
    ("tls: true", "tls: True must be a mapping of keys to values"),
    ("tls: yes", "tls: 'yes' must be a mapping of keys to values"),
    (
        "upstream: {url: 'http://127.0.0.1:8000', check: [tcp]}",
        "upstream.check: ['tcp'] must be a mapping of keys to values",
    ),
    ("drain: {probers: [10.0.0.5]}", "drain.probers[0]: '10.0.0.5' must be a mapping of keys"),
    ("upstream: [http://127.0.0.1:8000]", "upstream.url: ['http://127.0.0.1:8000'] must be an"),
    ("listen: !!int abc", "is not valid YAML: line 1, column 9: 'abc' is not a valid !!int"),
    ("listen: !!timestamp 1", "is not valid YAML: line 1, column 9: '1' is not a valid !!time"),
    (
        "tls: {cert_file: '{cert}', key_file: '{key}', client_ca_file: '{garbage}', "
        "client_cert: optional}",
        "tls.client_ca_file: '{garbage}' cannot be loaded: ",
    ),
    (
        "upstream: {url: 'https://127.0.0.1:8443', "
        "tls: {cert_file: '{garbage}', key_file: '{key}'}}",
        "upstream.tls.cert_file: '{garbage}' cannot be loaded with upstream.tls.key_file: ",
    ),
    # Unknown keys at every depth, named with their path.
    (
        "drain: {probers: [{address: 10.0.0.5, failure_threshold: 2, treshold: 1}]}",
        "drain.probers[0].treshold: 1 is not a known key (known here: address, "
        "failure_threshold, user_agent)",
    ),
    (
        "upstream: {url: 'http://127.0.0.1:8000', check: {kind: tcp, port: 81}}",
        "upstream.check.port: 81 is not a known key (known here: interval, kind, path, timeout)",
    ),
    (
        "tls: {cert_file: '{cert}', key_file: '{key}', ca_file: '{ca}'}",
        "tls.ca_file: '{ca}' is not a known key (known here: cert_file, client_ca_file, "
        "client_cert, key_file, reload_interval)",
    ),
    ("1: 2", "1: 2 is not a known key (known here: admin, app, drain, forwarded, limits,"),
]


def fill(text: str, files: dict[str, str]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", path)
    return text


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[c[1][:40] for c in BAD_CONFIGS])
def test_check_names_field_value_and_rule(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cert_files: dict[str, str],
    text: str,
    message: str,
) -> None:
    path = tmp_path / "bad.yaml"
    body = fill(text, cert_files)
    if "upstream" not in body and not body.startswith(("-", "listen: [", "#")) and body:
        body += "\nupstream: http://127.0.0.1:8000\n"
    path.write_text(body)
    assert main(["check", "--config", str(path)]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: error DP001 config-invalid: ")
    assert fill(message, cert_files) in out


MISSING_URL = "upstream.url: None is required (the app's http://host:port)"


@pytest.mark.parametrize(
    "text", ["{}\n", "listen: ':9000'\n", "drain: {timeout: 5s}\n", "upstream: {}\n", "upstream:\n"]
)
def test_a_file_without_upstream_url_names_it_as_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """A file is refused when it does not say where the app is, as an empty one is: only a run
    without --config falls back to the default upstream."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == EXIT_CONFIG
    (finding, verdict) = capsys.readouterr().out.splitlines()
    assert finding.startswith(f"{path}: error DP001 config-invalid: {MISSING_URL}; fix: ")
    assert verdict == f"{path}: 1 error(s), 0 warning(s)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}\n", MISSING_URL),
        (
            APP_TEXT + "log: {access_log: yes}\nforwarded: {x_forwarded_for: no}\n",
            "log.access_log: 'yes' must be true or false",
        ),
    ],
)
def test_serve_refuses_a_file_without_upstream_or_with_a_wrong_type(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.splitlines()[0] == f"drainproxy: config error: {message}"
    assert "Traceback" not in result.stderr


def test_yaml_1_2_words_and_numbers_are_read_as_written() -> None:
    """``off`` is a value of x_forwarded_*, not false; only true/false are booleans; 1.2's
    integers (010 is ten, 0o and 0x prefixes) and floats (1e1) are numbers."""
    config = read(
        "upstream: http://127.0.0.1:8000\n"
        "forwarded: {x_forwarded_for: off, x_forwarded_proto: off, x_forwarded_host: off}\n"
        "admin: {token: no}\nlog: {access_log: True}\ndrain: {timeout: 1e1, idle_grace: .5}\n"
        "limits: {max_headers: 010, max_concurrent_streams: 0o17, max_request_line: 0x1F}\n"
    )
    assert config.errors == ()
    loaded = config.config
    assert loaded.forwarded == ForwardedConfig("off", "off", "off")
    assert (loaded.admin.token, loaded.log.access_log) == ("no", True)
    assert (loaded.drain.timeout, loaded.drain.idle_grace) == (10.0, 0.5)
    limits = loaded.limits
    assert (limits.max_headers, limits.max_concurrent_streams, limits.max_request_line) == (
        10,
        15,
        31,
    )
    assert read(APP_TEXT + "log: {access_log: FALSE}\n").checked().log.access_log is False
    assert read(APP_TEXT + "limits: {max_headers: -0x1}\n").errors  # not an integer: a word


def test_good_config_with_every_new_section(tmp_path: Path, cert_files: dict[str, str]) -> None:
    config = {
        "listen": "127.0.0.1:8443",
        "upstream": {"url": "https://app.internal:8443", "tls": {"ca_file": cert_files["ca"]}},
        "timeouts": {"request_head": "2s", "client_idle": 0, "client_body": "500ms"},
        "limits": {
            "max_request_line": "4KiB",
            "max_header_bytes": 16384,
            "max_headers": 50,
            "max_response_header_bytes": "128KiB",
            "max_body_bytes": "1MiB",
            "max_connections": 100,
        },
        "tls": {
            "cert_file": cert_files["cert"],
            "key_file": cert_files["key"],
            "client_ca_file": cert_files["ca"],
            "client_cert": "optional",
        },
    }
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    assert loaded.upstream.port == 8443
    assert loaded.upstream.tls is not None and loaded.upstream.tls.ca_file == cert_files["ca"]
    assert (loaded.timeouts.request_head, loaded.timeouts.client_idle) == (2.0, 0.0)
    assert (loaded.limits.max_request_line, loaded.limits.max_body_bytes) == (4096, 1 << 20)
    assert loaded.limits.max_response_header_bytes == 128 << 10
    assert loaded.tls is not None and loaded.tls.client_cert == "optional"


def test_default_files_are_identical_and_valid() -> None:
    shipped = (REPO / "config" / "drainproxy.yaml").read_text()
    embedded = (REPO / "drainproxy" / "config" / "default.yaml").read_text()
    assert shipped == embedded
    assert load_config(REPO / "config" / "drainproxy.yaml") == load_config(None)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drainproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


def test_check_as_a_process(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("upstream: http://127.0.0.1:8000\n")
    result = run_cli("check", "--config", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: http://127.0.0.1:8000\nlimits: {max_headers: none}\n")
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == EXIT_CONFIG
    assert "limits.max_headers: 'none' must be a whole number, 1 or more" in result.stdout


@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_config_file_that_is_not_utf8_is_named_without_a_traceback(
    command: str, tmp_path: Path
) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("upstream: http://127.0.0.1:8000 # caf\xe9\n".encode("latin-1"))
    result = run_cli(command, "--config", str(path))
    assert result.returncode == EXIT_CONFIG
    assert f"'{path}' is not UTF-8 text" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_manifest_that_is_not_utf8_is_named_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "drainproxy.yaml"
    config.write_text("upstream: http://127.0.0.1:8000\n")
    manifest = tmp_path / "pod.yaml"
    manifest.write_bytes("kind: Pod # caf\xe9\n".encode("latin-1"))
    result = run_cli("check", "--config", str(config), "--manifest", str(manifest))
    assert result.returncode == EXIT_CONFIG
    assert f"{manifest}: is not UTF-8 text" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_exits_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: http://127.0.0.1:8000\ntimeouts: {client_body: forever}\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == EXIT_CONFIG
    assert "timeouts.client_body: 'forever' must be a duration" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- issue 15 item 5 and issue 13 item 4 ------------------------------------------------------


def read(text: str) -> ConfigReport:
    return read_config_text(text, "test.yaml")


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("1m30s", 90.0),
        ("1h2m3.5s", 3723.5),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2m0.25s", 120.25),
        ("1500us", 0.0015),
        ("0", 0.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_durations_as_kubernetes_writes_them_and_shown_as_written(
    written: object, seconds: float
) -> None:
    """Go's time.ParseDuration syntax; the value keeps its spelling for every message."""
    config = read(f"upstream: http://127.0.0.1:8000\ndrain: {{idle_grace: {written}}}\n").checked()
    assert config.drain.idle_grace == pytest.approx(seconds)
    shown = written if isinstance(written, str) and written != "0" else format_duration(seconds)
    assert repr(config.drain.idle_grace) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1, "1s"),
        (30, "30s"),
        (90, "1m30s"),
        (3723.5, "1h2m3.5s"),
        (1e6, "277h46m40s"),
    ],
)
def test_computed_durations_print_like_go(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_every_error_of_a_file_is_reported_at_once() -> None:
    text = (
        "listen: nowhere\nupstream: {url: 'http://127.0.0.1:8000', connect_timeout: soon}\n"
        "drain: {timeout: 5s, propagation: 1h, extra: 1}\nlog: {level: loud}\n"
    )
    with pytest.raises(ConfigErrors) as raised:
        read(text).checked()
    assert [error.field for error in raised.value.errors] == [
        "listen",
        "upstream.connect_timeout",
        "drain.extra",
        "log.level",
    ]
    # The cross-field budget is judged only once every field reads: 1h would be noise here.
    assert "termination_grace_period" not in str(raised.value)


def test_a_bad_value_leaves_its_default_for_the_rest_of_the_check() -> None:
    report = read("upstream: http://127.0.0.1:9000\ndrain: {timeout: soon, propagation: 2s}\n")
    assert [error.field for error in report.errors] == ["drain.timeout"]
    assert (report.config.upstream.port, report.config.drain.propagation) == (9000, 2.0)
    assert report.config.drain.timeout == DrainConfig().timeout


def test_propagation_min_up_to_propagation_is_accepted_and_ignored_in_fixed_mode() -> None:
    evidence = "drain: {propagation_mode: evidence, propagation: 3s, propagation_min: 3s}\n"
    assert read("upstream: http://127.0.0.1:8000\n" + evidence).checked().drain.propagation_min == 3
    fixed = "drain: {propagation_mode: fixed, propagation: 3s, propagation_min: 4s}\n"
    assert read("upstream: http://127.0.0.1:8000\n" + fixed).checked().drain.propagation_min == 4


def test_prober_rules_match_by_address_or_user_agent_alone() -> None:
    text = (
        "upstream: http://127.0.0.1:8000\ndrain:\n  probers:\n"
        "    - {address: 10.0.0.5, failure_threshold: 2}\n"
        "    - {user_agent: '^kube-probe/', failure_threshold: 1}\n"
    )
    assert read(text).checked().drain.probers == (
        ProberRule(failure_threshold=2, address="10.0.0.5"),
        ProberRule(failure_threshold=1, user_agent="^kube-probe/"),
    )


def test_an_https_upstream_without_tls_verifies_with_the_system_cas() -> None:
    config = read("upstream: https://app.internal:8443\n").checked()
    assert config.upstream.tls == UpstreamTLSConfig()
    assert (config.upstream.host, config.upstream.port) == ("app.internal", 8443)
    assert read("upstream: https://app.internal\n").checked().upstream.port == 443
    assert read("upstream: http://127.0.0.1:8000\n").checked().upstream.tls is None


def test_a_dollar_sign_alone_is_a_value_like_any_other() -> None:
    text = "upstream: http://127.0.0.1:8000\nadmin: {token: 'a$Secret${x'}\n"
    assert read(text).checked().admin.token == "a$Secret${x"


def test_an_upstream_on_another_interface_with_drainproxys_port_is_not_a_loop() -> None:
    config = read("listen: 10.0.0.5:8080\nupstream: http://127.0.0.1:8080\n").checked()
    assert config.upstream.port == config.listen.port


def test_the_placeholder_token_and_a_chosen_response_timeout_warn() -> None:
    report = read(
        f"upstream: {{url: 'http://127.0.0.1:8000', response_timeout: 45s}}\n"
        f"admin: {{token: {PLACEHOLDER_TOKEN}}}\n"
    )
    assert [(w.name, w.field) for w in report.warnings] == [
        ("admin-token-placeholder", "admin.token"),
        ("response-timeout-exceeds-drain", "upstream.response_timeout"),
    ]
    assert PLACEHOLDER_TOKEN not in " ".join(w.message + w.fix for w in report.warnings)
    assert "upstream.response_timeout 45s exceeds drain.timeout 20s" in report.warnings[1].message
    assert read("upstream: http://127.0.0.1:8000\n").warnings == ()
    assert read("upstream: {url: 'http://127.0.0.1:8000', response_timeout: 20s}\n").warnings == ()
    own_placeholder = read("upstream: http://127.0.0.1:8000\nadmin: {token: change-me}\n")
    assert [w.name for w in own_placeholder.warnings] == ["admin-token-placeholder"]
    chosen_drain = read("upstream: http://127.0.0.1:8000\ndrain: {timeout: 10s}\n").warnings
    assert [w.name for w in chosen_drain] == ["response-timeout-exceeds-drain"]


def _schema_keys(cls: type[Any], prefix: str = "") -> list[str]:
    keys = []
    for item in fields(cls):
        if not item.init:
            continue
        dotted = f"{prefix}{item.name}"
        nested = item.metadata.get("section") or item.metadata.get("items")
        keys += [dotted, *(_schema_keys(nested, dotted + ".") if nested else [])]
    return keys


def _documented_keys(text: str) -> set[str]:
    """Every ``key:`` the file writes or shows in a comment, with its section path from the
    indentation (a comment's own indentation counts after its ``#``); flow mappings inside a
    comment (the probers example) count as keys of that list."""
    keys: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = re.match(r"^( *)(?:# ?( *))?([a-z0-9_]+):(?: |$)", line)
        if match is None:  # a comment continuing the last key's flow example
            if stack:
                last = ".".join(name for _, name in stack)
                keys.update(f"{last}.{k}" for k in re.findall(r"[{,] ?([a-z0-9_]+):", line))
            continue
        indent = len(match.group(1)) + len(match.group(2) or "")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(name for _, name in stack), match.group(3)])
        keys.add(dotted)
        stack.append((indent, match.group(3)))
        keys.update(f"{dotted}.{k}" for k in re.findall(r"[{,] ?([a-z0-9_]+):", line))
    return keys


def test_the_commented_default_file_documents_every_key_with_the_schemas_default() -> None:
    """defaults are declared once, in the schema: the shipped default file (embedded and in
    config/) must load to exactly Config() and name every key."""
    text = default_file_text()
    assert text == (REPO / "config" / "drainproxy.yaml").read_text()
    assert load_config(REPO / "config" / "drainproxy.yaml") == Config()
    missing = [key for key in _schema_keys(Config) if key not in _documented_keys(text)]
    assert missing == []


def test_the_key_finder_can_find_a_missing_key() -> None:
    """Proves the documentation test can fail."""
    text = default_file_text().replace("  quiet: 1s\n", "")
    assert "drain.quiet" not in _documented_keys(text)


def test_no_config_file_means_the_schemas_defaults() -> None:
    assert load_config(None) == Config()
    assert read_config(None).warnings == ()


def test_serve_refuses_an_empty_config_file_naming_it(tmp_path: Path) -> None:
    for text in ("", "# everything commented out\n#listen: :8080\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        result = run_cli("serve", "--config", str(empty))
        assert result.returncode == EXIT_CONFIG
        assert result.stderr == (
            f"drainproxy: config error: config: '{empty}' is empty (only comments or nothing): "
            "write at least upstream: http://127.0.0.1:PORT, or leave out --config to run on the "
            "built-in defaults\n"
        )


def test_serve_prints_every_config_error_one_per_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: http://127.0.0.1:8000\ndrain: {timeout: 1d}\nlog: {level: loud}\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.splitlines() == [
        "drainproxy: config error: drain.timeout: '1d' must be a duration such as 5s, 500ms or "
        "1m30s",
        "drainproxy: config error: log.level: 'loud' must be one of debug, info, warning, error",
    ]


@pytest.mark.parametrize("key", ["listen", "admin.listen"])
async def test_a_listener_that_cannot_bind_names_its_key(
    key: str, tmp_path: Path, start_proxy: StartProxy
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        overrides: dict[str, Any] = (
            {"listen": f"127.0.0.1:{port}"}
            if key == "listen"
            else {"admin": {"listen": f"127.0.0.1:{port}"}}
        )
        config = deep_merge(base_config(free_port()), overrides)
        proxy = ProxyProcess(config, tmp_path)
        try:
            assert await proxy.exited() == 1
            assert f"{key}: '127.0.0.1:{port}' cannot be listened on: Address already in use" in (
                proxy.log.text()
            )
            assert "Traceback" not in proxy.log.text()
        finally:
            proxy.stop()


async def test_an_unreachable_app_is_logged_with_its_url(start_proxy: StartProxy) -> None:
    closed = free_port()
    proxy = await start_proxy(closed, {"log": {"format": "json"}}, wait_ready=False)
    line = await proxy.log.wait(r'"app unreachable at http://127\.0\.0\.1:\d+: .*')
    record = json.loads(line.string)
    assert record["level"] == "warning"
    assert (record["event"], record["url"]) == ("app_check", f"http://127.0.0.1:{closed}")
    assert "Connection refused" in record["msg"]
    assert "/ready answers 503 until it answers (a TCP connect every 100ms)" in record["msg"]


def test_an_unreachable_app_is_logged_at_once_then_rate_limited() -> None:
    reports = ReachabilityLog(repeat=30)
    seen = [(t, reports.observe(ok, t)) for t, ok in [(0, False), (1, False), (29, False)]]
    assert seen == [(0, "unreachable"), (1, None), (29, None)]
    assert reports.observe(False, 30) == "still unreachable"
    assert reports.unreachable_for(30) == 30
    assert reports.observe(False, 59) is None
    assert reports.observe(False, 60) == "still unreachable"
    assert reports.observe(True, 61) == "reachable"
    assert reports.observe(True, 200) is None
    assert reports.observe(False, 201) == "unreachable"
    assert ReachabilityLog().observe(True, 0) == "reachable"


async def test_serve_logs_the_configs_warnings_without_the_token(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    port = await start_app(web.Application())
    overrides = {"admin": {"token": PLACEHOLDER_TOKEN}, "log": {"format": "json"}}
    proxy = await start_proxy(port, overrides)
    line = await proxy.log.wait(r'"config: admin\.token is a placeholder.*')
    record = json.loads(line.string)
    assert (record["level"], record["event"], record["field"]) == (
        "warning",
        "config_warning",
        "admin.token",
    )
    assert record["phase"] == "serving"
    assert PLACEHOLDER_TOKEN not in proxy.log.text()


def test_the_bounds_themselves_are_allowed() -> None:
    """Each rule's limit is inclusive: 24h, 1TiB, a million headers, drain.min = drain.timeout."""
    config = read(
        "upstream: http://127.0.0.1:8000\ntermination_grace_period: 24h\n"
        "timeouts: {client_idle: 24h}\n"
        "limits: {max_body_bytes: 1TiB, max_headers: 1000000, max_request_line: 1}\n"
        "drain: {min: 20s, timeout: 20s}\n"
    ).checked()
    assert (config.timeouts.client_idle, config.limits.max_body_bytes) == (86400, 1024**4)
    assert (config.limits.max_headers, config.drain.min) == (1_000_000, 20)
    assert config.limits.max_request_line == 1


def test_each_app_stop_method_with_its_keys_loads() -> None:
    base = "upstream: http://127.0.0.1:8000\n"
    http = read(base + "app: {stop: http, url: 'http://127.0.0.1:8000/quit', method: GET}\n")
    assert (http.checked().app.url, http.checked().app.method) == (
        "http://127.0.0.1:8000/quit",
        "GET",
    )
    run = read(base + "app: {stop: exec, command: [/usr/sbin/nginx, -s, quit]}\n").checked()
    assert run.app.command == ("/usr/sbin/nginx", "-s", "quit")
    kill = read(base + "app: {stop: signal, process: '^nginx: master', signal: SIGQUIT}\n")
    assert (kill.checked().app.process, kill.checked().app.signal) == ("^nginx: master", "SIGQUIT")


# --- issue 17: the schema's parts, each in process ---------------------------------------------


def test_the_bounds_of_connections_windows_ports_and_reload_are_inclusive() -> None:
    config = read(
        APP_TEXT + "listen: ':65535'\nadmin: {listen: ':1'}\n"
        "limits: {max_connections: 100000000, http2_stream_window: 65535, "
        "http2_connection_window: 2147483647}\n"
    ).checked()
    assert (config.listen.port, config.admin.listen.port) == (65535, 1)
    assert config.limits.max_connections == 100_000_000
    assert (config.limits.http2_stream_window, config.limits.http2_connection_window) == (
        65535,
        2**31 - 1,
    )
    assert read(APP_TEXT + "limits: {max_connections: 1}\n").checked().limits.max_connections == 1
    assert (
        read(APP_TEXT + "limits: {max_connections: auto}\n").checked().limits.max_connections
        is None
    )
    assert read(APP_TEXT + "limits: {http2_stream_window: 2GiB}\n").errors


def test_a_reload_interval_under_a_second_is_accepted(cert_files: dict[str, str]) -> None:
    text = f"tls: {{cert_file: '{cert_files['cert']}', key_file: '{cert_files['key']}', "
    config = read(APP_TEXT + text + "reload_interval: 500ms}\n").checked()
    assert config.tls is not None and config.tls.reload_interval == 0.5


def test_listeners_on_other_hosts_or_families_with_one_port_do_not_clash() -> None:
    for listen, admin in [
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "'[::1]:8080'"),
    ]:
        config = read(f"{APP_TEXT}listen: {listen}\nadmin: {{listen: {admin}}}\n").checked()
        assert config.listen.port == config.admin.listen.port == 8080


def test_an_upstream_on_drainproxys_port_of_another_host_is_not_a_loop() -> None:
    config = read("upstream: http://app.internal:8080\n").checked()
    assert (config.upstream.host, config.upstream.port) == ("app.internal", 8080)
    assert read("upstream: http://0.0.0.0:8080\n").errors  # a wildcard reaches the listener


def test_an_http_upstream_without_a_port_is_port_80_and_h2_needs_https() -> None:
    assert read("upstream: http://app.internal\n").checked().upstream.port == 80
    h2 = read("upstream: {url: 'https://app.internal', protocol: h2}\n").checked()
    assert (h2.upstream.protocol, h2.upstream.port) == ("h2", 443)
    stop = read(APP_TEXT + "app: {stop: http, url: 'https://127.0.0.1/quit'}\n").checked()
    assert stop.app.url == "https://127.0.0.1/quit"


def test_a_section_that_fails_leaves_its_defaults_and_errors_silence_warnings() -> None:
    report = read(
        "upstream: {connect_timeout: 5s}\nadmin: {token: change-me}\ndrain: {timeout: 10s}\n"
    )
    assert [error.field for error in report.errors] == ["upstream.url"]
    assert report.config.upstream == UpstreamConfig()
    assert report.warnings == ()  # judged only on a config that loads


def test_reading_goes_on_past_an_unknown_key() -> None:
    report = read(APP_TEXT + "drain: {extra: 1, timeout: soon, quiet: 2s}\n")
    assert [error.field for error in report.errors] == ["drain.extra", "drain.timeout"]
    assert report.config.drain.quiet == 2


def test_a_quoted_zero_is_a_duration() -> None:
    config = read(APP_TEXT + "drain: {idle_grace: '0', close_spread: ' 0 '}\n").checked()
    assert (config.drain.idle_grace, repr(config.drain.idle_grace)) == (0, "0")
    assert config.drain.close_spread == 0


def test_a_duration_keeps_its_spelling_through_pickle() -> None:
    import pickle

    duration = pickle.loads(pickle.dumps(Duration(90.0, "1m30s")))
    assert (float(duration), repr(duration)) == (90.0, "1m30s")
    assert (shown_value(Duration(90.0, "1m30s")), shown_value(Address("::1", 80))) == (
        "1m30s",
        "[::1]:80",
    )
    assert format_duration(60.0001234) == "1m0.000123s"  # microseconds, as Go prints them


def test_addresses_keep_their_host() -> None:
    assert parse_address("listen", "Xhost.example:80") == Address("Xhost.example", 80)
    assert parse_address("listen", ":80") == Address("0.0.0.0", 80)
    assert parse_address("listen", "[::1]:80") == Address("::1", 80)


def test_yaml_merge_keys_merge_and_keys_after_them_are_still_checked() -> None:
    config = read(APP_TEXT + "drain: {<<: {timeout: 5s, quiet: 2s}, timeout: 6s}\n").checked()
    assert (config.drain.timeout, config.drain.quiet) == (6, 2)
    with pytest.raises(ConfigError, match=r"line 2, column 39: duplicate key 'quiet'"):
        read(APP_TEXT + "drain: {<<: {timeout: 5s}, quiet: 1s, quiet: 2s}\n")


def test_a_manifest_stream_is_read_document_by_document_duplicates_refused() -> None:
    assert parse_yaml_stream("a: 1\n---\nb: yes\n") == [{"a": 1}, {"b": True}]
    with pytest.raises(yaml.YAMLError, match="duplicate key 'a'"):
        parse_yaml_stream("a: 1\n---\na: 2\na: 3\n")


def test_a_config_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        read_config(tmp_path / "missing.yaml")
    assert str(raised.value) == (
        f"config: '{tmp_path / 'missing.yaml'}' cannot be read: No such file or directory"
    )
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"upstream: http://127.0.0.1:8000 # caf\xe9\n")
    with pytest.raises(ConfigError) as raised:
        read_config(latin1)
    assert str(raised.value) == f"config: '{latin1}' is not UTF-8 text: invalid continuation byte"
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [")
    with pytest.raises(ConfigError, match=rf"^config: '{re.escape(str(bad))}' is not valid YAML"):
        read_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("upstream: http://127.0.0.1:9000\n")
    assert read_config(good).config.upstream.port == 9000
    assert config_from_mapping({"upstream": "http://127.0.0.1:9000"}).upstream.port == 9000


def test_the_reader_factories_and_declarations_as_called() -> None:
    """The helpers the schema is declared with, called here (the schema itself is built at
    import): each declaration reads, defaults, hides and requires as its class says."""
    choice = one_of(Literal["a", "b"])
    assert choice("k", "b") == "b"
    with pytest.raises(ConfigError) as raised:
        choice("k.x", "c")
    assert str(raised.value) == "k.x: 'c' must be one of a, b"
    maybe_size = _optional(parse_size)
    assert (maybe_size("k", None), maybe_size("k", "1KiB")) == (None, 1024)
    with pytest.raises(ConfigError, match=r"^k: 'big' must be a size"):
        maybe_size("k", "big")
    assert repr(_duration("1m30s")) == "1m30s"
    with pytest.raises(ConfigError, match=r"^default: 'soon' must be a duration"):
        _duration("soon")

    @dataclass(frozen=True)
    class Item:
        name: str = required_key(_string, "(a name)")
        size: int = key(8, parse_size)

    @dataclass(frozen=True)
    class Part:
        url: str = key("x", _string, required="(its url)")
        token: str | None = key(None, _optional(_string), secret=True)

    @dataclass(frozen=True)
    class Whole:
        part: Part = section(Part, shorthand="url", required=True)
        other: Part = section(Part)
        extra: Part | None = optional_section(Part)
        things: tuple[Item, ...] = items(Item, "{name, size}")

    def whole(raw: object) -> tuple[Whole | None, list[str]]:
        reading = _Reading()
        built = reading.section(Whole, "", raw)
        return built, [str(error) for error in reading.errors]

    assert whole({"part": "y", "extra": None, "things": [{"name": "n"}]}) == (
        Whole(Part("y"), Part(), None, (Item("n", 8),)),
        [],
    )
    assert whole({"part": "y"}) == (Whole(Part("y"), Part(), None, ()), [])
    assert whole({"part": {"url": "y", "token": 5}, "extra": {"url": "z"}, "things": 1}) == (
        Whole(Part("y"), Part(), Part("z"), ()),
        [
            "part.token: <hidden> must be a non-empty string",
            "things: 1 must be a list of {name, size}",
        ],
    )
    assert whole({"things": [{"size": 1}, {"name": 5}]})[1] == [
        "things[0].name: None is required (a name)",
        "things[1].name: 5 must be a non-empty string",  # a required key is not a secret
        "part.url: None is required (its url)",
    ]
