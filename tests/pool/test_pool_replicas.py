"""Several broker replicas over one provider: exactly-once hand-out, followers and a leader."""

from __future__ import annotations

import trio
from pool_fakes import FakeSource, FakeWorld, running_pool, settings, wait_for
from trio.testing import MockClock

from pool import Kind, Lease, Pool, WarmPoolSettings


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
