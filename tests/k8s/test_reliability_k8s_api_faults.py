"""The Kubernetes API fails (5xx, dropped connections, lost replies, refusals) while the pool works.

Each test asserts that nothing was lost: ready snapshots and live leases
survive, no clone is handed out twice, nothing is left half-made once the API
recovers, and errors are one sentence without the API token.
"""

from __future__ import annotations

import socket
import threading

import attrs
import pytest
import trio
from faultproxy import FaultProxy
from k8s_fake_api import FakeKubernetes, Fault, JobOutcome
from k8s_reliability import (
    NEW,
    OLD,
    TOKEN,
    Backups,
    api_client,
    assert_nothing_leaked,
    history,
    objects,
    pool_settings,
    seed_ready_snapshot,
    until,
)
from structlog.testing import capture_logs

from aldaas.pool import Kind, KubernetesProvider, LeaderElector, Lease, Pool, TemporaryProviderError
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings, LeaderElectionSettings


def flaky(fake: FakeKubernetes) -> list[Fault]:
    """Every 5th request answered 503, every 7th 500, every 11th dropped unanswered, every
    13th done but its reply lost (about 4 in 10 fail): every kind of step meets every kind of
    failure, and a call's retries rarely all fail."""
    faults = [
        Fault(None, "/namespaces/", code=503, every=5, times=10**6),
        Fault(None, "/namespaces/", code=500, every=7, times=10**6),
        Fault(None, "/namespaces/", drop="before", every=11, times=10**6),
        Fault(None, "/namespaces/", drop="after", every=13, times=10**6),
    ]
    fake.faults.extend(faults)
    return faults


def assert_clean_errors(logs: list[dict[str, object]]) -> None:
    """Every error logged is one line, names no token, and does not dump objects."""
    for event in logs:
        for text in (str(value) for value in event.values()):
            assert TOKEN not in text, event
            assert "Bearer" not in text, event
        for key in ("error", "reason"):
            assert "\n" not in str(event.get(key, "")), event
            assert " object at 0x" not in str(event.get(key, "")), event


