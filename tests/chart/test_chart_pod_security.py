"""Every pod the chart renders, and every pod the provider builds from the chart's settings,
passes Pod Security "restricted"; the pods values reach the broker and its pods.

The rules are ``k8s_schemas.restricted_violations``, the same checker the provider's own
manifest tests apply (tests/k8s/test_k8s_manifests.py); the provider's pods are built by
``k8s_built.built_objects`` from the settings the broker loads out of the rendered ConfigMap.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from k8s_built import built_objects, pod_specs
from k8s_schemas import restricted_violations, validate_strict
from test_chart_broker_contract import CONTRACT_SETS, load_broker_settings

Render = Callable[[dict[str, Any] | None], Any]

# Every pods value, and the service accounts and size limit of the provider's pods, set.
EVERY_POD_VALUE: dict[str, Any] = {
    "pods": {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 26,
            "runAsGroup": 26,
            "fsGroup": 26,
            "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/postgres.json"},
        },
        "containerSecurityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        },
        "nodeSelector": {"node.kubernetes.io/pool": "databases", "ssd": True},
        "tolerations": [{"key": "databases", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "dev-databases",
    },
    "application": {"serviceAccountName": "aldaas-db"},
    "restore": {"serviceAccountName": "backup-reader", "backupSizeLimit": "50Gi"},
}

# The security contexts turned off: the provider's pods then carry none.
SECURITY_OFF: dict[str, Any] = {"pods": {"securityContext": None, "containerSecurityContext": None}}

POD_SETS: dict[str, dict[str, Any] | None] = {**CONTRACT_SETS, "every-pod-value": EVERY_POD_VALUE}


@pytest.mark.parametrize("values", POD_SETS.values(), ids=POD_SETS.keys())
def test_if_the_chart_is_installed_then_every_pod_it_renders_is_restricted(
    render: Render, values: dict[str, Any] | None
) -> None:
    """If the chart renders with a value set, then each pod it renders (the broker's Deployment,
    any Job or hook) passes Pod Security "restricted"."""
    specs = pod_specs(render(values).manifests)
    assert "Deployment demo-aldaas" in specs
    for name, spec in specs.items():
        assert restricted_violations(spec) == [], name


@pytest.mark.parametrize("values", POD_SETS.values(), ids=POD_SETS.keys())
def test_if_the_broker_builds_pods_from_the_charts_settings_then_they_are_restricted(
    render: Render, tmp_path: pathlib.Path, values: dict[str, Any] | None
) -> None:
    """If the provider builds its database, restore and check pods from the settings the broker
    loads out of the rendered ConfigMap, then each is a valid object Pod Security "restricted"
    admits."""
    settings = load_broker_settings(render(values), tmp_path).kubernetes
    objects = built_objects(settings)
    specs = pod_specs(objects)
    assert len(specs) == 5  # two database pods, the two kinds of restore Job, the check
    for obj in objects:
        validate_strict(obj)
    for name, spec in specs.items():
        assert restricted_violations(spec) == [], name


def test_if_every_pod_value_is_set_then_the_broker_and_its_pods_carry_each(
    render: Render,
    validate_manifest: Callable[[dict[str, Any]], None],
    tmp_path: pathlib.Path,
) -> None:
    """If every pods value and the service accounts and download size limit are set, then the
    chart validates, the broker's loader keeps each value, and each built pod carries it."""
    rendered = render(EVERY_POD_VALUE)
    for manifest in rendered.manifests:
        validate_manifest(manifest)
    kube = load_broker_settings(rendered, tmp_path).kubernetes
    given = EVERY_POD_VALUE["pods"]
    assert kube.pods.security_context == given["securityContext"]
    assert kube.pods.container_security_context == given["containerSecurityContext"]
    assert kube.pods.node_selector == {"node.kubernetes.io/pool": "databases", "ssd": "true"}
    assert kube.pods.tolerations == tuple(given["tolerations"])
    assert kube.pods.affinity == given["affinity"]
    assert kube.pods.priority_class_name == "dev-databases"
    assert kube.application.service_account == "aldaas-db"
    assert kube.restore.service_account == "backup-reader"
    assert kube.restore.backup_size_limit == "50Gi"
    specs = pod_specs(built_objects(kube))
    for name, spec in specs.items():
        assert spec["securityContext"] == given["securityContext"], name
        assert spec["nodeSelector"] == kube.pods.node_selector, name
        assert spec["tolerations"] == given["tolerations"], name
        assert spec["affinity"] == given["affinity"], name
        assert spec["priorityClassName"] == "dev-databases", name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert container["securityContext"] == given["containerSecurityContext"], name
    restores = [spec for name, spec in specs.items() if name.endswith("-restore")]
    assert len(restores) == 2  # a configured command's and the built-in restore's
    for restore in restores:
        assert restore["serviceAccountName"] == "backup-reader"
        assert restore["volumes"][0]["emptyDir"] == {"sizeLimit": "50Gi"}
    databases = [spec for name, spec in specs.items() if name.startswith("Pod ")]
    assert [spec["serviceAccountName"] for spec in databases] == ["aldaas-db", "aldaas-db"]


