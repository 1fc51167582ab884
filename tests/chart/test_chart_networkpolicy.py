"""The NetworkPolicies select the pods the provider really builds, with its labels."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import helm_python
import pytest
from test_chart_broker_contract import load_broker_settings

from aldaas.pool import Backup, Command, Endpoint, Kind
from aldaas.pool.providers.kubernetes import _manifests as manifests

Render = Callable[[dict[str, Any] | None], Any]

OPERATORS = {
    "In": lambda value, values: value in values,
    "NotIn": lambda value, values: value not in values,
    "Exists": lambda value, values: value is not None,
    "DoesNotExist": lambda value, values: value is None,
}


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) selects ``labels``."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    return all(
        OPERATORS[e["operator"]](labels.get(e["key"]), e.get("values", []))
        for e in selector.get("matchExpressions", [])
    )


def _pods(render: Render, tmp_path: pathlib.Path) -> dict[str, dict[str, str]]:
    """The labels of every pod kind: the broker's (rendered) and the provider's (built)."""
    rendered = render(None)
    settings = load_broker_settings(rendered, tmp_path).kubernetes
    address = Endpoint(host="10.0.0.7", port=5432, user="aldaas", database="app").environ()
    backup = Backup(key="logical/app.sql.gz", etag="e", size=10, modified=0.0)
    restore = manifests.restore_job(settings, "v1", backup, Command(argv=["psql"]), address)
    check = manifests.check_job(settings, "c1", Command(argv=["psql"]), address)
    broker = rendered.get("Deployment")["spec"]["template"]["metadata"]["labels"]
    return {
        "broker": broker,
        "volume": manifests.database_pod(settings, Kind.VOLUME, "v1")["metadata"]["labels"],
        "clone": manifests.database_pod(settings, Kind.CLONE, "c1")["metadata"]["labels"],
        "restore-job": restore["spec"]["template"]["metadata"]["labels"],
        "check-job": check["spec"]["template"]["metadata"]["labels"],
    }


def test_if_installed_then_database_pods_accept_only_the_broker_and_its_jobs(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If the chart is installed, then clone and volume pods admit broker and Job pods alone."""
    policy = render(None).get("NetworkPolicy", "demo-aldaas-databases")
    pods = _pods(render, tmp_path)
    selected = {
        kind for kind, labels in pods.items() if matches(policy["spec"]["podSelector"], labels)
    }
    assert selected == {"volume", "clone"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    admitted = {
        kind
        for kind, labels in pods.items()
        if any(matches(peer["podSelector"], labels) for peer in rule["from"])
    }
    assert admitted == {"broker", "restore-job", "check-job"}
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])


def test_if_another_instance_shares_the_namespace_then_its_jobs_are_not_admitted(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If a second release's Job pod has its own instance label, then this policy refuses it."""
    policy = render(None).get("NetworkPolicy", "demo-aldaas-databases")
    other = {**_pods(render, tmp_path)["check-job"], "aldaas.io/instance": "other-aldaas"}
    (rule,) = policy["spec"]["ingress"]
    assert not any(matches(peer["podSelector"], other) for peer in rule["from"])


def test_if_gateway_sources_are_given_then_only_the_gateway_port_is_limited_to_them(
    render: Render, validate_manifest: Callable[[dict[str, Any]], None]
) -> None:
    """If networkPolicy.gateway.from lists peers, then the gateway rule admits exactly those."""
    peers = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"podSelector": {"matchLabels": {"app": "vpn"}}},
        {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.1.0/24"]}},
    ]
    admin = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    rendered = render({"networkPolicy": {"gateway": {"from": peers}, "admin": {"from": admin}}})
    policy = rendered.get("NetworkPolicy", "demo-aldaas-broker")
    validate_manifest(policy)
    gateway, admin_rule = policy["spec"]["ingress"]
    assert gateway == {"ports": [{"protocol": "TCP", "port": 8080}], "from": peers}
    assert admin_rule == {"ports": [{"protocol": "TCP", "port": 9090}], "from": admin}
    selected = policy["spec"]["podSelector"]
    assert matches(selected, rendered.get("Deployment")["spec"]["template"]["metadata"]["labels"])


def test_if_no_sources_are_given_then_the_broker_ports_are_open_to_any_source(
    render: Render,
) -> None:
    """If gateway.from and admin.from are empty, then each port rule has no `from` (any source)."""
    policy = render(None).get("NetworkPolicy", "demo-aldaas-broker")
    assert policy["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8080}]},
        {"ports": [{"protocol": "TCP", "port": 9090}]},
    ]


def test_if_network_policy_is_disabled_then_none_renders(render: Render) -> None:
    """If networkPolicy.enabled is false, then the chart renders no NetworkPolicy."""
    assert not render({"networkPolicy": {"enabled": False}}).has("NetworkPolicy")


@pytest.mark.parametrize("peer", [{}, {"ipBlock": {}}, {"podSelectr": {}}])
def test_if_a_source_is_malformed_then_install_fails(render: Render, peer: dict[str, Any]) -> None:
    """If a gateway source is empty, lacks a CIDR or is misspelled, then the schema refuses it."""
    with pytest.raises(helm_python.HelmError, match="networkPolicy"):
        render({"networkPolicy": {"gateway": {"from": [peer]}}})
