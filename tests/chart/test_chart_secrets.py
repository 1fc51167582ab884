"""Passwords and tokens of the database, restore and check steps live in Secrets, not ConfigMaps."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import helm_python
import pytest
import yaml

Render = Callable[[dict[str, Any] | None], Any]

SECRET_WORDS = ("pass", "secret", "token", "credential", "private")


def _secret_like_keys(node: Any) -> list[str]:
    """Every mapping key under ``node`` that holds a secret (POSTGRES_PASSWORD, password).

    Keys ending in ``_secret(s)`` name Secrets (``env_from_secret``, ``image_pull_secrets``), and ``s3_credentials_env``
    maps variable names to keys of such a Secret: references, not secrets.
    """
    if isinstance(node, dict):
        found = [
            k
            for k in node
            if any(w in str(k).lower() for w in SECRET_WORDS)
            and not str(k).endswith(("_secret", "_secrets"))
            and k != "s3_credentials_env"
        ]
        return found + [
            k
            for key, v in node.items()
            if key != "s3_credentials_env"
            for k in _secret_like_keys(v)
        ]
    if isinstance(node, list):
        return [k for v in node for k in _secret_like_keys(v)]
    return []


def _decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


CHECK_ENV = {"check": {"env": [{"name": "PGPASSWORD", "value": "check-pw"}]}}
STATIC = {
    "application": {
        "logins": "static",
        "env": [
            {"name": "POSTGRES_PASSWORD", "value": "app-pw"},
            {"name": "POSTGRES_USER", "value": "app"},
        ],
    },
    "restore": {"env": [{"name": "PGPASSWORD", "value": "app-pw"}]},
}


@pytest.mark.parametrize(
    "values", [None, CHECK_ENV, {**STATIC, **CHECK_ENV}], ids=["defaults", "check-env", "static"]
)
def test_if_the_chart_renders_then_no_configmap_holds_a_password_or_secret(
    render: Render, values: dict[str, Any] | None
) -> None:
    """If the chart renders, then no ConfigMap has a password/secret key or the default password."""
    rendered = render(values)
    configmaps = [m for m in rendered.manifests if m["kind"] == "ConfigMap"]
    assert configmaps
    for configmap in configmaps:
        for text in configmap.get("data", {}).values():
            assert "passw0rd" not in text
            assert "check-pw" not in text
            assert "app-pw" not in text
            assert _secret_like_keys(yaml.safe_load(text)) == []


def test_if_env_has_passwords_then_each_steps_secret_holds_them_and_pods_read_it(
    render: Render,
) -> None:
    """If application/restore env carry passwords, then per-step Secrets hold them for envFrom."""
    rendered = render({**STATIC, **CHECK_ENV})
    assert _decoded(rendered.get("Secret", "demo-aldaas-application")) == {
        "POSTGRES_PASSWORD": "app-pw"
    }
    assert _decoded(rendered.get("Secret", "demo-aldaas-restore")) == {"PGPASSWORD": "app-pw"}
    assert _decoded(rendered.get("Secret", "demo-aldaas-check")) == {"PGPASSWORD": "check-pw"}
    kube = rendered.broker_config()["kubernetes"]
    assert kube["application"]["env_from_secret"] == "demo-aldaas-application"
    assert kube["restore"]["env_from_secret"] == "demo-aldaas-restore"
    assert kube["check"]["env_from_secret"] == "demo-aldaas-check"
    assert "PGPASSWORD" not in kube["check"]["env"]


def test_if_a_session_token_is_given_then_the_s3_secret_holds_it(render: Render) -> None:
    """If s3.sessionToken is set, then the chart's Secret has it as sessiontoken."""
    s3 = {"accesskey": "ASIAEXAMPLE", "secretkey": "sk", "sessionToken": "st-789"}
    secret = _decoded(render({"s3": s3}).get("Secret", "demo-aldaas"))
    assert secret["sessiontoken"] == "st-789"


def test_if_the_chart_is_installed_as_is_then_no_password_is_rendered_anywhere(
    render: Render,
) -> None:
    """If installed with the defaults, then credentials are per-clone: no step Secret, no
    password in any manifest, and the broker reads no database password."""
    rendered = render(None)
    assert rendered.broker_config()["kubernetes"]["application"]["logins"] == "per-clone"
    secrets = {m["metadata"]["name"] for m in rendered.manifests if m["kind"] == "Secret"}
    assert secrets == {"demo-aldaas"}
    for manifest in rendered.manifests:
        text = yaml.safe_dump(manifest)
        assert "passw0rd" not in text
        assert "POSTGRES_PASSWORD" not in text
        assert "PGPASSWORD" not in text


def test_if_the_broker_starts_then_the_database_password_comes_from_the_secret(
    render: Render,
) -> None:
    """If credentials are static and POSTGRES_PASSWORD is a secret entry, then the broker reads
    it from the Secret's key."""
    env = {e["name"]: e for e in render(STATIC).container()["env"]}
    assert env["ALDAAS_KUBERNETES_APPLICATION_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {
            "name": "demo-aldaas-application",
            "key": "POSTGRES_PASSWORD",
            "optional": True,
        }
    }


def test_if_existing_secrets_are_named_then_the_chart_renders_none_and_uses_them(
    render: Render,
) -> None:
    """If each step names an existingSecret, then env_from_secret is it and no step Secret renders."""
    rendered = render(
        {
            "application": {
                "logins": "static",
                "existingSecret": "db-env",
                "env": [{"name": "POSTGRES_USER", "value": "app"}],
            },
            "restore": {"existingSecret": "restore-env", "env": []},
            "check": {"existingSecret": "check-env"},
        }
    )
    names = {m["metadata"]["name"] for m in rendered.manifests if m["kind"] == "Secret"}
    assert names == {"demo-aldaas"}
    kube = rendered.broker_config()["kubernetes"]
    assert kube["application"]["env_from_secret"] == "db-env"
    assert kube["restore"]["env_from_secret"] == "restore-env"
    assert kube["check"]["env_from_secret"] == "check-env"
    env = {e["name"]: e for e in rendered.container()["env"]}
    assert env["ALDAAS_KUBERNETES_APPLICATION_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "db-env"
    )


def test_if_an_existing_secret_and_a_password_entry_are_both_given_then_install_fails(
    render: Render,
) -> None:
    """If application.existingSecret is set and env still has a password, then install says which."""
    with pytest.raises(
        helm_python.HelmError, match=r"application\.env has the secret entry POSTGRES_PASSWORD"
    ):
        render({**STATIC, "application": {**STATIC["application"], "existingSecret": "db-env"}})
