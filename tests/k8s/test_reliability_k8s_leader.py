"""The leader replica dies or hangs: the other replica takes over, and nothing is lost or doubled.

Election runs on real (short) durations against the fake API: the tests wait
for events and assert orders (who leads when), never how long anything took.
"""

from __future__ import annotations

import threading

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes, Fault, JobOutcome
from k8s_reliability import (
    NEW,
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

from aldaas.pool import Kind, KubernetesProvider, LeaderElector, Lease, Pool
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings, LeaderElectionSettings

pytestmark = pytest.mark.slow

ELECTION = LeaderElectionSettings(
    lease_duration_seconds=1.0, renew_deadline_seconds=0.5, retry_period_seconds=0.1
)


def _holder(fake: FakeKubernetes) -> str:
    lease = fake.get("leases", NS, ELECTION.lease_name)
    assert lease is not None
    return str(lease["spec"]["holderIdentity"])


async def test_if_the_leader_dies_mid_restore_then_the_follower_cleans_up_and_keeps_every_lease(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If the leading replica vanishes while its restore Job runs (Lease not released), then the
    other replica leads once the Lease expires, removes the half-made volume and Job, restores
    again, keeps both replicas' leases and never hands a pod out twice."""
    settings = attrs.evolve(settings, leader_election=ELECTION)
    hold = threading.Event()  # broker-a's restore Job never finishes: broker-a dies first

    def job_rule(job: dict[str, object]) -> JobOutcome:
        annotations = job["metadata"]["annotations"]  # type: ignore[index]
        held = annotations["aldaas.io/created-by"] == "broker-a"  # type: ignore[index]
        return JobOutcome(hold=hold if held else None)

    fake.job_rule = job_rule
    names = ("broker-a", "broker-b")
    apis = [api_client(fake.url) for _ in names]
    providers = [
        KubernetesProvider(attrs.evolve(settings, identity=name), api)
        for name, api in zip(names, apis, strict=True)
    ]
    a_elector = LeaderElector(settings, apis[0], identity="broker-a", release_on_exit=False)
    b_elector = LeaderElector(settings, apis[1], identity="broker-b")
    a, b = (Pool(pool_settings(size=2), p, Backups([OLD, NEW])) for p in providers)
    await seed_ready_snapshot(providers[0], "snap-old", OLD)
    leases: list[Lease] = []
    try:
        async with trio.open_nursery() as nursery:
            a_scope = trio.CancelScope()

            async def run_a() -> None:
                with a_scope:
                    async with trio.open_nursery() as replica:
                        await replica.start(a.serve)
                        replica.start_soon(a_elector.serve, a.lead)
                        await trio.sleep_forever()

            nursery.start_soon(run_a)
            await a_elector.wait_elected()
            await nursery.start(b.serve)
            await nursery.start(b_elector.serve, b.lead)
            await until(lambda: a.statistics().clones["warm"] == 2)
            restore_job = await _restore_job(fake)
            leases.append(await a.acquire(timeout=30))
            leases.append(await b.acquire(timeout=30))
            assert not b.leading

            a_scope.cancel()  # broker-a's pod is gone: no release, no cleanup
            assert _holder(fake) == "broker-a"
            assert restore_job in objects(fake, "jobs")
            await b_elector.wait_elected()
            await until(lambda: b.leading)
            await until(lambda: restore_job not in objects(fake, "jobs"))
            await until(lambda: b.statistics().snapshots_by_status["ready"] == 2)
            await until(lambda: b.statistics().clones["warm"] == 2)
            async with trio.open_nursery() as racing:
                for _ in range(3):
                    racing.start_soon(lambda: _take(b, leases))
            await assert_nothing_leaked(fake, b, providers[1], warm=2)
            live = {lease.id: lease.clone for lease in b.leases()}
            assert live == {lease.id: lease.clone for lease in leases}
            for lease in leases[:2]:  # handed out by each replica before the failover
                assert b.verify_secret(lease.id, lease.secret or "")
            nursery.cancel_scope.cancel()
    finally:
        hold.set()
        for provider in providers:
            await provider.aclose()
        for api in apis:
            api.close()
    assert len({lease.clone for lease in leases}) == len(leases) == 5
    assert not any(restore_job.startswith(name) for name in objects(fake, "persistentvolumeclaims"))


async def _restore_job(fake: FakeKubernetes) -> str:
    await until(lambda: any(name.endswith("-restore") for name in objects(fake, "jobs")))
    return next(name for name in objects(fake, "jobs") if name.endswith("-restore"))


async def _take(pool: Pool, leases: list[Lease]) -> None:
    leases.append(await pool.acquire(timeout=60))


async def test_if_the_leaders_renewals_hang_then_it_steps_down_before_the_other_takes_over(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If the leader's Lease updates hang in the API (no answer, no error), then it stops leading
    within its renew deadline, so at no moment do two replicas lead."""
    settings = attrs.evolve(settings, leader_election=ELECTION, request_timeout_seconds=30.0)
    apis = [api_client(fake.url) for _ in range(2)]
    a = LeaderElector(settings, apis[0], identity="a", release_on_exit=False)
    b = LeaderElector(settings, apis[1], identity="b")
    leading: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    def work(name: str):  # type: ignore[no-untyped-def]
        async def while_leader() -> None:
            leading.append(name)
            if len(leading) > 1:
                overlaps.append(tuple(leading))
            try:
                await trio.sleep_forever()
            finally:
                leading.remove(name)

        return while_leader

    hang = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve, work("a"))
            await a.wait_elected()
            await nursery.start(b.serve, work("b"))
            fake.faults.append(
                Fault(
                    "PATCH",
                    "/leases/",
                    code=None,
                    hold=hang,
                    times=10**6,
                    body_contains=b'"holderIdentity": "a"',
                )
            )
            await b.wait_elected()
            assert not a.is_leader
            await until(lambda: leading == ["b"])
            nursery.cancel_scope.cancel()
    finally:
        hang.set()
        for api in apis:
            api.close()
    assert overlaps == []


async def test_if_a_clone_left_provisioning_is_claimed_before_the_new_leader_cleans_it_then_it_stays(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If a new leader lists a clone as half-made, and before it cleans up a former leader's late
    publish and a claim land on it, then the clean-up's compare-and-set fails and the pod stays."""
    settings = attrs.evolve(settings, leader_election=ELECTION)
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    await provider.clone(
        "snap-old", "clone-late", {"status": "provisioning", "snapshot": "snap-old"}
    )
    held = threading.Event()
    cleanup = Fault("PATCH", "/persistentvolumeclaims/aldaas-clone-late", code=None, hold=held)
    fake.faults.append(cleanup)
    elector = LeaderElector(settings, api, identity="broker-b")
    pool = Pool(pool_settings(size=0), provider, Backups([OLD]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            nursery.start_soon(elector.serve, pool.lead)
            await until(lambda: cleanup.hits == 1)  # the new leader's clean-up write, held
            other = KubernetesProvider(attrs.evolve(settings, identity="broker-a"), api)
            await other.set_meta(
                Kind.CLONE,
                "clone-late",
                {"status": "leased", "snapshot": "snap-old", "lease_id": "l1"},
            )
            held.set()
            await until(lambda: pool.leading)
            for _ in range(2):  # what the new leader's view loop does next
                await pool.refresh_view()
            assert "aldaas-clone-late" in objects(fake, "persistentvolumeclaims")
            assert "aldaas-clone-late" in objects(fake, "pods")
            nursery.cancel_scope.cancel()
    finally:
        held.set()
        await provider.aclose()
        api.close()
