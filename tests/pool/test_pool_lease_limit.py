"""``lease.max_active``: at the limit a hand-out is refused at once and takes no warm clone."""

from __future__ import annotations

import pytest
import trio
from pool_fakes import FakeSource, FakeWorld, Harness, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    Kind,
    Lease,
    LeaseLimitError,
    LeaseRefused,
    LeaseSettings,
    PoolError,
    WarmPoolSettings,
)


def _source() -> FakeSource:
    source = FakeSource()
    source.put("nightly.sql", b"CREATE TABLE t (i int);\n", modified=1.0)
    return source


def _warm_names(h: Harness) -> set[str]:
    return {r.name for r in h.world.of(Kind.CLONE) if r.meta.get("status") == "warm"}


async def _ready(h: Harness, warm: int) -> None:
    await wait_for(lambda: len(_warm_names(h)) >= warm, what=f"{warm} warm clones")


async def test_if_max_active_leases_are_active_then_acquire_is_refused_without_taking_a_clone(
    autojump_clock: MockClock,
) -> None:
    """If lease.max_active leases are active, then acquire raises LeaseLimitError with the
    count at once, no warm clone is claimed or reserved, and a release makes room again."""
    limited = settings(
        pool=WarmPoolSettings(size=3, max_provisioning=2), lease=LeaseSettings(max_active=2)
    )
    async with running_pool(FakeWorld(), _source(), limited) as h:
        await _ready(h, 3)
        first = await h.pool.acquire()
        await h.pool.acquire()
        await _ready(h, 3)
        warm = _warm_names(h)
        with pytest.raises(LeaseLimitError) as refused:
            await h.pool.acquire()
        assert str(refused.value) == (
            "the pool already has 2 active leases (lease.max_active is 2); end one with "
            "`aldaas release` or wait until one expires, then retry."
        )
        assert _warm_names(h) == warm
        assert h.pool.statistics().clones["warm"] == 3
        assert h.pool.statistics().leases_max_active == 2
        assert [e for e in h.events if isinstance(e, LeaseRefused)] == [
            LeaseRefused(active=2, limit=2)
        ]
        await h.pool.release(first.id)
        third = await h.pool.acquire()
        assert third.clone in warm


async def test_if_two_acquires_race_for_the_last_slot_then_only_one_gets_a_lease(
    autojump_clock: MockClock,
) -> None:
    """If two acquires start together with one slot left, then one gets a lease and the other
    is refused (the first counts while it is being handed out), never two leases."""
    limited = settings(
        pool=WarmPoolSettings(size=2, max_provisioning=2), lease=LeaseSettings(max_active=1)
    )
    outcomes: list[Lease | PoolError] = []

    async def acquire(h: Harness) -> None:
        try:
            outcomes.append(await h.pool.acquire())
        except PoolError as exc:
            outcomes.append(exc)

    async with running_pool(FakeWorld(), _source(), limited) as h:
        await _ready(h, 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acquire, h)
            nursery.start_soon(acquire, h)
        assert sorted(type(o).__name__ for o in outcomes) == ["Lease", "LeaseLimitError"]
        assert h.pool.statistics().leases_active == 1


def test_if_max_active_is_below_one_then_the_settings_refuse_it() -> None:
    """If lease.max_active is 0, then LeaseSettings refuses it (None is the way to say no limit)."""
    with pytest.raises(ValueError, match="max_active"):
        LeaseSettings(max_active=0)
    assert LeaseSettings().max_active is None
