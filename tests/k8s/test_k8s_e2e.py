"""End to end on the Kubernetes provider: a backup in S3 becomes warm pods that answer queries,
and a leased one keeps its data when its pod is deleted.

The pool logic drives the Kubernetes provider, which only talks to the fake
API server; the fake's kubelet (k8s_local_kubelet.py) turns pods, snapshots
and Jobs into real PostgreSQL servers and processes through the local
provider, and the restore Job downloads the backup from moto's S3 server.
"""

from __future__ import annotations

import gzip
import pathlib
import socket
from collections.abc import Iterator

import attrs
import boto3
import pytest
import trio
from k8s_fake_api import FakeKubernetes, wait_until
from k8s_local_kubelet import LocalKubelet
from kubernetes import client
from moto.server import ThreadedMotoServer
from pg_query import query

from aldaas.pool import (
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
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import ApplicationSettings, KubernetesSettings

pytestmark = pytest.mark.slow

PASSWORD = "e2e-password-not-secret"
ROWS = 2000
BUCKET = "k8s-e2e-backups"


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
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=BUCKET)
    rows = b"".join(b"%d\titem-%d\n" % (i, i) for i in range(ROWS))
    dump = b"CREATE TABLE items (id int PRIMARY KEY, name text);\nCOPY items FROM stdin;\n"
    s3.put_object(
        Bucket=BUCKET, Key="nightly/app.sql.gz", Body=gzip.compress(dump + rows + b"\\.\n")
    )
    try:
        yield settings
    finally:
        # moto keeps its state per process, shared by every server: leave nothing behind.
        s3.delete_object(Bucket=BUCKET, Key="nightly/app.sql.gz")
        s3.delete_bucket(Bucket=BUCKET)
        server.stop()


async def test_if_a_backup_lands_in_s3_then_warm_pods_serve_it_through_kubernetes(
    fake: FakeKubernetes,
    api_client: client.ApiClient,
    settings: KubernetesSettings,
    s3: S3Settings,
    data_dir: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    """If a .sql.gz arrives in S3, then the pool restores, snapshots and hands out a pod with its
    rows; if that pod is then deleted, then the lease answers at its new pod with what was written."""
    local = LocalProvider(LocalSettings(data_dir=data_dir), lease_superuser=True)
    source = S3Source(s3)
    fake.kubelet = LocalKubelet(
        local, source, trio.lowlevel.current_trio_token(), tmp_path, ("aldaas", PASSWORD)
    )
    # Pod IPs are 127.0.0.x, all on the application port: take one that is free on every
    # address, so that another process on the host (or a second test run) cannot hold it.
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = int(probe.getsockname()[1])
    kube_settings = attrs.evolve(
        settings,
        ready_timeout_seconds=120.0,
        snapshot_timeout_seconds=120.0,
        application=ApplicationSettings(
            port=port, user="aldaas", database="aldaas", password=PASSWORD
        ),
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
            assert (snapshot.backup_key, snapshot.status) == ("nightly/app.sql.gz", "ready")

            lease = await pool.acquire(labels={"test": "e2e"})
            assert lease.endpoint.host.startswith("127.0.0.")
            assert lease.endpoint.port == port
            count = await trio.to_thread.run_sync(
                query, lease.endpoint, "SELECT count(*) FROM items"
            )
            assert count == [(ROWS,)]

            # The cluster holds the truth: a ready VolumeSnapshot, clone PVCs, one leased.
            snap = fake.get("volumesnapshots", "test", f"aldaas-{snapshot.name}")
            assert snap is not None
            assert snap["metadata"]["labels"]["status"] == "ready"
            jobs = [obj["metadata"]["name"] for plural, obj in fake.created if plural == "jobs"]
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
            await pool.release(lease.id)
            nursery.cancel_scope.cancel()
    finally:
        fake.controllers_enabled = False
        fake.kubelet.close()
        await local.aclose()
    assert fake.kubelet.failures == []


def _moved(pool: Pool, lease: Lease) -> bool:
    now = pool.lease(lease.id).endpoint
    return now is not None and lease.endpoint is not None and now.host != lease.endpoint.host
