"""The objects the provider sends are valid Kubernetes objects (strict schemas of the API and CRD).

The builders in pool/providers/kubernetes/_manifests.py are pure: most tests
here validate their output directly, for several value sets; one runs the
pipeline on the fake API and validates what actually reached it.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest
from k8s_built import BUILTIN, VOLUME, built_objects, pod_specs
from k8s_fake_api import FakeKubernetes
from k8s_schemas import name_errors, restricted_violations, validate_strict
from kubernetes import client

from aldaas.pool import (
    Backup,
    Command,
    Kind,
    KubernetesProvider,
    LeaderElector,
    ProviderError,
)
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._settings import (
    ApplicationSettings,
    CaBundleSettings,
    CheckSettings,
    KubernetesSettings,
    PodSettings,
    ResourceSettings,
    RestoreSettings,
)


def validate(obj: dict[str, Any]) -> None:
    """Strictly validate what the client sent, minus what the fake's server side added."""
    sent = {k: v for k, v in obj.items() if k != "status"}
    metadata = {
        k: v
        for k, v in sent["metadata"].items()
        if k not in ("uid", "resourceVersion", "creationTimestamp", "generation", "namespace")
    }
    validate_strict({**sent, "metadata": metadata})


@pytest.mark.slow
async def test_if_the_provider_runs_the_pipeline_then_every_object_it_creates_is_valid(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> None:
    """If every step runs once (with every optional field set), then each object passes strict validation."""
    settings = attrs.evolve(
        settings,
        s3_credentials_secret="s3-keys",
        application=ApplicationSettings(
            image="postgres:17",
            pull_policy="IfNotPresent",
            command=("docker-entrypoint.sh",),
            args=("postgres", "-c", "fsync=off"),
            env={"POSTGRES_USER": "aldaas"},
            env_from_secret="db-password",
            resources=ResourceSettings(requests={"cpu": "50m"}, limits={"memory": "512Mi"}),
            readiness_command=("pg_isready", "-U", "aldaas"),
            service_account="aldaas-db",
        ),
        restore=RestoreSettings(env_from_secret="db-password", fetch_env={"ALDAAS_S3_BUCKET": "b"}),
    )
    provider = KubernetesProvider(settings, api_client)
    backup = Backup(key="dumps/x.sql.gz", etag="e", size=10, modified=0.0)
    await provider.create_volume("v", {"status": "restoring", "deadline": "1764115200.0"})
    await provider.restore("v", backup, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]
    await provider.seal("v", "s", {"status": "verifying"})
    await provider.clone("s", "c", {"state": "warm"})
    await provider.check("c", Command(argv=["psql", "-c", "select 1"]))
    await provider.record_failed_snapshot("f", {"status": "failed", "reason": "x" * 300})
    elector = LeaderElector(settings, api_client, identity="broker-0")
    assert await elector._try_take() is True

    kinds = {obj["kind"] for plural, obj in fake.created}
    assert kinds == {
        "PersistentVolumeClaim",
        "Pod",
        "Job",
        "VolumeSnapshot",
        "ConfigMap",
        "Lease",
        "Secret",
    }
    for plural, obj in fake.created:
        if plural == "pods" and "job-name" in obj["metadata"].get("labels", {}):
            continue  # made by the fake's Job controller, not by the provider
        validate(obj)
    for obj in fake.all("leases"):
        validate(obj)  # after an update too


async def test_if_the_original_restore_values_are_used_then_the_job_runs_them_verbatim(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> None:
    """If restore.command/args and backup_path are the original's, then the Job runs them as given."""
    settings = attrs.evolve(
        settings,
        restore=RestoreSettings(
            command=("sh", "-c"),
            args=("gunzip -c /backup.sql.gz | psql -h $ALDAAS_HOST_DAEMON -U $POSTGRES_USER",),
            backup_path="/backup.sql.gz",
        ),
    )
    provider = KubernetesProvider(settings, api_client)
    await provider.create_volume("v", {})
    backup = Backup(
        key="spilo/acid/logical_backups/1732600000.sql.gz", etag="e", size=1, modified=0
    )
    await provider.restore("v", backup, source, Command(argv=["ignored"]), lambda p: None)  # type: ignore[arg-type]
    (job,) = [obj for plural, obj in fake.created if plural == "jobs"]
    spec = job["spec"]["template"]["spec"]
    (fetch,) = spec["initContainers"]
    assert fetch["command"][-2:] == ["--to", "/backup/backup.sql.gz"]
    (restore,) = spec["containers"]
    # As given, then (per-clone credentials) the seal step in the same shell.
    assert restore["command"][3:] == [
        "aldaas-restore",
        "sh",
        "-c",
        "gunzip -c /backup.sql.gz | psql -h $ALDAAS_HOST_DAEMON -U $POSTGRES_USER",
    ]
    assert restore["command"][:3] == ["sh", "-c", f'set -eu\n"$@"\n{manifests.SEAL_SCRIPT}']
    assert restore["volumeMounts"] == [
        {
            "name": "backup",
            "mountPath": "/backup.sql.gz",
            "subPath": "backup.sql.gz",
            "readOnly": True,
        }
    ]
    env = {e["name"]: e.get("value") for e in restore["env"]}
    assert env["ALDAAS_BACKUP_FILE"] == "/backup.sql.gz"
    assert [r.kind for r in await provider.list()] == [Kind.VOLUME]


def _engine_restore(settings: KubernetesSettings) -> dict[str, Any]:
    """The restore container of a Job for the built-in restore (the pool's default command)."""
    address = {"PGHOST": "10.0.0.7", "PGPORT": "5432", "PGUSER": "x", "PGDATABASE": "app"}
    backup = Backup(
        key="spilo/acid/logical_backups/1732600000.sql.gz", etag="e", size=1, modified=0
    )
    job = manifests.restore_job(settings, VOLUME, backup, BUILTIN, address)
    (restore,) = job["spec"]["template"]["spec"]["containers"]
    return dict(restore)


def test_if_no_restore_command_is_configured_then_the_job_runs_aldaas_restore_in_the_broker_image(
    settings: KubernetesSettings,
) -> None:
    """If neither the pool's restore.argv nor the original's restore.command/args is set, then
    the restore container runs ``aldaas restore-backup`` on the downloaded file in the broker's
    image, with a writable emptyDir, its outcome in the termination message, and (per-clone
    credentials) the seal step for the lease login."""
    settings = attrs.evolve(settings, helper_image="registry.example/aldaas:1.2")
    restore = _engine_restore(settings)
    assert restore["image"] == "registry.example/aldaas:1.2"
    assert "imagePullPolicy" not in restore
    assert restore["command"] == [
        "aldaas",
        "restore-backup",
        "--file",
        "/backup/1732600000.sql.gz",
        "--key",
        "spilo/acid/logical_backups/1732600000.sql.gz",
        "--work-dir",
        "/backup/aldaas-work",
        "--outcome",
        "/dev/termination-log",
        "--seal-login",
        "aldaas",
    ]
    assert restore["volumeMounts"] == [{"name": "backup", "mountPath": "/backup"}]
    assert restore["terminationMessagePath"] == "/dev/termination-log"
    env = {e["name"]: e.get("value") for e in restore["env"]}
    assert (env["PGUSER"], env["PGDATABASE"]) == ("aldaas_admin", "app")
    assert not any(name.startswith("ALDAAS_SEAL_") for name in env)  # the engine seals itself


def test_if_the_restore_names_a_database_or_logins_are_static_then_the_engine_argv_says_so(
    settings: KubernetesSettings,
) -> None:
    """If restore.database is set, then the engine gets ``--database``; with static logins it
    gets no ``--seal-login``; a restore.image replaces the broker's image."""
    settings = attrs.evolve(
        settings,
        application=ApplicationSettings(logins="static", user="app", password="pw"),
        restore=RestoreSettings(database="app_production", image="my/aldaas-with-pg19:1"),
    )
    restore = _engine_restore(settings)
    assert restore["image"] == "my/aldaas-with-pg19:1"
    assert restore["command"][-2:] == ["--database", "app_production"]
    assert "--seal-login" not in restore["command"]


def test_if_the_engine_command_is_emptied_then_the_provider_refuses_to_start() -> None:
    """If restore.engine_command is empty, then the settings are refused in one sentence."""
    settings = KubernetesSettings(restore=RestoreSettings(engine_command=()))
    with pytest.raises(ProviderError, match=r"restore.engine_command is empty"):
        manifests.check_settings(settings)


async def test_if_the_s3_secret_has_other_key_names_then_the_download_maps_them_to_aws_names(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> None:
    """If s3_credentials_env maps AWS names to the Secret's keys, then only the download gets them."""
    settings = attrs.evolve(
        settings,
        s3_credentials_secret="backups-s3",
        s3_credentials_env={
            "AWS_ACCESS_KEY_ID": "accesskey",
            "AWS_SECRET_ACCESS_KEY": "secretkey",
        },
        restore=RestoreSettings(fetch_env={"ALDAAS_S3_BUCKET": "nightly"}),
    )
    provider = KubernetesProvider(settings, api_client)
    await provider.create_volume("v", {})
    backup = Backup(key="dumps/1.sql.gz", etag="e", size=1, modified=0)
    await provider.restore("v", backup, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]
    (job,) = [obj for plural, obj in fake.created if plural == "jobs"]
    validate(job)
    spec = job["spec"]["template"]["spec"]
    (fetch,) = spec["initContainers"]
    assert "envFrom" not in fetch
    assert fetch["env"] == [
        {"name": "ALDAAS_S3_BUCKET", "value": "nightly"},
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "backups-s3", "key": "accesskey"}},
        },
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "backups-s3", "key": "secretkey"}},
        },
    ]
    (restore,) = spec["containers"]
    assert "envFrom" not in restore
    secret_refs = [
        e["valueFrom"]["secretKeyRef"]["name"] for e in restore["env"] if "valueFrom" in e
    ]
    assert "backups-s3" not in secret_refs


