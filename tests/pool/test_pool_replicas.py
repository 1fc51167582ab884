"""Several broker replicas over one provider: exactly-once hand-out, followers and a leader."""

from __future__ import annotations

import pytest
import trio
from pool_fakes import FakeSource, FakeWorld, replica, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    CloneProvisioned,
    Kind,
    Lease,
    LeaseEnded,
    LeaseNotFoundError,
    LeaseSettings,
    Pool,
    WarmPoolSettings,
)

SHARED = settings(
    pool=WarmPoolSettings(size=3, max_provisioning=2, refresh_interval=5.0),
    lease=LeaseSettings(ttl=30.0),
)
SLOW_VIEW = settings(
    pool=WarmPoolSettings(size=3, max_provisioning=2, refresh_interval=3600.0),
    lease=LeaseSettings(ttl=30.0),
)
"""Views refresh only on demand here: the leader learns of activity only by its TTL's re-read."""


def _source() -> FakeSource:
    source = FakeSource()
    source.put("nightly.sql", b"CREATE TABLE t (i int);\n" * 100, modified=1.0)
    return source


def _warm_in(world: FakeWorld) -> list[str]:
    return [r.name for r in world.of(Kind.CLONE) if r.meta.get("status") == "warm" and r.running]


def _assert_leases_hold(world: FakeWorld, leases: list[Lease]) -> None:
    """Every lease has its own clone, and that clone's meta names that lease."""
    assert len({lease.id for lease in leases}) == len(leases)
    assert len({lease.clone for lease in leases}) == len(leases), "a clone was handed out twice"
    for lease in leases:
        stored = world.get(Kind.CLONE, lease.clone)
        assert stored is not None, f"the clone of lease {lease.id} was destroyed"
        assert stored.meta["status"] == "leased"
        assert stored.meta["lease_id"] == lease.id


async def test_if_two_pools_race_for_the_same_warm_clones_then_each_is_leased_once(
    autojump_clock: MockClock,
) -> None:
    """If two pools claim the same warm clones at once, then every lease is distinct and the
    losers never destroy the winners' clones."""
    world, source = FakeWorld(), _source()
    size6 = settings(pool=WarmPoolSettings(size=6, max_provisioning=3))
    async with running_pool(world, source, size6):
        await wait_for(lambda: len(_warm_in(world)) == 6, what="6 warm clones")
    leases: list[Lease] = []

    async def take(pool_: Pool) -> None:
        leases.append(await pool_.acquire())

    async with running_pool(world, source, size6) as a, running_pool(world, source, size6) as b:
        assert a.pool.statistics().clones["warm"] == b.pool.statistics().clones["warm"] == 6
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(take, a.pool)
                nursery.start_soon(take, b.pool)
        assert len(leases) == 16
        _assert_leases_hold(world, leases)
    assert world.conflicts >= 1, "the two pools never raced for one clone"
    assert world.destroyed_leased == []


async def test_if_a_follower_is_asked_for_a_database_then_it_hands_out_the_leaders_clones(
    autojump_clock: MockClock,
) -> None:
    """If a follower gets an acquire, then it hands out a clone the leader made and makes none."""
    world, source = FakeWorld(), _source()
    async with replica(world, source, SHARED) as a, replica(world, source, SHARED) as b:
        await a.lead()
        await wait_for(
            lambda: any(r.meta.get("status") == "ready" for r in world.of(Kind.SNAPSHOT)),
            what="a ready snapshot",
        )
        assert _warm_in(world) == []
        leases = [await b.pool.acquire(timeout=600)]  # queues until the leader's clones are warm
        await wait_for(lambda: len(_warm_in(world)) == 3, what="the leader to refill")
        assert not b.pool.leading
        assert [e for e in b.events if isinstance(e, CloneProvisioned)] == []
        assert len([e for e in a.events if isinstance(e, CloneProvisioned)]) == 4
        _assert_leases_hold(world, leases)
        assert world.restore_calls == ["nightly.sql"]


