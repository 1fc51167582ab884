"""A clone's pod dies (deleted, or its container crashes) during a lease, or while warm."""

from __future__ import annotations

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes
from k8s_reliability import (
    NS,
    OLD,
    Backups,
    api_client,
    assert_nothing_leaked,
    objects,
    pool_settings,
    seed_ready_snapshot,
    until,
)

from aldaas.pool import KubernetesProvider, LeaderElector, Lease, LeaseInfo, Pool
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings, LeaderElectionSettings

pytestmark = pytest.mark.slow


def crash(fake: FakeKubernetes, clone: str) -> None:
    """The database container crashes and the kubelet backs off restarting it: not Ready."""
    fake.update_status(
        "pods",
        NS,
        f"aldaas-{clone}",
        {
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "database",
                    "ready": False,
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                }
            ],
        },
    )


def info(pool: Pool, lease: Lease) -> LeaseInfo:
    (found,) = [held for held in pool.statistics().leases if held.id == lease.id]
    return found


async def test_if_a_leased_pod_dies_then_the_lease_is_unhealthy_until_reset_and_warm_ones_are_replaced(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If one leased pod is deleted and another's container crashes, then both leases show
    unhealthy, reset gives each a working pod under the same id, and a deleted warm pod is
    replaced; nothing is left behind."""
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=2), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            deleted, crashed = await pool.acquire(timeout=30), await pool.acquire(timeout=30)
            fake.remove("pods", NS, f"aldaas-{deleted.clone}")
            crash(fake, crashed.clone)
            await until(lambda: not info(pool, deleted).healthy and not info(pool, crashed).healthy)
            for lease in (deleted, crashed):
                reset = await pool.reset(lease.id, timeout=30)
                assert (reset.id, info(pool, lease).healthy) == (lease.id, True)
                assert reset.clone != lease.clone
                assert pool.verify_secret(lease.id, lease.secret or "")

            await until(lambda: pool.statistics().clones["warm"] == 2)
            (victim, *_) = (r for r in objects(fake, "pods") if r not in _leased_pods(pool))
            fake.remove("pods", NS, victim)
            await until(lambda: victim not in objects(fake, "persistentvolumeclaims"))
            await assert_nothing_leaked(fake, pool, provider, warm=2)
            for old in (deleted.clone, crashed.clone):
                assert f"aldaas-{old}" not in objects(fake, "persistentvolumeclaims")
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()


def _leased_pods(pool: Pool) -> set[str]:
    return {f"aldaas-{lease.clone}" for lease in pool.leases()}


async def test_if_a_pod_leased_on_a_follower_dies_then_the_follower_reports_it_too(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If the pod of a lease handed out by a follower replica dies, then the follower (which the
    lease's client talks to) shows the lease unhealthy, not only the leader, and reset heals it."""
    settings = attrs.evolve(
        settings,
        leader_election=LeaderElectionSettings(
            lease_duration_seconds=1.0, renew_deadline_seconds=0.5, retry_period_seconds=0.1
        ),
    )
    apis = [api_client(fake.url) for _ in range(2)]
    providers = [
        KubernetesProvider(attrs.evolve(settings, identity=name), api)
        for name, api in zip(("broker-a", "broker-b"), apis, strict=True)
    ]
    elector = LeaderElector(settings, apis[0], identity="broker-a")
    leader, follower = (Pool(pool_settings(size=2), p, Backups([OLD])) for p in providers)
    await seed_ready_snapshot(providers[0], "snap-old", OLD)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(leader.serve)
            await nursery.start(follower.serve)
            nursery.start_soon(elector.serve, leader.lead)
            await until(lambda: follower.statistics().clones["warm"] == 2)
            lease = await follower.acquire(timeout=30)
            fake.remove("pods", NS, f"aldaas-{lease.clone}")
            await until(lambda: not info(follower, lease).healthy)
            reset = await follower.reset(lease.id, timeout=30)
            assert reset.clone != lease.clone
            await until(lambda: info(follower, lease).healthy)
            nursery.cancel_scope.cancel()
    finally:
        for provider in providers:
            await provider.aclose()
        for api in apis:
            api.close()


async def test_if_a_warm_pod_vanishes_before_a_health_check_then_a_view_refresh_destroys_its_pvc(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If a warm clone's pod is deleted (eviction, node loss) and a view refresh sees it before
    any health check does, then its PVC is destroyed and a replacement made, not left behind."""
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    no_health_checks = attrs.evolve(
        pool_settings(size=2),
        pool=attrs.evolve(pool_settings().pool, size=2, health_check_interval=3600.0),
    )
    pool = Pool(no_health_checks, provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await until(lambda: pool.statistics().clones["warm"] == 2)
            victim = sorted(objects(fake, "pods"))[0]
            fake.remove("pods", NS, victim)
            await pool.refresh_view()
            await until(lambda: victim not in objects(fake, "persistentvolumeclaims"), 10)
            await assert_nothing_leaked(fake, pool, provider, warm=2)
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()
