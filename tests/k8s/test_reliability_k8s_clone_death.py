"""A clone's pod dies (deleted, or its container crashes) during a lease, or while warm."""

from __future__ import annotations

import json

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
from kubernetes import client

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


def evict(fake: FakeKubernetes, clone: str) -> None:
    """The kubelet evicts the pod (node pressure): it stays, stopped, as phase Failed."""
    fake.update_status(
        "pods",
        NS,
        f"aldaas-{clone}",
        {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "The node was low on resource: ephemeral-storage.",
            "conditions": [{"type": "Ready", "status": "False"}],
        },
    )


async def drain(api: client.ApiClient, pod: str) -> tuple[int, str] | None:
    """Evict ``pod`` as ``kubectl drain`` does; the refusal's status and message, if refused."""
    body = client.V1Eviction(
        api_version="policy/v1", kind="Eviction", metadata=client.V1ObjectMeta(name=pod)
    )
    try:
        await trio.to_thread.run_sync(
            lambda: client.CoreV1Api(api).create_namespaced_pod_eviction(pod, NS, body)
        )
    except client.ApiException as exc:
        return exc.status, json.loads(exc.body)["message"]
    return None


def uid(fake: FakeKubernetes, plural: str, clone: str) -> str | None:
    found = fake.get(plural, NS, f"aldaas-{clone}")
    return None if found is None else str(found["metadata"]["uid"])


def pod_ip(fake: FakeKubernetes, clone: str) -> str | None:
    found = fake.get("pods", NS, f"aldaas-{clone}")
    return None if found is None else (found.get("status") or {}).get("podIP")


def pvc_deletions(fake: FakeKubernetes, clone: str) -> list[int]:
    return [
        rv
        for rv, plural, kind, obj in fake.events
        if plural == "persistentvolumeclaims"
        and kind == "DELETED"
        and obj["metadata"]["name"] == f"aldaas-{clone}"
    ]


def running_again(fake: FakeKubernetes, pool: Pool, lease: Lease, old_pod: str | None) -> bool:
    """The lease's clone has a new pod, Ready, and the pool gives the lease its address."""
    now = pool.lease(lease.id).endpoint
    new_pod = uid(fake, "pods", lease.clone)
    return (
        new_pod not in (None, old_pod)
        and now is not None
        and now.host == pod_ip(fake, lease.clone)
        and info(pool, lease).healthy
    )


async def test_if_a_leased_pod_is_deleted_or_evicted_then_the_lease_gets_a_pod_on_the_same_pvc(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If one leased pod is deleted (node loss, `kubectl delete pod`) and another is evicted,
    then each lease gets a new pod on the same PVC, never deleted, at the new pod's address,
    under the same id, secret and clone, without a reset; and each leased pod is covered by a
    PodDisruptionBudget of its own, so a drain's eviction is refused for it (a warm pod's is
    accepted, and the pool replaces it), gone with its lease."""
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=2), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            deleted, evicted = await pool.acquire(timeout=30), await pool.acquire(timeout=30)
            pvcs = {
                lease.clone: uid(fake, "persistentvolumeclaims", lease.clone)
                for lease in (deleted, evicted)
            }
            old_pods = {lease.clone: uid(fake, "pods", lease.clone) for lease in (deleted, evicted)}
            fake.remove("pods", NS, f"aldaas-{deleted.clone}")
            evict(fake, evicted.clone)
            for lease in (deleted, evicted):
                await until(
                    lambda lease=lease: running_again(fake, pool, lease, old_pods[lease.clone])
                )
                assert uid(fake, "persistentvolumeclaims", lease.clone) == pvcs[lease.clone]
                assert pvc_deletions(fake, lease.clone) == []
                assert pool.lease(lease.id).clone == lease.clone
                assert info(pool, lease).resets == 0
                assert pool.verify_secret(lease.id, lease.secret or "")

            pods = objects(fake, "pods")
            for lease in (deleted, evicted):
                await until(
                    lambda lease=lease: uid(fake, "poddisruptionbudgets", lease.clone) is not None
                )
                budget = fake.get("poddisruptionbudgets", NS, f"aldaas-{lease.clone}")
                assert budget is not None
                assert budget["spec"]["minAvailable"] == 1
                wanted = budget["spec"]["selector"]["matchLabels"]
                covered = [n for n, labels in pods.items() if wanted.items() <= labels.items()]
                assert covered == [f"aldaas-{lease.clone}"]

            # kubectl drain: warm pods are evicted (and replaced), leased ones refused.
            (warm, *_) = (n for n in objects(fake, "pods") if n not in _leased_pods(pool))
            assert await drain(api, warm) is None
            assert await drain(api, f"aldaas-{deleted.clone}") == (
                429,
                "Cannot evict pod as it would violate the pod's disruption budget.",
            )
            await until(lambda: pool.statistics().clones["warm"] == 2)
            for lease in (deleted, evicted):
                await pool.release(lease.id)
            await assert_nothing_leaked(fake, pool, provider, warm=2)
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()


async def test_if_a_leased_database_crashes_then_the_lease_is_unhealthy_until_reset(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If a leased pod's container crash-loops (the pod stays, its data is fine), then the lease
    shows unhealthy and the broker leaves the pod to the kubelet; reset gives a working pod under
    the same id, and a deleted warm pod is replaced; nothing is left behind."""
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=2), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            crashed = await pool.acquire(timeout=30)
            pod = uid(fake, "pods", crashed.clone)
            crash(fake, crashed.clone)
            await until(lambda: not info(pool, crashed).healthy)
            assert pool.lease(crashed.id).endpoint is None  # no new connection to a dead address
            assert uid(fake, "pods", crashed.clone) == pod
            reset = await pool.reset(crashed.id, timeout=30)
            assert (reset.id, info(pool, crashed).healthy) == (crashed.id, True)
            assert reset.clone != crashed.clone
            assert pool.verify_secret(crashed.id, crashed.secret or "")

            await until(lambda: pool.statistics().clones["warm"] == 2)
            (victim, *_) = (r for r in objects(fake, "pods") if r not in _leased_pods(pool))
            fake.remove("pods", NS, victim)
            await until(lambda: victim not in objects(fake, "persistentvolumeclaims"))
            await assert_nothing_leaked(fake, pool, provider, warm=2)
            assert f"aldaas-{crashed.clone}" not in objects(fake, "persistentvolumeclaims")
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()


