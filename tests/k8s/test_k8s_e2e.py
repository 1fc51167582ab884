"""End to end on the Kubernetes provider: a backup in S3 becomes warm pods that answer queries,
and a leased one keeps its data when its pod is deleted.

The pool logic drives the Kubernetes provider, which only talks to the fake
API server; the fake's kubelet (k8s_local_kubelet.py) turns pods, snapshots
and Jobs into real PostgreSQL servers and processes through the local
provider, and the restore Job downloads the backup from moto's S3 server.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import boto3
import psycopg
import pytest
import trio
from k8s_fake_api import FakeKubernetes, wait_until
from k8s_local_kubelet import LocalKubelet
from kubernetes import client
from moto.server import ThreadedMotoServer
from pg_query import query

from aldaas.pool import (
    Endpoint,
    Kind,
    Lease,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    S3Settings,
    S3Source,
    SourceSettings,
    WarmPoolSettings,
)
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import ApplicationSettings, KubernetesSettings

pytestmark = pytest.mark.slow

ROWS = 2000
BUCKET = "k8s-e2e-backups"
KEY = "nightly/app.sql.gz"


def _client(settings: S3Settings) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
    )


@pytest.fixture
def s3() -> Iterator[S3Settings]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = S3Settings(
        bucket=BUCKET,
        prefix="nightly/",
        suffix=".sql.gz",
        endpoint_url=f"http://{host}:{port}",
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
        addressing_style="path",
    )
    s3 = _client(settings)
    s3.create_bucket(Bucket=BUCKET)
    try:
        yield settings
    finally:
        # moto keeps its state per process, shared by every server: leave nothing behind.
        s3.delete_object(Bucket=BUCKET, Key=KEY)
        s3.delete_bucket(Bucket=BUCKET)
        server.stop()


SOURCE_SQL = [
    "CREATE ROLE app_owner NOLOGIN",
    "CREATE ROLE app_reader LOGIN PASSWORD 'dump-password-never-handed-out'",
    "CREATE DATABASE app OWNER app_owner",
]
APP_SQL = f"""
SET ROLE app_owner;
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items SELECT g, 'item-' || g FROM generate_series(1, {ROWS}) g;
GRANT SELECT ON items TO app_reader;
"""


async def _upload_dumpall(data_dir: pathlib.Path, s3: S3Settings) -> None:
    """The original's backup, made for real: ``pg_dumpall | gzip`` of a cluster whose one
    application database belongs to a NOLOGIN role, put where postgres-operator puts it."""
    # Its databases are postgres (with the login postgres, as on most servers) and app.
    local = LocalProvider(LocalSettings(data_dir=data_dir, user="postgres", database="postgres"))
    source = await local.create_volume("source", {})
    bin_dir = await local.bin_dir()
    psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]

    async def run(argv: list[str], database: str = "postgres") -> bytes:
        env = {**os.environ, **source.environ(), "PGDATABASE": database}
        done = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True)
        return done.stdout

    try:
        for statement in SOURCE_SQL:
            await run([*psql, "-c", statement])
        await run([*psql, "-c", APP_SQL], "app")
        dump = await run([str(bin_dir / "pg_dumpall")])
    finally:
        await local.destroy(Kind.VOLUME, "source")
        await local.aclose()
    _client(s3).put_object(Bucket=BUCKET, Key=KEY, Body=gzip.compress(dump))


async def test_if_a_backup_lands_in_s3_then_warm_pods_serve_it_each_lease_with_its_password(
    fake: FakeKubernetes,
    api_client: client.ApiClient,
    settings: KubernetesSettings,
    s3: S3Settings,
    data_dir: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    """If a real ``pg_dumpall | gzip`` arrives in S3, then the pool restores it with aldaas's
    engine in the restore Job (default settings), snapshots it and hands out pods of its one
    application database with its rows, owned by the dump's NOLOGIN role; if a leased pod is then deleted, then the lease answers at its new pod with what was
    written, with the same password. Each lease logs in with its own password (kept in its
    clone's Secret, not a superuser, acting as the dump's roles), which opens no other clone, not
    even a later one, and which a restarted broker finds again; a destroyed clone leaves no
    Secret behind."""
    local = LocalProvider(LocalSettings(data_dir=data_dir))
    await _upload_dumpall(data_dir / "source-cluster", s3)
    source = S3Source(s3)
    fake.kubelet = LocalKubelet(local, source, trio.lowlevel.current_trio_token(), tmp_path, fake)
    # Pod IPs are 127.0.0.x, all on the application port: take one that is free on every
    # address, so that another process on the host (or a second test run) cannot hold it.
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = int(probe.getsockname()[1])
    kube_settings = attrs.evolve(
        settings,
        ready_timeout_seconds=120.0,
        snapshot_timeout_seconds=120.0,
        application=ApplicationSettings(port=port, user="aldaas", database="aldaas"),
    )
    provider = KubernetesProvider(kube_settings, api_client)
    pool_settings = attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(size=2, max_provisioning=1, health_check_interval=0.5),
        source=SourceSettings(kind="s3", poll_interval=3600.0),
        s3=s3,
    )
    pool = Pool(pool_settings, provider, source)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            # Real PostgreSQL on two shared cores: generous, it only bounds a hang.
            await wait_until(lambda: pool.statistics().clones["warm"] == 2, seconds=180)
            (snapshot,) = pool.statistics().snapshots
            assert (snapshot.backup_key, snapshot.status) == (KEY, "ready")
            # What the engine reported in its termination message reached the snapshot.
            assert snapshot.database == "app"
            assert snapshot.tolerated is not None
            assert "aldaas_admin" in snapshot.tolerated  # the source's superuser's CREATE ROLE

            lease = await pool.acquire(labels={"test": "e2e"})
            assert lease.endpoint.host.startswith("127.0.0.")
            assert (lease.endpoint.port, lease.endpoint.database) == (port, "app")
            count = await trio.to_thread.run_sync(
                query, lease.endpoint, "SELECT count(*) FROM items"
            )
            assert count == [(ROWS,)]
            owner = "SELECT tableowner FROM pg_tables WHERE tablename = 'items'"
            assert await trio.to_thread.run_sync(query, lease.endpoint, owner) == [("app_owner",)]

            # The cluster holds the truth: a ready VolumeSnapshot, clone PVCs, one leased.
            snap = fake.get("volumesnapshots", "test", f"aldaas-{snapshot.name}")
            assert snap is not None
            assert snap["metadata"]["labels"]["status"] == "ready"
            jobs = [obj["metadata"]["name"] for plural, obj in fake.created if plural == "jobs"]
            restore_job = next(obj for plural, obj in fake.created if plural == "jobs")
            (restore,) = restore_job["spec"]["template"]["spec"]["containers"]
            assert restore["command"][:2] == ["aldaas", "restore-backup"]
            assert jobs == [f"aldaas-{snapshot.name}-restore", jobs[1]]
            assert jobs[1].endswith("-check")
            clones = await provider.list(Kind.CLONE)
            assert lease.clone in {c.name for c in clones}

            # The developer's data outlives the pod: evicted or deleted, it comes back on its PVC.
            await trio.to_thread.run_sync(
                query, lease.endpoint, "INSERT INTO items VALUES (-1, 'written during the lease')"
            )
            fake.remove("pods", "test", f"aldaas-{lease.clone}")
            await wait_until(lambda: _moved(pool, lease), seconds=120)
            moved = pool.lease(lease.id).endpoint
            rows = await trio.to_thread.run_sync(
                query, moved, "SELECT name FROM items WHERE id < 0"
            )
            assert rows == [("written during the lease",)]
            assert moved is not None
            assert moved.password == lease.endpoint.password  # the init container ran again
            await _check_credentials(pool, fake, kube_settings, api_client, pool.lease(lease.id))
            nursery.cancel_scope.cancel()
    finally:
        fake.controllers_enabled = False
        fake.kubelet.close()
        await local.aclose()
    assert fake.kubelet.failures == []


def _moved(pool: Pool, lease: Lease) -> bool:
    now = pool.lease(lease.id).endpoint
    return now is not None and lease.endpoint is not None and now.host != lease.endpoint.host


def _refused(endpoint: Endpoint, password: str | None) -> bool:
    """Whether ``endpoint``'s database refuses its login with ``password`` (a wrong password,
    not another failure)."""
    try:
        query(attrs.evolve(endpoint, password=password), "SELECT 1")
    except psycopg.OperationalError as exc:
        return "password authentication failed" in str(exc)
    return False


async def _check_credentials(
    pool: Pool,
    fake: FakeKubernetes,
    settings: KubernetesSettings,
    api_client: client.ApiClient,
    first: Lease,
) -> None:
    second = await pool.acquire(labels={"test": "e2e"})
    one, two = first.endpoint, second.endpoint
    assert one.password
    assert two.password
    assert one.password != two.password
    assert (one.user, two.user) == ("aldaas", "aldaas")
    assert await trio.to_thread.run_sync(_refused, two, one.password)
    assert await trio.to_thread.run_sync(_refused, one, two.password)
    # The login is not a superuser, yet acts as the dump's role that owns the table.
    login = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    assert await trio.to_thread.run_sync(query, one, login) == [(False,)]
    await trio.to_thread.run_sync(query, one, "ALTER TABLE items ADD COLUMN note text")
    # Only Secrets hold the passwords: no pod, Job or claim spec the API server stored.
    for plural, obj in fake.created:
        if plural != "secrets":
            text = json.dumps(obj)
            assert one.password not in text, plural
            assert two.password not in text, plural
    # A restarted broker finds each clone's password again in its Secret.
    restarted = KubernetesProvider(settings, api_client)
    try:
        found = {r.name: r.endpoint for r in await restarted.list(Kind.CLONE)}
    finally:
        await restarted.aclose()
    assert found[second.clone] == two
    # A released lease's clone goes with its Secret; its password opens no later clone.
    secret = manifests.object_name(settings, first.clone)
    assert fake.get("secrets", "test", secret) is not None
    await pool.release(first.id)
    await wait_until(lambda: fake.get("secrets", "test", secret) is None, seconds=60)
    await wait_until(lambda: pool.statistics().clones["warm"] == 2, seconds=180)
    later = await pool.acquire(labels={"test": "e2e"})
    assert await trio.to_thread.run_sync(_refused, later.endpoint, one.password)
    assert await trio.to_thread.run_sync(query, later.endpoint, "SELECT 1") == [(1,)]
