"""The HTTP/2 config keys: upstream.protocol and the HTTP/2 limits, each bad value named."""

from __future__ import annotations

from typing import Any

import pytest

from drainproxy.config.schema import config_from_mapping
from drainproxy.errors import ConfigError


def config(**sections: Any) -> dict[str, Any]:
    return {"upstream": {"url": "http://127.0.0.1:8000"}, **sections}


def test_defaults() -> None:
    loaded = config_from_mapping(config())
    assert loaded.upstream.protocol == "http1"
    assert loaded.limits.max_concurrent_streams == 100
    assert loaded.limits.http2_stream_window == 256 * 1024
    assert loaded.limits.http2_connection_window == 1024 * 1024


def test_h2c_and_h2_upstreams() -> None:
    loaded = config_from_mapping({"upstream": {"url": "http://app:50051", "protocol": "h2c"}})
    assert loaded.upstream.protocol == "h2c"
    loaded = config_from_mapping({"upstream": {"url": "https://app:8443", "protocol": "h2"}})
    assert (loaded.upstream.protocol, loaded.upstream.tls is not None) == ("h2", True)


@pytest.mark.parametrize(
    ("raw", "field", "rule"),
    [
        ({"upstream": {"url": "http://a:1", "protocol": "h3"}}, "upstream.protocol", "one of"),
        (
            {"upstream": {"url": "https://a:1", "protocol": "h2c"}},
            "upstream.protocol",
            "needs an http://",
        ),
        (
            {"upstream": {"url": "http://a:1", "protocol": "h2"}},
            "upstream.protocol",
            "needs an https://",
        ),
        (config(limits={"max_concurrent_streams": 0}), "limits.max_concurrent_streams", "1 or"),
        (config(limits={"http2_stream_window": "1KiB"}), "limits.http2_stream_window", "65535"),
        (config(limits={"http2_connection_window": "4GiB"}), "limits.http2_connection_window", ""),
    ],
)
def test_bad_values_name_the_field(raw: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ConfigError) as failure:
        config_from_mapping(raw)
    assert field in str(failure.value)
    assert rule in str(failure.value)
