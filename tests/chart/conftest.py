"""Render the Helm chart offline and validate what it renders.

helm-python-sdk binds Helm's own Go SDK (libhelm_c through ctypes): templates,
values.schema.json and `helm lint` behave exactly as `helm install` would,
with no helm binary, cluster or network. kubernetes-validate carries the
Kubernetes OpenAPI schemas offline; `validate(..., strict=True)` is what its
`--strict` flag runs (unknown fields are errors).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft7Validator

CHART_DIR = pathlib.Path(__file__).resolve().parents[2] / "chart"
RELEASE = "demo"
NAMESPACE = "aldaas"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest the installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.26.0", kubernetes_validate.utils.latest_version())

# prometheus-operator's ServiceMonitor is a CRD, so kubernetes-validate has no
# schema for it. This one is derived from the CRD's fields the chart uses
# (monitoring.coreos.com/v1), strict like --strict: unknown fields fail.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "annotations": _LABELS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                            },
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                            },
                        },
                    },
                },
            },
        },
    },
}


_METRIC = re.compile(r"\baldaas_[a-z0-9_]+")
_HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count|created)$")


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and templating queries."""
    queries: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if (key in ("expr", "definition") and isinstance(value, str)) or (
                    key == "query" and isinstance(value, str) and "(" in value
                ):
                    queries.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return queries


def _metric_names(queries: list[str]) -> set[str]:
    """The base metric names the queries use (histogram series folded onto their family)."""
    return {_HISTOGRAM_SERIES.sub("", name) for q in queries for name in _METRIC.findall(q)}


def _load_dashboard(chart_dir: pathlib.Path) -> dict[str, Any]:
    """The dashboard JSON the chart ships."""
    dashboard: dict[str, Any] = json.loads((chart_dir / "dashboards" / "aldaas.json").read_text())
    return dashboard


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON the chart ships."""
    return _load_dashboard(CHART_DIR)


@pytest.fixture(scope="session")
def metric_names() -> Callable[[list[str]], set[str]]:
    """Collect the base metric names that PromQL strings use."""
    return _metric_names


@pytest.fixture(scope="session")
def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Every base metric name the dashboard's queries use."""
    return _metric_names(_dashboard_queries(dashboard))


class Rendered:
    """One render of the chart: manifests by kind/name, and NOTES.txt."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.notes = files.get("aldaas/templates/NOTES.txt", "")
        self.manifests: list[dict[str, Any]] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def kinds(self) -> list[str]:
        """Every rendered kind, sorted."""
        return sorted(m["kind"] for m in self.manifests)

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """The one manifest of ``kind`` (and ``name``); fails if there is not exactly one."""
        found = [
            m
            for m in self.manifests
            if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
        ]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def has(self, kind: str) -> bool:
        """Whether any manifest of ``kind`` was rendered."""
        return any(m["kind"] == kind for m in self.manifests)

    def broker_config(self) -> dict[str, Any]:
        """The broker's config.yaml from the ConfigMap, parsed."""
        config: dict[str, Any] = yaml.safe_load(
            self.get("ConfigMap", f"{RELEASE}-aldaas")["data"]["config.yaml"]
        )
        return config

    def container(self) -> dict[str, Any]:
        """The broker container of the Deployment."""
        containers = self.get("Deployment")["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["broker"]
        container: dict[str, Any] = containers[0]
        return container


def _validate_manifest(manifest: dict[str, Any]) -> None:
    if manifest["kind"] == "ServiceMonitor":
        Draft7Validator(SERVICE_MONITOR_SCHEMA).validate(manifest)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.fixture(scope="session")
def validate_manifest() -> Callable[[dict[str, Any]], None]:
    """Validate one manifest strictly against every supported Kubernetes version (raises)."""
    return _validate_manifest


@pytest.fixture(scope="session")
def chart_dir() -> pathlib.Path:
    """The chart's directory in this checkout."""
    return CHART_DIR


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    """The chart under chart/, loaded once."""
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm_python.Chart) -> Callable[..., Rendered]:
    """Render the chart with values as `helm install demo chart/ -n aldaas -f values` would."""

    def _render(values: dict[str, Any] | None = None) -> Rendered:
        return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    return _render
