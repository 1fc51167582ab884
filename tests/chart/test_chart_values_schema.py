"""values.schema.json and the chart's own checks stop bad values at install, naming the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import helm_python
import pytest
import yaml

Render = Callable[[dict[str, Any] | None], Any]


def install_error(render: Render, values: dict[str, Any]) -> str:
    """The message `helm install` would print for ``values``; fails if it would succeed."""
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"pool": {"size": -1}}, "at '/pool/size': minimum: got -1, want 0"),
        ({"pool": {"size": "three"}}, "at '/pool/size': got string, want integer"),
        ({"pool": {"maxProvisioning": 0}}, "at '/pool/maxProvisioning': minimum: got 0, want 1"),
        ({"lease": {"ttl": 0}}, "at '/lease/ttl': minimum: got 0, want 1"),
        ({"snapshots": {"keep": 0}}, "at '/snapshots/keep': minimum: got 0, want 1"),
        ({"s3": {"readTimeout": 0}}, "at '/s3/readTimeout'"),
        ({"s3": {"maxAttempts": 0}}, "at '/s3/maxAttempts': minimum: got 0, want 1"),
        ({"s3": {"host": "http://minio.server"}}, "at '/s3/host'"),
        ({"s3": {"host": "minio:9000"}}, "at '/s3/host'"),
        ({"s3": {"region": "US East"}}, "at '/s3/region'"),
        ({"s3": {"prefix": "/spilo/"}}, "at '/s3/prefix'"),
        ({"s3": {"bucket": "s3://backup"}}, "at '/s3/bucket'"),
        ({"s3": {"addressingStyle": "vhost"}}, "at '/s3/addressingStyle'"),
        ({"s3": {"order": "newest"}}, "at '/s3/order'"),
        ({"replicas": 0}, "at '/replicas': minimum: got 0, want 1"),
        ({"tunnel": {"port": 70000}}, "at '/tunnel/port': maximum: got 70,000, want 65,535"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        ({"application": {"storage": "ten gigs"}}, "at '/application/storage'"),
        ({"application": {"env": [{"name": "X"}]}}, "at '/application/env/0'"),
        ({"restore": {"backupSizeLimit": "lots"}}, "at '/restore/backupSizeLimit'"),
        ({"restore": {"serviceAccountName": "Backup_Reader"}}, "at '/restore/serviceAccountName'"),
        ({"pods": {"priorityClassName": "Dev DBs"}}, "at '/pods/priorityClassName'"),
        ({"pods": {"nodeselector": {"a": "b"}}}, "at '/pods'"),
        ({"pods": {"tolerations": ["databases"]}}, "at '/pods/tolerations/0'"),
        (
            {"metrics": {"serviceMonitor": {"interval": "often"}}},
            "at '/metrics/serviceMonitor/interval'",
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_if_a_value_is_out_of_range_or_mistyped_then_install_fails_naming_it(
    render: Render, values: dict[str, Any], expected: str
) -> None:
    """If a value breaks its schema, then the install fails with the key's path and constraint."""
    assert expected in install_error(render, values)


def test_if_a_key_is_misspelled_then_install_fails_naming_it(render: Render) -> None:
    """If a values key is unknown (a typo), then the install fails instead of ignoring it."""
    message = install_error(render, {"pool": {"sise": 3}})
    assert "at '/pool'" in message
    assert "sise" in message
    assert "at ''" in install_error(render, {"leases": {"ttl": 60}})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"lease": {"ttl": 7200, "maxTtl": 3600}},
            "lease.ttl (7200) is longer than lease.maxTtl (3600): "
            "lower lease.ttl or raise lease.maxTtl.",
        ),
        (
            {"lease": {"maxTtl": 90000, "maxLifetime": 86400}},
            "lease.maxTtl (90000) is longer than lease.maxLifetime (86400): "
            "lower lease.maxTtl or raise lease.maxLifetime.",
        ),
        (
            {"s3": {"accesskey": "AKIAEXAMPLE"}},
            "s3.accesskey is set but s3.secretkey is empty: "
            "set both, or name a Secret in s3.existingSecret.",
        ),
        (
            {"admin": {"port": 8080}},
            "tunnel.port and admin.port are both 8080: "
            "give the gateway and the admin server different ports.",
        ),
    ],
)
def test_if_values_contradict_each_other_then_install_fails_with_one_sentence(
    render: Render, values: dict[str, Any], expected: str
) -> None:
    """If two values contradict, then the install fails saying what, the values, and what to do."""
    assert expected in install_error(render, values)


def test_if_the_schema_is_asked_directly_then_it_agrees_with_install(
    chart: helm_python.Chart,
) -> None:
    """If values are checked with `validate_schema`, then bad ones fail and good ones pass."""
    with pytest.raises(helm_python.HelmValuesError, match="/pool/size"):
        chart.validate_schema({"pool": {"size": "three"}})
    chart.validate_schema({"pool": {"size": 0}, "replicas": 3})
    with pytest.raises(helm_python.HelmValuesError, match="/lease/maxActive"):
        chart.validate_schema({"lease": {"maxActive": 0}})
    chart.validate_schema({"lease": {"maxActive": None}})
    chart.validate_schema({"lease": {"maxActive": 20}})


def test_if_the_default_values_are_checked_then_they_satisfy_the_schema(
    chart: helm_python.Chart, chart_dir: Any
) -> None:
    """If values.yaml is validated against values.schema.json, then it passes as shipped."""
    defaults = yaml.safe_load((chart_dir / "values.yaml").read_text())
    chart.validate_schema(defaults)
    assert defaults["pool"] == {"size": 3, "maxProvisioning": 2}
    assert defaults["lease"]["ttl"] == 300
    assert defaults["snapshots"] == {"keep": 1}


def test_if_values_yaml_is_read_then_every_leaf_key_has_a_comment(chart_dir: Any) -> None:
    """If values.yaml is read, then each key with a scalar or list value has a comment above it."""
    lines = (chart_dir / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        key, _, rest = stripped.partition(":")
        indent = len(line) - len(line.lstrip())
        if not rest.strip():  # a section (or a list follows): the section's comment covers it
            continue
        if indent > 0 and _inside_documented_block(lines, number, indent):
            continue
        previous = lines[number - 1].strip() if number else ""
        if previous.startswith("- "):  # the second key of a list item ({name, value})
            continue
        if not previous.startswith("#"):
            undocumented.append(key)
    assert undocumented == []


def _inside_documented_block(lines: list[str], number: int, indent: int) -> bool:
    """Whether the line belongs to a map value (resources, annotations...) documented above it."""
    for previous in reversed(lines[:number]):
        previous_indent = len(previous) - len(previous.lstrip())
        if previous.strip() and previous_indent < indent:
            key_line = previous.strip()
            return key_line.endswith(":") and key_line.split(":")[0] in {
                "requests",
                "limits",
                "annotations",
                "labels",
                "resources",
                "seccompProfile",
                "capabilities",
                "podSecurityContext",
                "securityContext",
                "containerSecurityContext",
            }
    return False
