"""The objects the provider sends are valid Kubernetes objects (strict schema of the API)."""

from __future__ import annotations

from typing import Any

import attrs
import kubernetes_validate
import pytest
from k8s_fake_api import FakeKubernetes
from kubernetes import client

from aldaas.pool import Backup, Command, Kind, KubernetesProvider, LeaderElector
from aldaas.pool.providers.kubernetes._settings import (
    ApplicationSettings,
    KubernetesSettings,
    ResourceSettings,
    RestoreSettings,
)

KUBERNETES_VERSION = "1.31"  # a version the provider supports, older than the newest on purpose


def validate(obj: dict[str, Any]) -> None:
    """Strictly validate what the client sent, minus what the fake's server side added."""
    sent = {k: v for k, v in obj.items() if k != "status"}
    metadata = {
        k: v
        for k, v in sent["metadata"].items()
        if k not in ("uid", "resourceVersion", "creationTimestamp", "generation", "namespace")
    }
    kubernetes_validate.validate({**sent, "metadata": metadata}, KUBERNETES_VERSION, strict=True)


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

    kinds = {obj["kind"] for plural, obj in fake.created if plural != "volumesnapshots"}
    assert kinds == {"PersistentVolumeClaim", "Pod", "Job", "ConfigMap", "Lease"}
    for plural, obj in fake.created:
        if plural == "volumesnapshots":
            continue  # a CRD: the chart's tests check it against the vendored CRD schema
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
    assert restore["command"] == [
        "sh",
        "-c",
        "gunzip -c /backup.sql.gz | psql -h $ALDAAS_HOST_DAEMON -U $POSTGRES_USER",
    ]
    assert restore["volumeMounts"] == [
        {
            "name": "backup",
            "mountPath": "/backup.sql.gz",
            "subPath": "backup.sql.gz",
            "readOnly": True,
        }
    ]
    env = {e["name"]: e["value"] for e in restore["env"]}
    assert env["ALDAAS_BACKUP_FILE"] == "/backup.sql.gz"
    assert [r.kind for r in await provider.list()] == [Kind.VOLUME]


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
    assert not any("valueFrom" in e for e in restore["env"])
