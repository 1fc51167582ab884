"""Two broker replicas (two providers, two pools, two LeaderElectors) on one fake API server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes, wait_until
from kubernetes import client

from aldaas.pool import (
    Backup,
    Kind,
    KubernetesProvider,
    LeaderElector,
    Lease,
    Pool,
    PoolSettings,
    WarmPoolSettings,
)
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

BACKUP = Backup(key="dumps/nightly.sql.gz", etag="etag-1", size=1000, modified=1.0)


@attrs.frozen
class OneBackup:
    """A source whose only backup is already a ready snapshot: no restore runs."""

    description: str = "s3://backups/dumps"

    async def list_backups(self) -> Sequence[Backup]:
        await trio.lowlevel.checkpoint()
        return [BACKUP]

    def open(self, backup: Backup) -> AsyncIterator[bytes]:
        raise AssertionError("the snapshot exists: nothing should be restored")


def _api_client(fake: FakeKubernetes) -> client.ApiClient:
    """One replica's own client (its own connection pool), configured as conftest's."""
    configuration = client.Configuration(host=fake.url)
    configuration.connection_pool_maxsize = 4
    configuration.retries = False
    return client.ApiClient(configuration)


async def _seed_ready_snapshot(provider: KubernetesProvider) -> None:
    now = time.time()
    await provider.create_volume("snap-seed", {"status": "restoring"})
    await provider.seal(
        "snap-seed",
        "snap-seed",
        {
            "status": "ready",
            "snapshot": "snap-seed",
            "backup_key": BACKUP.key,
            "backup_etag": BACKUP.etag,
            "backup_modified": "1.000",
            "created": f"{now:.3f}",
            "ready_at": f"{now:.3f}",
        },
    )


async def _warm(provider: KubernetesProvider) -> int:
    clones = await provider.list(Kind.CLONE)
    return sum(1 for r in clones if r.meta.get("status") == "warm" and r.endpoint is not None)


async def _at_least_warm(provider: KubernetesProvider, count: int) -> bool:
    return await _warm(provider) >= count


async def _gone(provider: KubernetesProvider, clone: str) -> bool:
    return clone not in {r.name for r in await provider.list(Kind.CLONE)}


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll the cluster until ``check()`` holds (the caller's fail_after bounds it)."""
    while True:
        if await check():
            return
        await trio.sleep(0.05)


@pytest.mark.slow
async def test_if_two_replicas_serve_and_the_leader_leaves_then_hand_outs_stay_exactly_once(
    settings: KubernetesSettings, fake: FakeKubernetes
) -> None:
    """If two replicas hand out from one cluster and the leader leaves, then every lease has its
    own pod, leases survive, and the other replica refills as the new leader."""
    clients = [_api_client(fake), _api_client(fake)]
    providers = [
        KubernetesProvider(attrs.evolve(settings, identity=name), api)
        for name, api in zip(("broker-a", "broker-b"), clients, strict=True)
    ]
    electors = [
        LeaderElector(settings, api, identity=name)
        for name, api in zip(("broker-a", "broker-b"), clients, strict=True)
    ]
    pool_settings = attrs.evolve(
        PoolSettings(), pool=WarmPoolSettings(size=2, max_provisioning=2, refresh_interval=0.2)
    )
    a, b = (Pool(pool_settings, p, OneBackup()) for p in providers)
    await _seed_ready_snapshot(providers[0])
    leases: list[Lease] = []

    async def take(pool_: Pool) -> None:
        leases.append(await pool_.acquire(timeout=30))

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(a.serve)
                await nursery.start(b.serve)
                a_scope = trio.CancelScope()

                async def run_a() -> None:
                    with a_scope:
                        await electors[0].serve(a.lead)

                nursery.start_soon(run_a)
                await electors[0].wait_elected()
                await nursery.start(electors[1].serve, b.lead)
                await wait_until(lambda: a.leading)
                assert not b.leading
                async with trio.open_nursery() as racing:
                    for _ in range(2):
                        racing.start_soon(take, a)
                        racing.start_soon(take, b)

                a_scope.cancel()  # the leader's pod goes away (it releases the Lease)
                await electors[1].wait_elected()
                await wait_until(lambda: b.leading and not a.leading)
                async with trio.open_nursery() as racing:
                    racing.start_soon(take, a)
                    racing.start_soon(take, b)
                await _until(lambda: _at_least_warm(providers[1], 2))  # the new leader refills

                assert len({lease.clone for lease in leases}) == len(leases) == 6
                clones = {r.name: r for r in await providers[1].list(Kind.CLONE)}
                for lease in leases:
                    assert clones[lease.clone].meta["lease_id"] == lease.id
                    assert clones[lease.clone].meta["status"] == "leased"
                first = leases[0]
                await b.release(first.id)  # handed out by either replica, released on b
                await _until(lambda: _gone(providers[0], first.clone))
                nursery.cancel_scope.cancel()
    finally:
        for provider in providers:
            await provider.aclose()
        for api in clients:
            api.close()
