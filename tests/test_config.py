"""Bad configs are refused with the dotted field, the value and the rule, and a non-zero exit:
by ``drainproxy check`` (the table runs the real entry point in-process, for speed; the last
tests run it as a process) and by ``drainproxy serve``, which must not print a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trustme
import yaml

from drainproxy.cli import EXIT_CONFIG, main
from drainproxy.config import load_config
from tests.support import REPO

APP = {"upstream": "http://127.0.0.1:8000"}


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
    ("listen: '0.0.0.0:99999'", "listen: '0.0.0.0:99999' port must be a number from 1 to 65535"),
    ("listn: ':8080'", "listn: ':8080' is not a known key (known here:"),
    ("upstream: ftp://127.0.0.1:21", "upstream.url: 'ftp://127.0.0.1:21' must be an http://"),
    ("upstream: {connect_timeout: 5s}", "upstream.url: None is required"),
    ("upstream: http://127.0.0.1:8000/app", "with no path"),
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
    ("listen: [", "is not valid YAML"),
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
    if "upstream" not in body and not body.startswith(("-", "listen: [")):
        body += "\nupstream: http://127.0.0.1:8000\n"
    path.write_text(body)
    assert main(["check", "--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("drainproxy: config error: ")
    assert fill(message, cert_files) in err


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
    embedded = (REPO / "drainproxy" / "default.yaml").read_text()
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
    assert "limits.max_headers: 'none' must be a whole number, 1 or more" in result.stderr


def test_serve_with_a_bad_config_exits_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: http://127.0.0.1:8000\ntimeouts: {client_body: forever}\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == EXIT_CONFIG
    assert "timeouts.client_body: 'forever' must be a duration" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
