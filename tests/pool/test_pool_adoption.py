"""A restarted pool rebuilds itself from what the provider holds (crash = cancel + new Pool)."""

from __future__ import annotations

import trio
from pool_fakes import FakeSource, FakeWorld, Harness, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import Kind, LeaseNotFoundError, WarmPoolSettings

SIZE2 = settings(pool=WarmPoolSettings(size=2, max_provisioning=2))


def _source() -> FakeSource:
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=10.0)
    return source


async def _warm(h: Harness, n: int) -> None:
    await wait_for(lambda: h.pool.statistics().clones["warm"] == n, what=f"{n} warm")


def _names(world: FakeWorld, kind: Kind) -> set[str]:
    return {r.name for r in world.of(kind)}


async def test_if_the_pool_restarts_then_leases_and_warm_clones_are_adopted(
    autojump_clock: MockClock,
) -> None:
    """If a pool with a lease is replaced by a new one, then the lease, its secret and endpoint live on."""
    world, source = FakeWorld(), _source()
    async with running_pool(world, source, SIZE2) as h:
        await _warm(h, 2)
        lease = await h.pool.acquire(ttl=600, labels={"job": "7"})
        await _warm(h, 2)
        warm_before = {r.name for r in world.of(Kind.CLONE) if r.meta["status"] == "warm"}
    assert lease.secret is not None
    clone_calls = world.clone_calls
    await trio.sleep(100)
    async with running_pool(world, source, SIZE2) as h2:
        adopted = h2.pool.lease(lease.id)
        assert (adopted.endpoint, adopted.clone, adopted.labels) == (
            lease.endpoint,
            lease.clone,
            {"job": "7"},
        )
        assert h2.pool.verify_secret(lease.id, lease.secret) is True
        assert adopted.idle_deadline == lease.idle_deadline
        assert h2.pool.statistics().clones["warm"] == 2
        await trio.sleep(30)
        assert world.clone_calls == clone_calls  # nothing had to be made again
        assert world.restore_calls == ["a.sql"]  # and nothing restored again
        taken = await h2.pool.acquire()
        assert taken.clone in warm_before
        # The idle TTL keeps counting across the restart: 600 s from the acquire.
        await trio.sleep(600 - 130 + 1)
        try:
            h2.pool.lease(lease.id)
            raise AssertionError("the lease should have expired")
        except LeaseNotFoundError:
            pass


async def test_if_an_attached_lease_survives_a_crash_then_it_gets_a_fresh_idle_ttl(
    autojump_clock: MockClock,
) -> None:
    """If a client was attached at the crash, then after the restart the TTL counts from the restart."""
    world, source = FakeWorld(), _source()
    async with running_pool(world, source, SIZE2) as h:
        await _warm(h, 2)
        lease = await h.pool.acquire(ttl=60)
        h.pool.attached(lease.id)
        await wait_for(
            lambda: world.get(Kind.CLONE, lease.clone).meta["lease_attached"] == "1",  # type: ignore[union-attr]
            what="attach persisted",
        )
        await trio.sleep(500)
    async with running_pool(world, source, SIZE2) as h2:
        await trio.sleep(59)
        assert h2.pool.lease(lease.id).id == lease.id
        await trio.sleep(2)
        assert h2.pool.leases() == ()


async def test_if_half_made_things_and_orphans_are_found_then_they_are_destroyed(
    autojump_clock: MockClock,
) -> None:
    """If a restart finds a volume, provisioning/verify/unlabelled clones, then it destroys them."""
    world, source = FakeWorld(), _source()
    async with running_pool(world, source, SIZE2) as h:
        await _warm(h, 2)
    world.add_orphan(Kind.VOLUME, "snap-half", {"status": "restoring"})
    world.add_orphan(Kind.CLONE, "clone-starting", {"status": "provisioning", "snapshot": "x"})
    world.add_orphan(Kind.CLONE, "verify-old", {"status": "provisioning", "role": "verify"})
    world.add_orphan(Kind.CLONE, "stranger", {})
    world.add_orphan(Kind.SNAPSHOT, "snap-odd", {"status": "restoring"})
    world.add_orphan(Kind.CLONE, "clone-badlease", {"status": "leased", "lease_id": "x"})
    before = _names(world, Kind.CLONE)
    async with running_pool(world, source, SIZE2):
        assert _names(world, Kind.VOLUME) == set()
        assert "snap-odd" not in _names(world, Kind.SNAPSHOT)
        assert _names(world, Kind.CLONE) == before - {
            "clone-starting",
            "verify-old",
            "stranger",
            "clone-badlease",
        }


