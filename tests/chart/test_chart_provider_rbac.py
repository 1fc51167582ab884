"""The chart's Role grants every call the Kubernetes provider makes (pool._kubernetes.RBAC_RULES)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aldaas.pool.providers.kubernetes._client import RBAC_RULES

Render = Callable[[dict[str, Any] | None], Any]


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the Role allows on at least some object."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_if_the_chart_is_installed_then_its_role_allows_every_provider_call(
    render: Render,
) -> None:
    """If the broker runs with the chart's Role, then no call of the provider is forbidden."""
    role = render(None).get("Role")
    needed = {(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs}
    assert needed - granted(role) == set()