# -- the pure builders, validated without running anything ----------------------------------

LONG_INSTANCE = "staging-eu-west-1-customer-analytics-warehouse-replica-aldaas"  # 61 characters


def _every_optional_setting(settings: KubernetesSettings) -> KubernetesSettings:
    return attrs.evolve(
        settings,
        storage_class="fast",
        snapshot_class="snap",
        s3_credentials_secret="s3-keys",
        s3_credentials_env={"AWS_ACCESS_KEY_ID": "accesskey", "AWS_SECRET_ACCESS_KEY": "secretkey"},
        s3_ca_bundle=CaBundleSettings(secret="minio-tls"),
        application=ApplicationSettings(
            image="postgres:17",
            pull_policy="IfNotPresent",
            command=("docker-entrypoint.sh",),
            args=("postgres", "-c", "fsync=off"),
            env={"POSTGRES_USER": "aldaas"},
            env_from_secret="db-password",
            resources=ResourceSettings(requests={"cpu": "50m"}, limits={"memory": "512Mi"}),
            readiness_command=("pg_isready", "-U", "aldaas"),
            service_account="aldaas-db",
            password="secret",
        ),
        restore=RestoreSettings(
            image="postgres:16",
            command=("sh", "-c"),
            args=("gunzip -c /backup.sql.gz | psql",),
            env={"PGOPTIONS": "-c statement_timeout=0"},
            env_from_secret="db-password",
            backup_path="/backup.sql.gz",
            fetch_env={"ALDAAS_S3_BUCKET": "b"},
            service_account="backup-reader",
            backup_size_limit="50Gi",
        ),
        pods=PodSettings(
            node_selector={"node.kubernetes.io/pool": "databases"},
            tolerations=({"key": "databases", "operator": "Exists", "effect": "NoSchedule"},),
            affinity={
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 50,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"aldaas.io/kind": "clone"}},
                            },
                        }
                    ]
                }
            },
            priority_class_name="dev-databases",
            image_pull_secrets=("registry-creds",),
        ),
        check=CheckSettings(
            image="postgres:16",
            command=("psql",),
            args=("-c", "select 1"),
            env={"PGCONNECT_TIMEOUT": "5"},
            env_from_secret="db-password",
        ),
    )