def _leased_pods(pool: Pool) -> set[str]:
    return {f"aldaas-{lease.clone}" for lease in pool.leases()}


async def test_if_a_pod_leased_on_a_follower_dies_then_the_follower_reports_it_too(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If the database of a lease handed out by a follower replica crashes, then the follower
    (which the lease's client talks to) shows the lease unhealthy, not only the leader, and reset
    heals it; if another such lease's pod is deleted, then the leader starts it again and the
    follower sends the lease's connections to the new pod's address."""
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
            lease, moved = await follower.acquire(timeout=30), await follower.acquire(timeout=30)
            crash(fake, lease.clone)
            await until(lambda: not info(follower, lease).healthy)
            reset = await follower.reset(lease.id, timeout=30)
            assert reset.clone != lease.clone
            await until(lambda: info(follower, lease).healthy)

            old_pod = uid(fake, "pods", moved.clone)
            fake.remove("pods", NS, f"aldaas-{moved.clone}")
            await until(lambda: running_again(fake, follower, moved, old_pod))
            assert running_again(fake, leader, moved, old_pod)
            assert pvc_deletions(fake, moved.clone) == []
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


async def _leased_then_pod_gone(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> tuple[Lease, str | None, str | None]:
    """A broker hands out a lease and stops (crash, upgrade) with the lease alive; then the
    lease's pod is deleted while no broker runs. Returns the lease and its PVC's and pod's uids."""
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=1), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            lease = await pool.acquire(timeout=30)
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()
    pvc, pod = uid(fake, "persistentvolumeclaims", lease.clone), uid(fake, "pods", lease.clone)
    fake.remove("pods", NS, f"aldaas-{lease.clone}")
    return lease, pvc, pod


async def test_if_the_broker_restarts_while_a_leased_pod_is_gone_then_the_lease_and_its_pvc_live(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If a broker restarts while a lease lives and the lease's pod is gone, then the new broker
    adopts the lease (same id and secret), never deletes its PVC, and gives it a pod again."""
    lease, pvc, pod = await _leased_then_pod_gone(fake, settings)
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    pool = Pool(pool_settings(size=1), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert pool.verify_secret(lease.id, lease.secret or "")
            await until(lambda: running_again(fake, pool, lease, pod))
            assert uid(fake, "persistentvolumeclaims", lease.clone) == pvc
            assert pvc_deletions(fake, lease.clone) == []
            await pool.release(lease.id)
            await assert_nothing_leaked(fake, pool, provider, warm=1)
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()


async def test_if_a_new_leader_takes_over_while_a_leased_pod_is_gone_then_the_pvc_lives(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If a replica starts and takes the leadership over while a lease lives and its pod is gone,
    then its take-over does not destroy the lease's PVC as "leased, nobody holds": the lease is
    kept and gets its pod again."""
    settings = attrs.evolve(
        settings,
        leader_election=LeaderElectionSettings(
            lease_duration_seconds=1.0, renew_deadline_seconds=0.5, retry_period_seconds=0.1
        ),
    )
    lease, pvc, pod = await _leased_then_pod_gone(fake, settings)
    api = api_client(fake.url)
    provider = KubernetesProvider(attrs.evolve(settings, identity="broker-b"), api)
    elector = LeaderElector(settings, api, identity="broker-b")
    pool = Pool(pool_settings(size=1), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            nursery.start_soon(elector.serve, pool.lead)
            await until(lambda: pool.leading)
            await until(lambda: running_again(fake, pool, lease, pod))
            assert pool.verify_secret(lease.id, lease.secret or "")
            assert uid(fake, "persistentvolumeclaims", lease.clone) == pvc
            assert pvc_deletions(fake, lease.clone) == []
            nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()
