"""The VolumeSnapshot and clone PVC the provider builds from the chart's settings pass the API's checks.

The objects come from the provider's own builders (pool/providers/kubernetes/
_manifests.py) fed with the settings the broker loads from the rendered chart.
The CRD (tests/chart/crds/, vendored from kubernetes-csi/external-snapshotter)
carries an OpenAPI v3 schema plus CEL rules (x-kubernetes-validations) that
jsonschema does not evaluate; tests/k8s_schemas.py makes it as strict as the
API server (unknown fields rejected, create-time CEL rules translated).
"""

from __future__ import annotations

import copy
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from k8s_schemas import name_errors, snapshot_validator, strict_schema, validate_strict
from test_chart_broker_contract import load_broker_settings

from aldaas.pool import Kind
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

Render = Callable[[dict[str, Any] | None], Any]

SNAPSHOT = "snap-20261126030000-a1b2c3"
LONG_RELEASE_NAME = "x" * 63


def chart_settings(
    render: Render, values: dict[str, Any], tmp_path: pathlib.Path
) -> KubernetesSettings:
    """The provider's settings as the broker loads them from the chart rendered with ``values``."""
    return load_broker_settings(render(values), tmp_path).kubernetes


def built_snapshot(settings: KubernetesSettings) -> dict[str, Any]:
    """The VolumeSnapshot the provider creates after a restore (the volume shares its name)."""
    return manifests.volume_snapshot(
        settings,
        SNAPSHOT,
        SNAPSHOT,
        {"status": "check", "backup": "logical/appdb/2026-11-26.sql.gz"},
    )


@pytest.mark.parametrize(
    "values",
    [
        {"rook": {"volumeSnapshotClassName": "rbd-snap"}},
        {"rook": {"volumeSnapshotClassName": "rbd-snap"}, "fullnameOverride": LONG_RELEASE_NAME},
    ],
    ids=["chart-class", "longest-fullname"],
)
def test_if_the_provider_snapshots_with_the_chart_settings_then_the_crd_accepts_it(
    render: Render, tmp_path: pathlib.Path, values: dict[str, Any]
) -> None:
    """If the chart's settings build a VolumeSnapshot, then the CRD and the name rules accept it."""
    settings = chart_settings(render, values, tmp_path)
    manifest = built_snapshot(settings)
    validate_strict(manifest)
    assert manifest["spec"]["volumeSnapshotClassName"] == "rbd-snap"
    assert manifest["spec"]["source"]["persistentVolumeClaimName"] == manifests.object_name(
        settings, SNAPSHOT
    )
    assert name_errors(manifest) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["spec"].pop("source"), "'source' is a required property"),
        (lambda s: s["spec"]["source"].pop("persistentVolumeClaimName"), "is not valid under"),
        (
            lambda s: s["spec"]["source"].update(volumeSnapshotContentName="content-1"),
            "is valid under each of",
        ),
        (lambda s: s["spec"].update(volumeSnapshotClassName=""), "should be non-empty"),
        (
            lambda s: s["spec"].update(volumeSnapshotClass="rbd"),
            "'volumeSnapshotClass' was unexpected",
        ),
        (lambda s: s["spec"]["source"].update(pvcName="x"), "'pvcName' was unexpected"),
        (lambda s: s["spec"].update(volumeSnapshotClassName=7), "7 is not of type 'string'"),
    ],
    ids=[
        "no-source",
        "empty-source",
        "both-sources",
        "empty-class",
        "misspelled-class",
        "misspelled-pvc",
        "class-not-string",
    ],
)
def test_if_the_snapshot_is_malformed_then_the_crd_rejects_it(
    change: Callable[[dict[str, Any]], object], expected: str
) -> None:
    """If a built VolumeSnapshot is changed to break the CRD (incl. its create-time CEL rules),
    then the validator rejects it: the check can fail."""
    manifest = copy.deepcopy(built_snapshot(KubernetesSettings(snapshot_class="rbd-snap")))
    snapshot_validator().validate(manifest)
    change(manifest)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(expected)):
        snapshot_validator().validate(manifest)


@pytest.mark.parametrize("fullname", [None, LONG_RELEASE_NAME], ids=["default", "longest-fullname"])
def test_if_a_clone_pvc_names_the_snapshot_then_kubernetes_accepts_it(
    render: Render, tmp_path: pathlib.Path, fullname: str | None
) -> None:
    """If a clone's PVC takes the snapshot as dataSource, then it validates strictly (core/v1)."""
    values: dict[str, Any] = {"fullnameOverride": fullname} if fullname else {}
    settings = chart_settings(render, values, tmp_path)
    snapshot = manifests.object_name(settings, SNAPSHOT)
    pvc = manifests.pvc(settings, Kind.CLONE, "clone-0123456789", {"state": "warm"}, snapshot)
    validate_strict(pvc)
    assert pvc["spec"]["dataSource"]["name"] == built_snapshot(settings)["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == settings.storage_class


def test_if_a_cel_rule_is_unknown_then_strict_schema_refuses_to_guess() -> None:
    """If the CRD gains a create-time CEL rule, then strict_schema fails instead of ignoring it."""
    schema = {"type": "object", "x-kubernetes-validations": [{"rule": "self.x < 3"}]}
    with pytest.raises(ValueError, match=re.escape("untranslated CEL rule: self.x < 3")):
        strict_schema(schema)
