"""The broker's Role grants exactly what the Kubernetes provider uses, in its namespace only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from test_chart_provider_rbac import granted

from aldaas.pool.providers.kubernetes._client import RBAC_RULES

Render = Callable[[dict[str, Any] | None], Any]


def test_if_the_role_is_rendered_then_it_grants_exactly_what_the_provider_uses(
    render: Render,
) -> None:
    """If the chart renders its Role, then its (apiGroup, resource, verb) set equals the
    provider's RBAC_RULES (which tests/k8s/test_k8s_rbac.py proves are exactly the calls made),
    the Lease verbs other than create are limited to the one named Lease, whichever Secrets
    the values name (Secrets: only the verbs per-clone credentials need, never patch)."""
    for values in (None, {"existingSecret": "tokens", "s3": {"existingSecret": "backups-s3"}}):
        role = render(values).get("Role")
        assert role["metadata"]["namespace"] == "aldaas"
        assert granted(role) == {(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs}
        named = [rule for rule in role["rules"] if "resourceNames" in rule]
        assert named == [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": ["demo-aldaas-leader"],
                "verbs": ["get", "patch"],
            }
        ]


def test_if_the_role_is_rendered_then_nothing_is_granted_by_wildcard(render: Render) -> None:
    """If any value set renders the Role, then no rule uses `*` (the original granted `*`)."""
    rendered = render({"existingSecret": "tokens", "s3": {"existingSecret": "s3"}})
    for rule in rendered.get("Role")["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field]
    assert not rendered.has("ClusterRole")


def test_if_the_binding_is_rendered_then_it_binds_the_role_to_the_broker_account(
    render: Render,
) -> None:
    """If the chart renders, then the RoleBinding ties the Role to the Deployment's account."""
    rendered = render(None)
    binding = rendered.get("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "demo-aldaas",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "demo-aldaas", "namespace": "aldaas"}
    ]
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "demo-aldaas"


def test_if_rbac_and_account_are_disabled_then_an_existing_account_is_used(
    render: Render,
) -> None:
    """If rbac and serviceAccount creation are off, then the named account runs the broker."""
    rendered = render(
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "platform-sa"}}
    )
    assert not rendered.has("Role")
    assert not rendered.has("RoleBinding")
    assert not rendered.has("ServiceAccount")
    pod = rendered.get("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-sa"