async def test_if_a_follower_starts_then_it_destroys_nothing_it_did_not_make(
    autojump_clock: MockClock,
) -> None:
    """If leftovers of a crashed leader exist, then followers keep them and the leader cleans up."""
    world, source = FakeWorld(), _source()
    world.add_orphan(Kind.VOLUME, "snap-halfway", {"status": "restoring"})
    world.add_orphan(Kind.CLONE, "clone-half", {"status": "provisioning", "snapshot": "x"})
    async with replica(world, source, SHARED) as a:
        await trio.sleep(60)
        assert world.get(Kind.VOLUME, "snap-halfway") is not None
        assert world.get(Kind.CLONE, "clone-half") is not None
        await a.lead()
        assert world.get(Kind.VOLUME, "snap-halfway") is None
        assert world.get(Kind.CLONE, "clone-half") is None


async def test_if_a_lease_is_released_on_another_replica_then_both_forget_it(
    autojump_clock: MockClock,
) -> None:
    """If a lease handed out by the leader is released through a follower, then it ends once."""
    world, source = FakeWorld(), _source()
    async with replica(world, source, SHARED) as a, replica(world, source, SHARED) as b:
        await a.lead()
        await wait_for(lambda: len(_warm_in(world)) == 3, what="3 warm clones")
        lease = await a.pool.acquire(timeout=600)
        assert lease.secret is not None
        await b.pool.refresh_view()
        assert b.pool.verify_secret(lease.id, lease.secret)
        extended = await b.pool.extend(lease.id, ttl=120)
        assert extended.ttl == 120
        await b.pool.release(lease.id)
        await wait_for(lambda: world.get(Kind.CLONE, lease.clone) is None, what="the destroy")
        await trio.sleep(10)  # a view refresh on the leader
        with pytest.raises(LeaseNotFoundError):
            a.pool.lease(lease.id)
        ended = [e for p in (a, b) for e in p.events if isinstance(e, LeaseEnded)]
        assert [(e.lease_id, e.reason) for e in ended] == [(lease.id, "released")]
        assert world.destroyed_leased == []


async def test_if_a_client_is_attached_on_a_follower_then_the_leader_does_not_expire_the_lease(
    autojump_clock: MockClock,
) -> None:
    """If a client stays attached through a follower, then the leader's TTL leaves the lease
    alone; once it detaches, the lease expires after its TTL."""
    world, source = FakeWorld(), _source()
    async with replica(world, source, SLOW_VIEW) as a, replica(world, source, SLOW_VIEW) as b:
        await a.lead()
        await wait_for(lambda: len(_warm_in(world)) == 3, what="3 warm clones")
        lease = await a.pool.acquire(timeout=600)
        await b.pool.refresh_view()
        b.pool.attached(lease.id)
        await trio.sleep(300)  # ten TTLs
        assert a.pool.lease(lease.id).id == lease.id
        b.pool.detached(lease.id)
        await trio.sleep(10)
        assert a.pool.lease(lease.id).id == lease.id
        await trio.sleep(60)
        with pytest.raises(LeaseNotFoundError):
            a.pool.lease(lease.id)
        assert [e.reason for e in a.events if isinstance(e, LeaseEnded)] == ["expired_idle"]
        assert world.get(Kind.CLONE, lease.clone) is None


async def test_if_traffic_flows_through_a_follower_then_the_leader_does_not_expire_the_lease(
    autojump_clock: MockClock,
) -> None:
    """If bytes keep flowing for a lease on a follower, then the leader's TTL sees the activity."""
    world, source = FakeWorld(), _source()
    async with replica(world, source, SLOW_VIEW) as a, replica(world, source, SLOW_VIEW) as b:
        await a.lead()
        await wait_for(lambda: len(_warm_in(world)) == 3, what="3 warm clones")
        lease = await a.pool.acquire(timeout=600)
        await b.pool.refresh_view()
        for _ in range(30):
            b.pool.traffic(lease.id)
            await trio.sleep(5)
        assert a.pool.lease(lease.id).id == lease.id
        await trio.sleep(120)
        with pytest.raises(LeaseNotFoundError):
            a.pool.lease(lease.id)