@pytest.mark.slow
async def test_if_the_api_fails_in_bursts_then_restore_snapshot_clone_and_claims_lose_nothing(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If 5xx answers, dropped connections and lost replies hit every step, then the pipeline
    ends ready, leases get distinct pods, and the cluster holds nothing half-made."""
    # About 4 requests in 10 fail: 10 attempts per call make a give-up rare (the pool would
    # retry the step, then record the snapshot failed after 3 give-ups in a row).
    settings = attrs.evolve(settings, api_retries=10)
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=2), provider, Backups([OLD, NEW]))
    faults = flaky(fake)
    leases: list[Lease] = []
    try:
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                # The old snapshot serves while the new backup is restored under the faults.
                async with trio.open_nursery() as racing:
                    for _ in range(4):
                        racing.start_soon(lambda: _take(pool, leases))
                await until(lambda: pool.statistics().snapshots_by_status["ready"] == 2)
                await until(lambda: pool.statistics().clones["warm"] == 2)
                async with trio.open_nursery() as racing:
                    for _ in range(3):
                        racing.start_soon(lambda: _take(pool, leases))
                await pool.release(leases[0].id)
                for fault in faults:
                    fault.times = 0  # the API recovers
                await assert_nothing_leaked(fake, pool, provider, warm=2)
                nursery.cancel_scope.cancel()
    finally:
        await provider.aclose()
        api.close()
    assert all(fault.hits > 0 for fault in faults), [f.hits for f in faults]
    assert len({lease.clone for lease in leases}) == len(leases) == 7
    live = {lease.id: lease.clone for lease in pool.leases()}
    assert live == {lease.id: lease.clone for lease in leases[1:]}
    retried = [e for e in logs if e["event"] == "kubernetes.api_retry"]
    assert len(retried) >= 10
    assert_clean_errors(logs)


async def _take(pool: Pool, leases: list[Lease]) -> None:
    leases.append(await pool.acquire(timeout=60))


@pytest.mark.slow
async def test_if_the_api_is_unreachable_mid_restore_then_the_pipeline_retries_and_leases_survive(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If every connection to the API is reset for a while during a restore, then the lease and
    the old snapshot survive, the restore is redone once the API is back, and nothing leaks."""
    hold = threading.Event()
    fake.job_rule = lambda job: JobOutcome(
        hold=hold if "restore" in job["metadata"]["name"] else None
    )
    async with trio.open_nursery() as outer:
        host, port = fake.url.removeprefix("http://").split(":")
        proxy = FaultProxy(host, int(port))
        await outer.start(proxy.run)
        api = api_client(f"http://127.0.0.1:{proxy.port}")
        provider = KubernetesProvider(settings, api)
        await seed_ready_snapshot(provider, "snap-old", OLD)
        pool = Pool(pool_settings(size=1), provider, Backups([OLD, NEW]))
        try:
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    await nursery.start(pool.run)
                    lease = await pool.acquire(timeout=30)
                    await until(lambda: any("restore" in n for n in objects(fake, "jobs")))
                    proxy.mode = "refuse"  # the API server is down: every connection is reset

                    def restore_gave_up() -> bool:
                        proxy.cut()  # also any connection accepted just before the outage
                        return any(e["event"] == "snapshot.retry_later" for e in logs)

                    await until(restore_gave_up)
                    proxy.mode = "pass"
                    hold.set()
                    await until(lambda: pool.statistics().snapshots_by_status["ready"] == 2)
                    await assert_nothing_leaked(fake, pool, provider, warm=1)
                    assert [held.id for held in pool.leases()] == [lease.id]
                    assert pool.verify_secret(lease.id, lease.secret or "")
                    clones = {r.name: r for r in await provider.list(Kind.CLONE)}
                    assert clones[lease.clone].meta["lease_id"] == lease.id
                    nursery.cancel_scope.cancel()
        finally:
            await provider.aclose()
            api.close()
        outer.cancel_scope.cancel()
    assert proxy.cuts >= 4
    errors = [str(e.get("error")) for e in logs if e["event"] == "kubernetes.api_gave_up"]
    assert errors
    assert not [e for e in errors if "did not answer" in e], errors  # nothing timed out here
    assert_clean_errors(logs)


async def test_if_the_api_refuses_connections_then_the_error_says_unreachable_not_slow(
    settings: KubernetesSettings,
) -> None:
    """If nothing listens at the API's address, then the error says it could not be reached (not
    that it did not answer in time), in one sentence without the token."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = api_client(f"http://127.0.0.1:{port}")
    provider = KubernetesProvider(settings, api)
    try:
        with pytest.raises(TemporaryProviderError) as caught:
            await provider.is_healthy("c")
    finally:
        await provider.aclose()
        api.close()
    message = str(caught.value)
    assert message == (
        f"the Kubernetes API at http://127.0.0.1:{port} could not be reached to read pod "
        '"aldaas-c" (Connection refused); retrying is safe.'
    )


@pytest.mark.slow
async def test_if_claims_lose_replies_while_two_replicas_race_then_no_pod_is_handed_out_twice(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If claims on two replicas meet lost replies, 503s and give-ups, then every lease has its
    own pod whose meta names it, and a failed claim leaves no pod behind once the API recovers."""
    settings = attrs.evolve(
        settings,
        leader_election=LeaderElectionSettings(
            lease_duration_seconds=1.0, renew_deadline_seconds=0.5, retry_period_seconds=0.1
        ),
    )
    names = ("broker-a", "broker-b")
    apis = [api_client(fake.url) for _ in names]
    providers = [
        KubernetesProvider(attrs.evolve(settings, identity=name), api)
        for name, api in zip(names, apis, strict=True)
    ]
    elector = LeaderElector(settings, apis[0], identity="broker-a")
    a, b = (Pool(pool_settings(size=3), p, Backups([OLD])) for p in providers)
    await seed_ready_snapshot(providers[0], "snap-old", OLD)
    faults = [
        Fault("PATCH", "/persistentvolumeclaims/", drop="after", every=3, times=10**6),
        Fault("PATCH", "/persistentvolumeclaims/", code=503, every=2, times=10**6),
    ]
    leases: list[Lease] = []
    try:
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(a.serve)
                await nursery.start(b.serve)
                nursery.start_soon(elector.serve, a.lead)
                await until(lambda: b.statistics().clones["warm"] == 3)
                fake.faults.extend(faults)
                async with trio.open_nursery() as racing:
                    for _ in range(4):
                        racing.start_soon(lambda: _take(a, leases))
                        racing.start_soon(lambda: _take(b, leases))
                for fault in faults:
                    fault.times = 0
                await assert_nothing_leaked(fake, a, providers[0], warm=3)
                clones = {r.name: r for r in await providers[0].list(Kind.CLONE)}
                for lease in leases:
                    held = clones.get(lease.clone)
                    holder = held.meta.get("lease_id") if held is not None else None
                    assert holder == lease.id, (lease.id, history(fake, lease.clone))
                nursery.cancel_scope.cancel()
    finally:
        for provider in providers:
            await provider.aclose()
        for api in apis:
            api.close()
    assert all(fault.hits > 0 for fault in faults), [f.hits for f in faults]
    assert len({lease.clone for lease in leases}) == len(leases) == 8
    assert_clean_errors(logs)