VALUE_SETS: dict[str, KubernetesSettings] = {
    "defaults": KubernetesSettings(),
    "every-optional-setting": _every_optional_setting(KubernetesSettings(instance="demo-aldaas")),
    "long-instance": KubernetesSettings(instance=LONG_INSTANCE),
    "long-instance-every-optional-setting": _every_optional_setting(
        KubernetesSettings(instance=LONG_INSTANCE, label_prefix="")
    ),
    "longest-instance": KubernetesSettings(instance="a" * 63),
    "s3-secret-keys-as-they-are": KubernetesSettings(s3_credentials_secret="aws-keys"),
}


@pytest.mark.parametrize("settings", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_if_a_manifest_is_built_then_kubernetes_accepts_it_strictly(
    settings: KubernetesSettings,
) -> None:
    """If any object the provider sends is built, then the API schemas, the snapshot CRD and
    the name and label rules accept it (built-in kinds in the oldest and newest version)."""
    manifests.check_settings(settings)
    objects = built_objects(settings)
    assert sorted({o["kind"] for o in objects}) == [
        "ConfigMap",
        "Job",
        "Lease",
        "PersistentVolumeClaim",
        "Pod",
        "PodDisruptionBudget",
        "VolumeSnapshot",
    ]
    for obj in objects:
        validate_strict(obj)
        template = obj.get("spec", {}).get("template")
        if template is not None:  # a Job's pods carry the template's labels
            assert (
                name_errors({"kind": "Pod", "metadata": {"name": "x", **template["metadata"]}})
                == []
            )
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(set(names)) == len(names)


def test_if_the_instance_name_is_long_then_names_are_cut_with_a_hash_and_stay_distinct() -> None:
    """If <instance>-<name>-<step> is over 63 characters, then it is cut to 63 and ends in a hash
    of the whole, different for each name and step; short names are unchanged."""
    settings = KubernetesSettings(instance=LONG_INSTANCE)
    restore = manifests.object_name(settings, VOLUME, "-restore")
    check = manifests.object_name(settings, VOLUME, "-check")
    pvc = manifests.object_name(settings, VOLUME)
    assert len(f"{LONG_INSTANCE}-{VOLUME}-restore") == 96
    assert [len(restore), len(check), len(pvc)] == [63, 63, 63]
    assert restore.startswith(f"{LONG_INSTANCE[:40]}")
    assert len({restore, check, pvc}) == 3
    assert restore == manifests.object_name(settings, VOLUME, "-restore")  # found again later
    assert re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{10}", restore)
    short = KubernetesSettings(instance="demo-aldaas")
    assert manifests.object_name(short, VOLUME, "-restore") == f"demo-aldaas-{VOLUME}-restore"


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        (
            "instance",
            "a" * 64,
            "kubernetes setting instance is '" + "a" * 64 + "' (64 characters), which is not valid",
        ),
        ("namespace", "Team_A", "kubernetes setting namespace is 'Team_A' (6 characters)"),
    ],
)
def test_if_a_name_cannot_fit_then_the_provider_refuses_to_start_in_one_sentence(
    settings: KubernetesSettings, setting: str, value: str, expected: str
) -> None:
    """If the instance or namespace is no DNS label, then building the provider fails in one
    sentence naming the setting, its value and length, and the rule, before any request."""
    with pytest.raises(ProviderError) as caught:
        KubernetesProvider(attrs.evolve(settings, **{setting: value}), api_client=None)
    message = str(caught.value)
    assert message.startswith(expected)
    assert message.endswith("starting and ending with a letter or digit.")
    assert message.count(". ") == 0