async def test_if_the_leader_steps_down_mid_flight_then_the_new_leader_takes_over(
    autojump_clock: MockClock,
) -> None:
    """If leadership moves while leases run and clones are being made, then leases survive,
    nothing is handed out twice, and the new leader refills, expires and restores."""
    world, source = FakeWorld(), _source()
    leases: list[Lease] = []

    async def take(pool_: Pool) -> None:
        leases.append(await pool_.acquire(timeout=600))

    async with replica(world, source, SHARED) as a, replica(world, source, SHARED) as b:
        await a.lead()
        await wait_for(lambda: len(_warm_in(world)) == 3, what="3 warm clones")
        await b.pool.refresh_view()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(take, a.pool)
                nursery.start_soon(take, b.pool)
        await trio.sleep(0.5)  # the leader is making replacements right now
        await a.step_down()
        await b.lead()
        assert b.pool.leading
        assert not a.pool.leading
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(take, a.pool)
                nursery.start_soon(take, b.pool)
        assert len(leases) == 12
        _assert_leases_hold(world, leases)
        await wait_for(lambda: len(_warm_in(world)) == 3, what="the new leader to refill")
        for lease in leases:  # keep them alive through the handover's TTLs on either replica
            await (a.pool if lease.id in {x.id for x in a.pool.leases()} else b.pool).extend(
                lease.id
            )
        source.put("nightly.sql", b"CREATE TABLE t2 (i int);\n" * 100, modified=2.0)
        b.pool.trigger_refresh()
        await wait_for(lambda: len(world.restore_calls) == 2, what="the new leader to restore")
        await trio.sleep(120)  # every lease's idle TTL passes: the new leader expires them
        assert {e.lease_id for e in b.events if isinstance(e, LeaseEnded)} == {
            lease.id for lease in leases
        }
        assert [e for e in a.events if isinstance(e, LeaseEnded)] == []
    assert world.destroyed_leased == []
    half_made = [r.name for r in world.of(Kind.CLONE) if r.meta.get("status") == "provisioning"]
    assert half_made == []


async def test_if_a_lease_is_reset_on_a_follower_then_the_leader_follows_it_to_the_new_clone(
    autojump_clock: MockClock,
) -> None:
    """If a follower resets a lease the leader handed out, then the leader's view moves to the
    new clone, the old one goes, and releasing it on the leader destroys the new one."""
    world, source = FakeWorld(), _source()
    async with replica(world, source, SHARED) as a, replica(world, source, SHARED) as b:
        await a.lead()
        await wait_for(lambda: len(_warm_in(world)) == 3, what="3 warm clones")
        lease = await a.pool.acquire(timeout=600)
        reset = await b.pool.reset(lease.id, timeout=600)
        assert reset.clone != lease.clone
        await wait_for(lambda: world.get(Kind.CLONE, lease.clone) is None, what="the old clone")
        await a.pool.refresh_view()
        assert a.pool.lease(lease.id).clone == reset.clone
        await a.pool.release(lease.id)
        await wait_for(lambda: world.get(Kind.CLONE, reset.clone) is None, what="the new clone")
        assert world.destroyed_leased == []


async def test_if_a_replica_extends_a_lease_ended_elsewhere_then_it_says_not_found(
    autojump_clock: MockClock,
) -> None:
    """If a lease was released on one replica, then extending it on another (whose view is
    stale) raises LeaseNotFoundError and brings nothing back."""
    world, source = FakeWorld(), _source()
    async with replica(world, source, SLOW_VIEW) as a, replica(world, source, SLOW_VIEW) as b:
        await a.lead()
        await wait_for(lambda: len(_warm_in(world)) == 3, what="3 warm clones")
        first, second = await a.pool.acquire(timeout=600), await a.pool.acquire(timeout=600)
        await b.pool.refresh_view()
        await a.pool.release(first.id)  # b still sees it; its clone is being destroyed
        with pytest.raises(LeaseNotFoundError):
            await b.pool.extend(first.id)
        await a.pool.release(second.id)
        await wait_for(lambda: world.get(Kind.CLONE, second.clone) is None, what="the destroy")
        with pytest.raises(LeaseNotFoundError):
            await b.pool.extend(second.id)  # b still sees it; its clone is gone
        assert b.pool.leases() == ()
        assert world.get(Kind.CLONE, first.clone) is None
