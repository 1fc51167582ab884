"""The broker's Role grants exactly what the Kubernetes provider uses, in its namespace only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Render = Callable[[dict[str, Any] | None], Any]

ALL_WRITES = ["get", "list", "watch", "create", "update", "patch", "delete"]

BASE_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ALL_WRITES},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ALL_WRITES},
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "list", "create", "patch", "delete"],
    },
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {
        "apiGroups": ["snapshot.storage.k8s.io"],
        "resources": ["volumesnapshots"],
        "verbs": ALL_WRITES,
    },
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["demo-aldaas-leader"],
        "verbs": ["get", "update"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


def test_if_no_existing_secret_is_named_then_the_role_has_exactly_the_base_rules(
    render: Render,
) -> None:
    """If the chart makes its own Secret, then the Role has the provider's rules and no secrets."""
    role = render(None).get("Role")
    assert role["metadata"]["namespace"] == "aldaas"
    assert role["rules"] == BASE_RULES


def test_if_s3_existing_secret_is_named_then_only_that_secret_may_be_read(
    render: Render,
) -> None:
    """If s3.existingSecret is set, then the Role may `get` that one Secret and nothing more."""
    role = render({"s3": {"existingSecret": "backups-s3"}}).get("Role")
    assert role["rules"] == [
        *BASE_RULES,
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["backups-s3"],
            "verbs": ["get"],
        },
    ]


def test_if_both_existing_secrets_are_named_then_both_may_be_read_once_each(
    render: Render,
) -> None:
    """If existingSecret and s3.existingSecret name Secrets, then each is listed once for `get`."""
    same = render({"existingSecret": "shared", "s3": {"existingSecret": "shared"}}).get("Role")
    assert same["rules"][-1]["resourceNames"] == ["shared"]
    both = render({"existingSecret": "tokens", "s3": {"existingSecret": "s3"}}).get("Role")
    assert both["rules"][-1] == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["tokens", "s3"],
        "verbs": ["get"],
    }


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