async def test_if_the_crash_hit_mid_verification_then_the_restart_verifies_without_restoring(
    autojump_clock: MockClock,
) -> None:
    """If the pool died while checking a sealed snapshot, then the restart re-verifies, not re-restores."""
    world, source = FakeWorld(check_gate=trio.Event()), _source()
    async with running_pool(world, source, SIZE2):
        await wait_for(
            lambda: any(r.meta.get("role") == "verify" for r in world.of(Kind.CLONE)),
            what="verification running",
        )
        await trio.sleep(5)
        assert [r.meta["status"] for r in world.of(Kind.SNAPSHOT)] == ["verifying"]
    assert world.restore_calls == ["a.sql"]
    world.check_gate = None
    async with running_pool(world, source, SIZE2) as h2:
        await _warm(h2, 2)
        assert [s.status for s in h2.pool.statistics().snapshots] == ["ready"]
        assert world.restore_calls == ["a.sql"]
        assert not any(r.meta.get("role") == "verify" for r in world.of(Kind.CLONE))


async def test_if_the_crash_hit_mid_restore_then_the_volume_goes_and_the_restore_reruns(
    autojump_clock: MockClock,
) -> None:
    """If the pool died during a restore, then the restart destroys the volume and restores again."""
    world, source = FakeWorld(restore_gate=trio.Event()), _source()
    async with running_pool(world, source, SIZE2):
        await wait_for(lambda: len(world.restore_calls) == 1, what="restore running")
        await trio.sleep(5)
        (volume,) = _names(world, Kind.VOLUME)
    world.restore_gate = None
    async with running_pool(world, source, SIZE2) as h2:
        await _warm(h2, 2)
        assert volume not in _names(world, Kind.VOLUME)
        assert world.restore_calls == ["a.sql", "a.sql"]
        assert [s.status for s in h2.pool.statistics().snapshots] == ["ready"]


async def test_if_a_failed_backup_is_on_record_then_a_restart_does_not_retry_it(
    autojump_clock: MockClock,
) -> None:
    """If a failed snapshot's record holds the backup's key and ETag, then a restart leaves it be."""
    world, source = FakeWorld(), FakeSource()
    source.put("bad.sql", b"FAIL", modified=10.0)
    async with running_pool(world, source, SIZE2) as h:
        await wait_for(
            lambda: h.pool.statistics().snapshots_by_status["failed"] == 1, what="failed"
        )
    async with running_pool(world, source, SIZE2) as h2:
        await trio.sleep(300)
        assert world.restore_calls == ["bad.sql"]
        assert [s.status for s in h2.pool.statistics().snapshots] == ["failed"]


async def test_if_a_lease_expired_while_the_pool_was_down_then_it_ends_at_start(
    autojump_clock: MockClock,
) -> None:
    """If the idle TTL ran out during the downtime, then the restarted pool expires the lease."""
    world, source = FakeWorld(), _source()
    async with running_pool(world, source, SIZE2) as h:
        await _warm(h, 2)
        lease = await h.pool.acquire(ttl=60)
    await trio.sleep(120)
    async with running_pool(world, source, SIZE2) as h2:
        await trio.sleep(1)
        assert h2.pool.leases() == ()
        await wait_for(lambda: world.get(Kind.CLONE, lease.clone) is None, what="destroyed")


async def test_if_a_released_lease_is_persisted_then_a_restart_does_not_revive_it(
    autojump_clock: MockClock,
) -> None:
    """If a lease was released but its clone not yet destroyed, then a restart destroys the clone."""
    world, source = FakeWorld(), _source()
    async with running_pool(world, source, SIZE2) as h:
        await _warm(h, 2)
        lease = await h.pool.acquire()
        await h.pool.release(lease.id)
        # Crash before the background destroy ran: the clone is still there, marked destroying.
        assert world.get(Kind.CLONE, lease.clone) is not None
    assert world.get(Kind.CLONE, lease.clone).meta["status"] == "destroying"  # type: ignore[union-attr]
    async with running_pool(world, source, SIZE2) as h2:
        assert h2.pool.leases() == ()
        assert world.get(Kind.CLONE, lease.clone) is None


async def test_if_a_reset_was_interrupted_then_the_newer_clone_keeps_the_lease(
    autojump_clock: MockClock,
) -> None:
    """If two clones claim one lease after a crash mid-reset, then the newer generation wins."""
    world, source = FakeWorld(), _source()
    async with running_pool(world, source, SIZE2) as h:
        await _warm(h, 2)
        lease = await h.pool.acquire()
        old_meta = dict(world.get(Kind.CLONE, lease.clone).meta)  # type: ignore[union-attr]
        fresh = await h.pool.reset(lease.id)
    # Put the old clone back as it was before the reset retired it (the crash came first).
    world.add_orphan(Kind.CLONE, lease.clone, old_meta)
    world.get(Kind.CLONE, lease.clone).endpoint = lease.endpoint  # type: ignore[union-attr]
    async with running_pool(world, source, SIZE2) as h2:
        assert h2.pool.lease(lease.id).clone == fresh.clone
        assert world.get(Kind.CLONE, lease.clone) is None
