"""Client options: flags over the original client's ALDAAS_* environment over defaults."""

from __future__ import annotations

import pathlib

import pytest

from aldaas.client._options import ClientError, resolve, resolve_url

STATE = pathlib.Path("/state")


@pytest.mark.parametrize(
    ("server", "protocol", "url"),
    [
        ("db.example.com", None, "wss://db.example.com/tunnel"),
        ("db.example.com:8443", "wss", "wss://db.example.com:8443/tunnel"),
        ("127.0.0.1:8765", "ws", "ws://127.0.0.1:8765/tunnel"),
        ("ws://127.0.0.1:8765", None, "ws://127.0.0.1:8765/tunnel"),
        ("https://db.example.com/aldaas/tunnel", None, "wss://db.example.com/aldaas/tunnel"),
        ("http://h:80/", "ws", "ws://h:80/tunnel"),
    ],
)
def test_if_a_server_is_given_then_it_becomes_the_gateway_url(
    server: str, protocol: str | None, url: str
) -> None:
    """If a server is given bare or as a URL, then the gateway URL has a ws scheme and a path."""
    assert resolve_url(server, protocol) == url


@pytest.mark.parametrize(
    ("server", "protocol", "needle"),
    [
        ("h", "tcp", "ALDAAS_PROTOCOL must be ws or wss, got 'tcp'"),
        ("ftp://h", None, "has scheme 'ftp'"),
        ("ws://h", "wss", "says ws but ALDAAS_PROTOCOL says wss"),
        ("h:port", None, "has an invalid port"),
        ("ws://:80", None, "names no host"),
    ],
)
def test_if_a_server_is_malformed_then_one_sentence_names_it(
    server: str, protocol: str | None, needle: str
) -> None:
    """If the server or protocol is malformed, then the error is one sentence naming the value."""
    with pytest.raises(ClientError) as info:
        resolve_url(server, protocol)
    assert needle in str(info.value)
    assert str(info.value).endswith(".")


def test_if_only_the_environment_is_set_then_it_is_honoured() -> None:
    """If only the original client's variables are set, then every one of them is used."""
    env = {
        "ALDAAS_SERVER": "db.example.com",
        "ALDAAS_TOKEN": "t0k",
        "ALDAAS_PORT": "6543",
        "ALDAAS_TTL": "600",
        "ALDAAS_NAME": "ci",
        "ALDAAS_PROTOCOL": "ws",
    }
    o = resolve(environ=env, state_dir=STATE)
    assert (o.url, o.token, o.port, o.ttl, o.name) == (
        "ws://db.example.com/tunnel",
        "t0k",
        6543,
        600.0,
        "ci",
    )
    assert o.server == "ws://db.example.com"
    assert o.listen == "127.0.0.1"
    assert resolve(environ={**env, "ALDAAS_LISTEN": "0.0.0.0"}, state_dir=STATE).listen == "0.0.0.0"
    assert "t0k" not in repr(o)


def test_if_flags_and_environment_disagree_then_flags_win() -> None:
    """If a flag and its variable are both set, then the flag wins; unset ones get defaults."""
    env = {"ALDAAS_SERVER": "a", "ALDAAS_PORT": "1", "ALDAAS_NAME": "env"}
    o = resolve(environ=env, state_dir=STATE, server="ws://b:1", port=0, name="flag")
    assert (o.url, o.port, o.name, o.ttl, o.token) == ("ws://b:1/tunnel", 0, "flag", None, None)
    assert resolve(environ={"ALDAAS_SERVER": "a"}, state_dir=STATE).port == 5432


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "No server is set; pass --server HOST[:PORT] or set ALDAAS_SERVER."),
        ({"ALDAAS_SERVER": "a", "ALDAAS_PORT": "http"}, "got 'http'"),
        ({"ALDAAS_SERVER": "a", "ALDAAS_PORT": "70000"}, "got '70000'"),
        ({"ALDAAS_SERVER": "a", "ALDAAS_TTL": "-5"}, "TTL must be a positive number"),
        ({"ALDAAS_SERVER": "a", "ALDAAS_TTL": "soon"}, "got 'soon'"),
        ({"ALDAAS_SERVER": "a", "ALDAAS_CA_FILE": "/nonexistent/ca.pem"}, "does not exist"),
    ],
)
def test_if_a_value_is_bad_then_the_error_says_which_and_exits_2(
    env: dict[str, str], needle: str
) -> None:
    """If a setting is missing or malformed, then one sentence names it and the exit code is 2."""
    with pytest.raises(ClientError) as info:
        resolve(environ=env, state_dir=STATE)
    assert needle in str(info.value)
    assert info.value.exit_code == 2