@pytest.mark.parametrize("settings", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_if_a_pod_is_built_then_pod_security_restricted_admits_it(
    settings: KubernetesSettings,
) -> None:
    """If any pod the provider sends is built (database, both kinds of restore, check), then it passes the
    rules of Pod Security "restricted", with every optional setting too."""
    specs = pod_specs(built_objects(settings))
    assert len(specs) == 5  # two database pods, the two kinds of restore Job, the check
    for name, spec in specs.items():
        assert restricted_violations(spec) == [], name


def test_if_the_security_contexts_are_emptied_then_the_restricted_check_refuses_the_pods() -> None:
    """If pods.security_context and container_security_context are {}, then no securityContext
    is sent and the restricted check names what is missing: the check can fail."""
    settings = KubernetesSettings(
        pods=PodSettings(security_context={}, container_security_context={})
    )
    for spec in pod_specs(built_objects(settings)).values():
        assert "securityContext" not in spec
        problems = restricted_violations(spec)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            name = container["name"]
            assert f"container {name} does not drop ALL capabilities" in problems
            assert f"container {name} may run as root (runAsNonRoot is not true)" in problems


def test_if_every_scheduling_setting_is_given_then_database_and_job_pods_carry_it() -> None:
    """If nodeSelector, tolerations, affinity, priorityClassName, imagePullSecrets, the restore's
    service account and download size limit are set, then every pod carries them as given."""
    settings = VALUE_SETS["every-optional-setting"]
    specs = pod_specs(built_objects(settings))
    for spec in specs.values():
        assert spec["nodeSelector"] == {"node.kubernetes.io/pool": "databases"}
        assert spec["tolerations"] == [
            {"key": "databases", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert spec["priorityClassName"] == "dev-databases"
        assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
        assert spec["affinity"] == settings.pods.affinity
    restores = [s for name, s in specs.items() if name.endswith("-restore")]
    assert len(restores) == 2  # a configured command's and the built-in restore's
    for restore in restores:
        assert restore["serviceAccountName"] == "backup-reader"
        assert restore["automountServiceAccountToken"] is True
        assert restore["volumes"] == [
            {"name": "backup", "emptyDir": {"sizeLimit": "50Gi"}},
            {
                "name": "s3-ca",
                "secret": {
                    "secretName": "minio-tls",
                    "items": [{"key": "ca.crt", "path": "ca-bundle.pem"}],
                },
            },
        ]
