"""VolumeSnapshots shaped as the provider creates them validate against the snapshot CRD's schema.

The CRD (tests/chart/crds/, vendored from kubernetes-csi/external-snapshotter)
carries an OpenAPI v3 schema plus CEL rules (x-kubernetes-validations) that
jsonschema does not evaluate. ``strict_schema`` makes the check as strict as
the API server: objects reject unknown fields (what `kubectl --validate=strict`
reports instead of pruning silently), and the CEL rules that apply at create
time are translated to JSON schema. Rules that compare with ``oldSelf`` only
apply on update and are skipped; any other rule fails the test, so a new rule
in a future CRD cannot pass unnoticed.
"""

from __future__ import annotations

import copy
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yaml

CRD_PATH = pathlib.Path(__file__).parent / "crds" / "snapshot.storage.k8s.io_volumesnapshots.yaml"

# CEL rules of the v1 schema that apply on create, as JSON schema.
_CEL_AT_CREATE: dict[str, dict[str, Any]] = {
    "(has(self.volumeSnapshotContentName) && !has(self.persistentVolumeClaimName))"
    " || (!has(self.volumeSnapshotContentName) && has(self.persistentVolumeClaimName))": {
        "oneOf": [
            {"required": ["volumeSnapshotContentName"]},
            {"required": ["persistentVolumeClaimName"]},
        ]
    },
    "size(self) > 0": {"minLength": 1},
}
# Label values: at most 63 characters, alphanumeric at both ends (API server rule).
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def strict_schema(node: Any) -> Any:
    """A copy of an openAPIV3Schema with unknown fields rejected and create-time CEL translated."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    translated = []
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        if rule["rule"] not in _CEL_AT_CREATE:
            raise ValueError(f"untranslated CEL rule: {rule['rule']}")
        translated.append(_CEL_AT_CREATE[rule["rule"]])
    if translated:
        out["allOf"] = [*out.get("allOf", []), *translated]
    return out


@pytest.fixture(scope="module")
def snapshot_validator() -> jsonschema.Draft7Validator:
    """A validator for snapshot.storage.k8s.io/v1 VolumeSnapshot from the vendored CRD."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["spec"]["group"] == "snapshot.storage.k8s.io"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] is True
    assert v1["storage"] is True
    return jsonschema.Draft7Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


def provider_snapshot(snapshot_class: str, pvc: str) -> dict[str, Any]:
    """The VolumeSnapshot the provider creates after a restore (labels as the original's)."""
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": "demo-aldaas-snap-20261126-0300",
            "namespace": "aldaas",
            "labels": {
                "aldaas": "demo-aldaas",
                "status": "check",
                "app.kubernetes.io/managed-by": "aldaas",
            },
            "annotations": {"aldaas.io/backup": "logical/appdb/2026-11-26.sql.gz"},
        },
        "spec": {
            "volumeSnapshotClassName": snapshot_class,
            "source": {"persistentVolumeClaimName": pvc},
        },
    }


def test_if_the_provider_snapshots_with_the_chart_class_then_the_crd_accepts_it(
    render: Callable[[dict[str, Any] | None], Any],
    snapshot_validator: jsonschema.Draft7Validator,
) -> None:
    """If a VolumeSnapshot uses the chart's snapshot class, then the CRD accepts it."""
    config = render({"rook": {"volumeSnapshotClassName": "rbd-snap"}}).broker_config()
    manifest = provider_snapshot(config["kubernetes"]["snapshot_class"], "demo-aldaas-restore-1")
    snapshot_validator.validate(manifest)
    assert manifest["spec"]["volumeSnapshotClassName"] == "rbd-snap"
    for value in manifest["metadata"]["labels"].values():
        assert len(value) <= 63
        assert _LABEL_VALUE.match(value)


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
    snapshot_validator: jsonschema.Draft7Validator,
    change: Callable[[dict[str, Any]], object],
    expected: str,
) -> None:
    """If a VolumeSnapshot breaks the CRD (incl. its create-time CEL rules), then it is rejected."""
    manifest = copy.deepcopy(provider_snapshot("rbd-snap", "pvc-1"))
    change(manifest)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(expected)):
        snapshot_validator.validate(manifest)


def test_if_a_clone_pvc_names_the_snapshot_then_kubernetes_accepts_it(
    render: Callable[[dict[str, Any] | None], Any],
    validate_manifest: Callable[[dict[str, Any]], None],
) -> None:
    """If a clone's PVC takes the snapshot as dataSource, then it validates strictly (core/v1)."""
    provider = render(None).broker_config()["kubernetes"]
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "demo-aldaas-clone-1", "namespace": "aldaas"},
        "spec": {
            "storageClassName": provider["storage_class"],
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": provider["storage_size"]}},
            "dataSource": {
                "apiGroup": "snapshot.storage.k8s.io",
                "kind": "VolumeSnapshot",
                "name": "demo-aldaas-snap-20261126-0300",
            },
        },
    }
    validate_manifest(pvc)


def test_if_a_cel_rule_is_unknown_then_strict_schema_refuses_to_guess() -> None:
    """If the CRD gains a create-time CEL rule, then strict_schema fails instead of ignoring it."""
    schema = {"type": "object", "x-kubernetes-validations": [{"rule": "self.x < 3"}]}
    with pytest.raises(ValueError, match=re.escape("untranslated CEL rule: self.x < 3")):
        strict_schema(schema)