def test_if_no_pod_value_is_set_then_the_broker_keeps_the_providers_defaults(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If the pods values are left as shipped, then the broker's kubernetes.pods settings equal
    the provider's own defaults and no service account or size limit is set."""
    kube = load_broker_settings(render(None), tmp_path).kubernetes
    defaults = type(kube)()
    assert attrs.evolve(kube.pods, image_pull_secrets=()) == defaults.pods
    assert kube.application.service_account is None
    assert kube.restore.service_account is None
    assert kube.restore.backup_size_limit is None


def test_if_the_security_contexts_are_turned_off_then_the_restricted_check_refuses_the_pods(
    render: Render,
    validate_manifest: Callable[[dict[str, Any]], None],
    tmp_path: pathlib.Path,
) -> None:
    """If pods.securityContext and pods.containerSecurityContext are null, then the chart still
    validates, the provider's pods carry no securityContext, and the check names what is missing."""
    rendered = render(SECURITY_OFF)
    for manifest in rendered.manifests:
        validate_manifest(manifest)
    kube = load_broker_settings(rendered, tmp_path).kubernetes
    assert (kube.pods.security_context, kube.pods.container_security_context) == ({}, {})
    for spec in pod_specs(built_objects(kube)).values():
        assert "securityContext" not in spec
        problems = restricted_violations(spec)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert f"container {container['name']} does not drop ALL capabilities" in problems


def test_if_the_broker_pod_is_loosened_then_the_restricted_check_refuses_it(
    render: Render,
) -> None:
    """If the broker's pod may run as root, unconfined, with no container securityContext, then the
    check over the chart's pods refuses the Deployment, naming each broken rule."""
    loosened = {"runAsUser": 0, "runAsNonRoot": None, "seccompProfile": None}
    rendered = render({"podSecurityContext": loosened, "securityContext": None})
    problems = restricted_violations(pod_specs(rendered.manifests)["Deployment demo-aldaas"])
    assert problems == [
        "pod runAsUser is 0",
        "container broker does not set allowPrivilegeEscalation: false",
        "container broker may run as root (runAsNonRoot is not true)",
        "container broker has seccomp profile None",
        "container broker does not drop ALL capabilities",
    ]


# A pod breaking every rule of "restricted", one rule per field.
VIOLATING_POD: dict[str, Any] = {
    "hostNetwork": True,
    "hostPID": True,
    "hostIPC": True,
    "securityContext": {
        "runAsUser": 0,
        "seccompProfile": {"type": "Unconfined"},
        "seLinuxOptions": {"type": "spc_t"},
        "sysctls": [{"name": "kernel.msgmax", "value": "65536"}],
        "windowsOptions": {"hostProcess": True},
    },
    "volumes": [
        {"name": "host", "hostPath": {"path": "/var/run/docker.sock"}},
        {"name": "nfs", "nfs": {"server": "nfs.example.test", "path": "/"}},
    ],
    "initContainers": [
        {
            "name": "init",
            "image": "busybox",
            "securityContext": {"seLinuxOptions": {"user": "system_u", "role": "system_r"}},
        }
    ],
    "containers": [
        {
            "name": "main",
            "image": "postgres",
            "ports": [{"containerPort": 5432, "hostPort": 5432}],
            "securityContext": {
                "privileged": True,
                "allowPrivilegeEscalation": True,
                "runAsNonRoot": False,
                "runAsUser": 0,
                "procMount": "Unmasked",
                "appArmorProfile": {"type": "Unconfined"},
                "capabilities": {"add": ["SYS_ADMIN"]},
            },
        }
    ],
    "ephemeralContainers": [{"name": "debug", "image": "busybox"}],
}


def test_if_a_pod_breaks_each_rule_then_the_restricted_check_names_every_one() -> None:
    """If a pod breaks every rule of "restricted", then the check reports each, so none of the
    passing tests above passes because a rule was never checked."""
    assert restricted_violations(VIOLATING_POD) == [
        "hostNetwork is true",
        "hostPID is true",
        "hostIPC is true",
        "volume host has type ['hostPath']",
        "volume nfs has type ['nfs']",
        "pod is a Windows HostProcess",
        "pod has SELinux type 'spc_t'",
        "pod runAsUser is 0",
        "pod has seccomp profile 'Unconfined'",
        "pod sets the unsafe sysctl kernel.msgmax",
        "container init sets an SELinux user or role",
        "container init does not set allowPrivilegeEscalation: false",
        "container init may run as root (runAsNonRoot is not true)",
        "container init has seccomp profile 'Unconfined'",
        "container init does not drop ALL capabilities",
        "container main has AppArmor profile 'Unconfined'",
        "container main runAsUser is 0",
        "container main is privileged",
        "container main does not set allowPrivilegeEscalation: false",
        "container main may run as root (runAsNonRoot is not true)",
        "container main has seccomp profile 'Unconfined'",
        "container main has procMount 'Unmasked'",
        "container main does not drop ALL capabilities",
        "container main adds capabilities ['SYS_ADMIN']",
        "container main uses a hostPort",
        "container debug does not set allowPrivilegeEscalation: false",
        "container debug may run as root (runAsNonRoot is not true)",
        "container debug has seccomp profile 'Unconfined'",
        "container debug does not drop ALL capabilities",
    ]
