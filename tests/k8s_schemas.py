"""What the Kubernetes API server checks in an object, offline: schemas, CRD rules, names and labels.

Shared by the manifest tests (tests/k8s), the chart tests (tests/chart) and the
fake API server (tests/k8s/k8s_fake_api.py), so all three apply one set of rules:

- :func:`validate_strict` — the Kubernetes OpenAPI schema of every supported
  version, unknown fields rejected (kubernetes-validate ``--strict``);
- :func:`snapshot_validator` — snapshot.storage.k8s.io/v1 VolumeSnapshot from
  the vendored CRD (tests/chart/crds/), made as strict as the API server;
- :func:`name_errors` — apimachinery's rules for object names, label keys and
  values and annotation sizes, which the OpenAPI schemas do not carry.
"""

from __future__ import annotations

import functools
import pathlib
import re
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import yaml

CRD_PATH = (
    pathlib.Path(__file__).parent
    / "chart"
    / "crds"
    / "snapshot.storage.k8s.io_volumesnapshots.yaml"
)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest the installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.26.0", kubernetes_validate.utils.latest_version())

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

# apimachinery/pkg/util/validation: DNS-1123 label and subdomain, qualified names, label values.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ANNOTATIONS_MAX_BYTES = 256 * 1024

# Kinds whose names must be DNS labels (63); every other kind takes a subdomain (253).
# A pod's name is its hostname and a Job's name becomes a label value of its pods.
_LABEL_NAMED = frozenset({"Pod", "Job", "Service", "Namespace"})


def strict_schema(node: Any) -> Any:
    """A copy of an openAPIV3Schema with unknown fields rejected and create-time CEL translated.

    Rules that compare with ``oldSelf`` only apply on update and are skipped;
    any other untranslated rule raises, so a new rule in a future CRD cannot
    pass unnoticed.
    """
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


@functools.cache
def snapshot_validator() -> jsonschema.Draft7Validator:
    """A validator for snapshot.storage.k8s.io/v1 VolumeSnapshot from the vendored CRD."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["spec"]["group"] == "snapshot.storage.k8s.io"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] is True
    assert v1["storage"] is True
    return jsonschema.Draft7Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


def _label_key_error(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        return f"key {key!r}: prefix must be a DNS subdomain of at most 253 characters"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return f"key {key!r}: name part must be 1-63 alphanumerics, '-', '_' or '.'"
    return None


def name_errors(obj: dict[str, Any]) -> list[str]:
    """What the API server refuses in ``obj``'s name, labels and annotations (empty: accepted)."""
    errors: list[str] = []
    kind = obj.get("kind", "")
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "")
    limit, pattern = (63, DNS_LABEL) if kind in _LABEL_NAMED else (253, DNS_SUBDOMAIN)
    if len(name) > limit or not pattern.match(name):
        errors.append(f"{kind} name {name!r} ({len(name)} characters) is not a valid name")
    for key, value in (metadata.get("labels") or {}).items():
        if (error := _label_key_error(key)) is not None:
            errors.append(f"label {error}")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(f"label {key!r}: value {value!r} is not a valid label value")
    annotations = metadata.get("annotations") or {}
    for key in annotations:
        if (error := _label_key_error(key)) is not None:
            errors.append(f"annotation {error}")
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > _ANNOTATIONS_MAX_BYTES:
        errors.append("annotations are larger than 256 KiB")
    return errors


def validate_strict(obj: dict[str, Any]) -> None:
    """Validate ``obj`` as the API server would accept it from a client; raises on the first error.

    Built-in kinds against every supported version's OpenAPI schema (unknown
    fields rejected), a VolumeSnapshot against its CRD, and everything against
    the name and label rules.
    """
    if obj.get("apiVersion") == "snapshot.storage.k8s.io/v1":
        snapshot_validator().validate(obj)
    else:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    errors = name_errors(obj)
    if errors:
        raise ValueError("; ".join(errors))


@functools.cache
def _builtin_validator(kind: str, api_version: str) -> jsonschema.Validator:
    """The strict OpenAPI schema of a built-in kind in the oldest supported version, compiled once."""
    version = KUBERNETES_VERSIONS[0]
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kubernetes_validate.utils.schema_contents(
        f"{folder}/{kind.lower()}-{group_version}.json", version
    )
    definitions = kubernetes_validate.utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    validator: jsonschema.Validator = jsonschema.validators.Draft202012Validator(
        schema, registry=registry
    )
    return validator


def _without_nulls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_without_nulls(item) for item in node]
    return node


def write_errors(obj: dict[str, Any], *, patch: bool = False) -> list[str]:
    """What the API server refuses in a create or update body (``patch``: a merge patch, checked
    for unknown fields and bad values only), as strict field validation does; fast enough for
    every request of the fake API server (validators are compiled once)."""
    if patch:
        obj = _without_nulls(obj)  # a merge patch's null removes a key
    if obj.get("apiVersion") == "snapshot.storage.k8s.io/v1":
        validator: jsonschema.Validator = snapshot_validator()
    else:
        validator = _builtin_validator(obj["kind"], obj["apiVersion"])
    errors = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(obj)
        if not (patch and error.validator == "required")
    ]
    if patch:
        named = {**obj, "metadata": {**obj.get("metadata", {}), "name": "x"}}
        return errors + name_errors(named)
    return errors + name_errors(obj)


# Pod Security Standards, "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards),
# the checks of the policy version of the newest Kubernetes, as the admission controller applies
# them: "baseline"'s (host namespaces, privileged, capabilities, hostPath, hostPorts, AppArmor,
# SELinux, /proc mount, sysctls, Windows HostProcess) and "restricted"'s (volume types, privilege
# escalation, non-root, seccomp, capabilities).
_RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.ping_group_range",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.tcp_wmem",
    }
)
_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)


def _context_problems(where: str, sc: dict[str, Any]) -> list[str]:
    """The rules a pod's and a container's securityContext share."""
    problems: list[str] = []
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where} is a Windows HostProcess")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in _SELINUX_TYPES:
        problems.append(f"{where} has SELinux type {selinux['type']!r}")
    if selinux.get("user") or selinux.get("role"):
        problems.append(f"{where} sets an SELinux user or role")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append(f"{where} has AppArmor profile 'Unconfined'")
    if sc.get("runAsUser") == 0:
        problems.append(f"{where} runAsUser is 0")
    return problems


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What Pod Security "restricted" refuses in a pod spec (empty: admitted)."""
    problems: list[str] = []
    pod = spec.get("securityContext") or {}
    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{flag} is true")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} has type {sorted(kinds)}")
    problems += _context_problems("pod", pod)
    if pod.get("seccompProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod has seccomp profile {pod['seccompProfile']['type']!r}")
    for sysctl in pod.get("sysctls") or []:
        if sysctl["name"] not in _SAFE_SYSCTLS:
            problems.append(f"pod sets the unsafe sysctl {sysctl['name']}")
    pod_seccomp = (pod.get("seccompProfile") or {}).get("type")
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        problems += _context_problems(f"container {name}", sc)
        if sc.get("privileged"):
            problems.append(f"container {name} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {name} does not set allowPrivilegeEscalation: false")
        if not (
            sc.get("runAsNonRoot") is True
            or (pod.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)
        ):
            problems.append(f"container {name} may run as root (runAsNonRoot is not true)")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"container {name} has seccomp profile {seccomp!r}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"container {name} has procMount {sc['procMount']!r}")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"container {name} does not drop ALL capabilities")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"container {name} adds capabilities {capabilities['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"container {name} uses a hostPort")
    return problems
