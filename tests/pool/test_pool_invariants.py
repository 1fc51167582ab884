"""Random sequences of lease operations never hand a clone out twice (seeded, deterministic)."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio
from pool_fakes import FakeSource, FakeWorld, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    Kind,
    Lease,
    LeaseNotFoundError,
    LeaseSettings,
    QueueTimeoutError,
    WarmPoolSettings,
)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_if_leases_come_and_go_at_random_then_no_clone_is_ever_handed_out_twice(
    autojump_clock: MockClock, seed: int
) -> None:
    """If acquires, resets, releases, attaches and waits interleave, then every hand-out is a new clone."""
    rng = random.Random(seed)
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    s = settings(
        pool=WarmPoolSettings(size=2, max_provisioning=2),
        lease=LeaseSettings(ttl=50.0, queue_timeout=5.0, max_lifetime=400.0),
    )
    handed: list[str] = []
    live: dict[str, Lease] = {}
    async with running_pool(FakeWorld(), source, s) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 2, what="warm")

        async def acquire() -> None:
            try:
                lease = await h.pool.acquire(ttl=rng.choice([20.0, 60.0]))
            except QueueTimeoutError:
                return
            handed.append(lease.clone)
            live[lease.id] = lease

        async def reset(lease_id: str) -> None:
            try:
                lease = await h.pool.reset(lease_id)
            except (LeaseNotFoundError, QueueTimeoutError):
                return
            handed.append(lease.clone)
            live[lease_id] = lease

        async with trio.open_nursery() as nursery:
            for _ in range(150):
                for lease_id in [i for i in live if i not in {x.id for x in h.pool.leases()}]:
                    del live[lease_id]
                op = rng.random()
                ids = list(live)
                if op < 0.35 or not ids:
                    nursery.start_soon(acquire)
                elif op < 0.5:
                    nursery.start_soon(reset, rng.choice(ids))
                elif op < 0.65:
                    lease_id = rng.choice(ids)
                    live.pop(lease_id)
                    with contextlib.suppress(LeaseNotFoundError):
                        await h.pool.release(lease_id)
                elif op < 0.8:
                    with contextlib.suppress(LeaseNotFoundError):
                        h.pool.attached(rng.choice(ids))
                else:
                    h.pool.detached(rng.choice(ids))
                await trio.sleep(rng.choice([0.0, 0.5, 3.0, 30.0]))
                # Invariant: active leases sit on pairwise different clones.
                clones = [lease.clone for lease in h.pool.leases()]
                assert len(clones) == len(set(clones))
        assert len(handed) == len(set(handed)), "a clone was handed out twice"
        assert len(handed) > 20

        def world_matches_pool() -> bool:
            leased = {
                r.name: r.meta["lease_id"]
                for r in h.world.of(Kind.CLONE)
                if r.meta["status"] == "leased"
            }
            return leased == {lease.clone: lease.id for lease in h.pool.leases()}

        # A lease that expired at the last step is persisted by a background write a
        # moment later; the stored records must agree with the pool once it has run.
        await wait_for(world_matches_pool, what="stored leases to match the pool", limit=5.0)
