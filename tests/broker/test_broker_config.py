"""The settings loader: YAML, environment and --set flags into one frozen tree."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
from typing import Literal

import attrs
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from aldaas.broker._config import ConfigError, _build, describe_settings, load_settings
from aldaas.client._logging import configure_logging


@attrs.frozen(kw_only=True)
class PoolPart:
    size: int = 3
    """Warm clones kept ready."""
    ttl: float = 300.0
    """Idle TTL in seconds."""
    method: Literal["auto", "reflink", "copy"] = "auto"
    """How clones are made."""


@attrs.frozen(kw_only=True)
class GatewayPart:
    port: int = 8080
    """Where the gateway listens."""
    token: str = ""
    """Instance token."""
    cert: pathlib.Path | None = None
    """TLS certificate."""
    hosts: tuple[str, ...] = ("127.0.0.1",)
    """Listen addresses."""
    debug: bool = False
    """Verbose."""


@attrs.frozen(kw_only=True)
class Root:
    pool: PoolPart = attrs.field(factory=PoolPart)
    """The warm pool."""
    gateway: GatewayPart = attrs.field(factory=GatewayPart)
    """The gateway."""


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "aldaas.yaml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_given() -> None:
    """If no file, env or flags are given, then every field has its default."""
    assert load_settings(Root) == Root()


def test_precedence_file_then_env_then_flags(tmp_path: pathlib.Path) -> None:
    """If a key is set in file, env and flag, then the flag wins, then env, then file."""
    path = write(tmp_path, "pool:\n  size: 5\n  ttl: 10\ngateway:\n  port: 9000\n")
    settings = load_settings(
        Root,
        path=path,
        environ={"ALDAAS_POOL_TTL": "20", "ALDAAS_GATEWAY_PORT": "9100", "ALDAAS_TOKEN": "x"},
        overrides=["gateway.port=9200", "gateway.hosts=127.0.0.1,::1", "gateway.debug=yes"],
    )
    assert settings.pool == PoolPart(size=5, ttl=20.0)
    assert settings.gateway.port == 9200
    assert settings.gateway.hosts == ("127.0.0.1", "::1")
    assert settings.gateway.debug is True


def test_unknown_key_in_file_names_it_and_suggests(tmp_path: pathlib.Path) -> None:
    """If the file has a misspelt key, then the error names it, the file, and the likely fix."""
    path = write(tmp_path, "pool:\n  sise: 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(Root, path=path)
    assert str(info.value) == (
        "unknown setting pool.sise (in aldaas.yaml); did you mean pool.size? "
        "(known under pool: method, size, ttl)"
    )


def test_bad_value_names_key_value_and_source() -> None:
    """If an env value has the wrong type, then the error names the key, the value and the variable."""
    with pytest.raises(ConfigError) as info:
        load_settings(Root, environ={"ALDAAS_POOL_SIZE": "three"})
    assert str(info.value) == (
        "setting pool.size (from ALDAAS_POOL_SIZE) must be a whole number, got 'three'; "
        "fix it or remove it to use the default"
    )


def test_literal_lists_allowed_values() -> None:
    """If a Literal field gets another value, then the error lists the allowed ones."""
    with pytest.raises(ConfigError, match=r"must be one of 'auto', 'reflink', 'copy', got 'zfs'"):
        load_settings(Root, overrides=["pool.method=zfs"])


def test_secret_values_are_never_echoed(tmp_path: pathlib.Path) -> None:
    """If a secret setting has a bad value, then the error redacts it."""
    path = write(tmp_path, "gateway:\n  token: [hunter2]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(Root, path=path)
    assert "hunter2" not in str(info.value)
    assert "<redacted>" in str(info.value)


def test_unknown_flag_and_malformed_flag() -> None:
    """If --set names no setting or has no '=', then the error says how to write it."""
    with pytest.raises(
        ConfigError, match=r"unknown setting gatway.port \(from --set gatway.port\)"
    ):
        load_settings(Root, overrides=["gatway.port=1"])
    with pytest.raises(ConfigError, match=r"for example --set pool.size=5"):
        load_settings(Root, overrides=["pool.size"])


def test_file_problems_are_one_sentence(tmp_path: pathlib.Path) -> None:
    """If the file is missing, not YAML, or not a mapping, then each gets its own clear error."""
    with pytest.raises(ConfigError, match=r"cannot read the config file .*check the path"):
        load_settings(Root, path=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 2"):
        load_settings(Root, path=write(tmp_path, "pool:\n\tsize: 1\n"))
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections .* got a list"):
        load_settings(Root, path=write(tmp_path, "- 1\n"))


def test_describe_settings_reads_field_docstrings() -> None:
    """If a field has a docstring after it, then the reference shows it with its env name."""
    rows = {row.path: row for row in describe_settings(Root)}
    assert rows["pool.size"].doc == "Warm clones kept ready."
    assert rows["pool.size"].env == "ALDAAS_POOL_SIZE"
    assert rows["pool.size"].default == 3
    assert rows["gateway.cert"].type_name == "Path | null"


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=5),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=6,
        ),
        max_size=4,
    )
)
def test_any_yaml_mapping_loads_or_fails_cleanly(data: dict[str, object]) -> None:
    """If the tree holds arbitrary values, then loading either succeeds or raises ConfigError only."""
    with contextlib.suppress(ConfigError):
        _build(Root, data, "", "in test")


def test_json_logging_redacts_secret_keys() -> None:
    """If a log call carries a token, then the JSON line shows <redacted> instead."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        structlog.get_logger().info("hello", token="s3cr3t", lease_id="L1")
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["token"] == "<redacted>"
    assert line["lease_id"] == "L1"
    assert line["event"] == "hello"


def test_configuration_reference_in_docs_is_current() -> None:
    """If a setting, default or docstring changes, then docs/configuration.md must be regenerated."""
    from aldaas.broker._config import render_reference
    from aldaas.broker._settings import Settings

    doc = pathlib.Path(__file__).parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == render_reference(Settings), (
        "docs/configuration.md is stale; regenerate it with: aldaas settings > docs/configuration.md"
    )


def test_every_setting_has_a_docstring() -> None:
    """If a settings field lacks the docstring after it, then the reference would be empty there."""
    from aldaas.broker._settings import Settings

    missing = [row.path for row in describe_settings(Settings) if not row.doc]
    assert missing == []
