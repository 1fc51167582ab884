"""Leader election among broker replicas with a coordination.k8s.io/v1 Lease."""

from __future__ import annotations

import math

import pytest
import trio
from k8s_fake_api import FakeKubernetes, Fault, wait_until
from kubernetes import client

from aldaas.pool.providers.kubernetes._leader import LeaderElector, LeaseRecord, may_take_lease
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

NS = "test"


def record(holder: str, duration: float = 15.0) -> LeaseRecord:
    return LeaseRecord(
        holder=holder, duration_seconds=duration, renew_time="", transitions=0, version="1"
    )


@pytest.mark.parametrize(
    ("lease", "observed_at", "now", "expected"),
    [
        (None, -math.inf, 0.0, True),
        (record(""), 100.0, 100.0, True),
        (record("me"), 100.0, 100.0, True),
        (record("other"), 100.0, 114.9, False),
        (record("other"), 100.0, 115.0, True),
        (record("other", duration=0), 100.0, 109.0, False),
        (record("other", duration=0), 100.0, 110.0, True),
    ],
)
def test_if_the_holder_was_last_seen_renewing_within_its_duration_then_nobody_else_may_take_it(
    lease: LeaseRecord | None, observed_at: float, now: float, expected: bool
) -> None:
    """If another holder's record changed less than its duration ago, then the lease is not free."""
    assert may_take_lease(lease, "me", observed_at, now, default_duration=10.0) is expected


def lease_holder(fake: FakeKubernetes, settings: KubernetesSettings) -> str:
    lease = fake.get("leases", NS, settings.leader_election.lease_name)
    assert lease is not None
    return str(lease["spec"]["holderIdentity"])


@pytest.mark.slow
async def test_if_the_leader_stops_renewing_then_the_other_replica_takes_over(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the leader dies without releasing, then the follower leads once the lease has expired."""
    a = LeaderElector(settings, api_client, identity="a", release_on_exit=False)
    b = LeaderElector(settings, api_client, identity="b")
    running: list[str] = []

    def work(name: str):  # type: ignore[no-untyped-def]
        async def while_leader() -> None:
            running.append(name)
            try:
                await trio.sleep_forever()
            finally:
                running.remove(name)

        return while_leader

    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def run_a() -> None:
            with a_scope:
                await a.serve(work("a"))

        nursery.start_soon(run_a)
        await a.wait_elected()
        await nursery.start(b.serve, work("b"))
        await trio.sleep(settings.leader_election.retry_period_seconds * 3)  # b retries: follows
        assert (a.is_leader, b.is_leader, running) == (True, False, ["a"])

        a_scope.cancel()  # a "crashes": no release, the lease must expire first
        await b.wait_elected()
        await wait_until(lambda: running == ["b"])
        assert (a.is_leader, b.is_leader) == (False, True)
        assert lease_holder(fake, settings) == "b"
        nursery.cancel_scope.cancel()
    lease = fake.get("leases", NS, settings.leader_election.lease_name)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == ""  # b released it on the way out
    assert lease["spec"]["leaseTransitions"] == 1


@pytest.mark.slow
async def test_if_the_leader_cannot_renew_then_it_steps_down_and_stops_its_work(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If renewals fail past renew_deadline, then the leader cancels its work and stops leading."""
    elector = LeaderElector(settings, api_client, identity="a")
    cancelled = trio.Event()

    async def while_leader() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(elector.serve, while_leader)
        await elector.wait_elected()
        fault = Fault("PATCH", "/leases/", code=500, times=10_000)
        fake.faults.append(fault)
        await cancelled.wait()
        assert elector.is_leader is False
        fault.times = 0  # the API recovers: the same replica is elected again
        await elector.wait_elected()
        assert elector.transitions == 2
        nursery.cancel_scope.cancel()


async def test_if_the_leader_exits_cleanly_then_it_releases_the_lease(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the leader's serve() is cancelled, then the Lease names no holder and a follower may take it."""
    elector = LeaderElector(settings, api_client, identity="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(elector.serve)
        await elector.wait_elected()
        assert lease_holder(fake, settings) == "a"
        nursery.cancel_scope.cancel()
    assert lease_holder(fake, settings) == ""
    follower = LeaderElector(settings, api_client, identity="b")
    async with trio.open_nursery() as nursery:
        await nursery.start(follower.serve)
        with trio.fail_after(settings.leader_election.lease_duration_seconds / 2):
            await follower.wait_elected()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_if_the_lease_has_fields_this_client_does_not_know_then_election_still_works(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If a newer server or a webhook put fields the client does not know on the Lease, and a
    value of the wrong type, then a replica still takes the expired Lease and keeps those fields."""
    name = settings.leader_election.lease_name
    stale = {
        "metadata": {"name": name, "annotations": {"webhook.example/seen": "1"}},
        "spec": {
            "holderIdentity": "gone",
            "leaseDurationSeconds": "one",  # not a number: treated as unknown, not a crash
            "leaseTransitions": 3,
            "renewTime": "2026-01-01T00:00:00.000000Z",
            "strategyOfTheFuture": {"kind": "Newest"},
        },
    }
    fake.put("coordination.k8s.io", "leases", NS, stale)
    elector = LeaderElector(settings, api_client, identity="broker-0", release_on_exit=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(elector.serve)
        with trio.fail_after(10):
            await elector.wait_elected()
        nursery.cancel_scope.cancel()
    lease = fake.get("leases", NS, name)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "broker-0"
    assert lease["spec"]["leaseTransitions"] == 4
    assert lease["spec"]["strategyOfTheFuture"] == {"kind": "Newest"}
    assert lease["metadata"]["annotations"] == {"webhook.example/seen": "1"}
