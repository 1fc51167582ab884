"""Leases over the fake provider: hand-out, queue, TTLs, release, extend, reset, drain."""

from __future__ import annotations

import attrs
import pytest
import structlog.testing
import trio
from pool_fakes import FakeSource, FakeWorld, Harness, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    InvalidRequestError,
    Kind,
    LeaseEnded,
    LeaseHandedOut,
    LeaseNotFoundError,
    LeaseSettings,
    NoSnapshotReadyError,
    PoolDrainingError,
    QueueProgress,
    QueueTimeoutError,
    WarmPoolSettings,
)

SIZE3 = settings(pool=WarmPoolSettings(size=3, max_provisioning=2))


def _source() -> FakeSource:
    source = FakeSource()
    source.put("nightly.sql", b"CREATE TABLE t (i int);\n" * 100, modified=1.0)
    return source


def _warm(h: Harness) -> int:
    return h.pool.statistics().clones["warm"]


async def _ready(h: Harness, warm: int) -> None:
    await wait_for(lambda: _warm(h) >= warm, what=f"{warm} warm clones")


def _leased_clones(world: FakeWorld) -> list[str]:
    return [r.name for r in world.of(Kind.CLONE) if r.meta.get("status") == "leased"]


async def test_if_a_clone_is_warm_then_acquire_returns_it_with_a_secret(
    autojump_clock: MockClock,
) -> None:
    """If a warm clone exists, then acquire hands it out with a secret that verifies."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        lease = await h.pool.acquire(labels={"job": "ci-1"})
        assert lease.secret is not None
        assert h.pool.verify_secret(lease.id, lease.secret) is True
        assert h.pool.verify_secret(lease.id, lease.secret + "x") is False
        assert h.pool.verify_secret("no-such-lease", lease.secret) is False
        assert lease.labels == {"job": "ci-1"}
        assert lease.ttl == 300.0
        assert lease.secret not in repr(lease)
        stored = h.world.get(Kind.CLONE, lease.clone)
        assert stored is not None
        assert stored.meta["status"] == "leased"
        assert stored.meta["lease_id"] == lease.id
        assert lease.secret not in str(stored.meta)
        handed = [e for e in h.events if isinstance(e, LeaseHandedOut)]
        assert [(e.lease_id, e.queued_seconds) for e in handed] == [(lease.id, 0.0)]


async def test_if_no_snapshot_is_ready_then_acquire_says_so(autojump_clock: MockClock) -> None:
    """If no backup has been restored, then acquire raises NoSnapshotReadyError saying so."""
    async with running_pool(FakeWorld(), FakeSource(), SIZE3) as h:
        with pytest.raises(NoSnapshotReadyError, match="no snapshot is ready yet"):
            await h.pool.acquire()


async def test_if_twenty_acquire_at_once_then_no_clone_is_shared(autojump_clock: MockClock) -> None:
    """If 20 acquires run concurrently, then 20 leases get 20 distinct clones."""
    leases = []
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)

        async def one() -> None:
            leases.append(await h.pool.acquire(timeout=600))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert len({lease.clone for lease in leases}) == 20
        assert len({lease.id for lease in leases}) == 20
        assert len({lease.endpoint.port for lease in leases}) == 20
        assert sorted(_leased_clones(h.world)) == sorted(lease.clone for lease in leases)


async def test_if_the_pool_is_empty_then_acquirers_are_served_first_come_first_served(
    autojump_clock: MockClock,
) -> None:
    """If three acquirers queue for one slot, then they are served in arrival order with positions."""
    one_slot = settings(pool=WarmPoolSettings(size=0, max_provisioning=1))
    order: list[int] = []
    progress: dict[int, list[int]] = {0: [], 1: [], 2: []}
    async with running_pool(FakeWorld(), _source(), one_slot) as h:
        await wait_for(lambda: h.pool.statistics().newest_ready_snapshot is not None, what="ready")

        async def one(i: int) -> None:
            def seen(p: QueueProgress) -> None:
                progress[i].append(p.position)

            await h.pool.acquire(timeout=600, on_progress=seen)
            order.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
                await trio.sleep(0.01)
            await wait_for(
                lambda: h.pool.statistics().queue_length > 0 or len(order) == 3, what="queue"
            )
        assert order == [0, 1, 2]
        assert progress == {0: [1], 1: [2, 1], 2: [3, 2, 1]}


async def test_if_no_clone_frees_up_in_time_then_the_queue_times_out_clearly(
    autojump_clock: MockClock,
) -> None:
    """If every clone is leased and none can be made, then acquire fails after its timeout."""
    world = FakeWorld()
    small = settings(pool=WarmPoolSettings(size=1, max_provisioning=1))
    async with running_pool(world, _source(), small) as h:
        await _ready(h, 1)
        world.clone_seconds = 1000.0
        await h.pool.acquire()
        with pytest.raises(QueueTimeoutError, match=r"within 30 s \(still number 1 of 1"):
            await h.pool.acquire(timeout=30)
        assert h.pool.statistics().queue_length == 0


async def test_if_a_lease_stays_idle_past_its_ttl_then_its_clone_is_destroyed(
    autojump_clock: MockClock,
) -> None:
    """If nobody attaches for the TTL, then the lease expires and its clone is destroyed."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        lease = await h.pool.acquire(ttl=60)
        await trio.sleep(59)
        assert h.pool.lease(lease.id).id == lease.id
        await trio.sleep(2)
        with pytest.raises(LeaseNotFoundError, match="no active lease has id"):
            h.pool.lease(lease.id)
        await wait_for(lambda: h.world.get(Kind.CLONE, lease.clone) is None, what="destroy")
        ended = [e for e in h.events if isinstance(e, LeaseEnded)]
        assert [(e.lease_id, e.reason) for e in ended] == [(lease.id, "expired_idle")]


async def test_if_a_client_is_attached_then_the_idle_ttl_waits_for_the_detach(
    autojump_clock: MockClock,
) -> None:
    """If a client stays attached past the TTL, then the lease lives until TTL after the detach."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 1)
        lease = await h.pool.acquire(ttl=60)
        h.pool.attached(lease.id)
        await trio.sleep(600)
        assert h.pool.lease(lease.id).idle_deadline is None
        h.pool.detached(lease.id)
        await trio.sleep(59)
        h.pool.lease(lease.id)
        await trio.sleep(2)
        with pytest.raises(LeaseNotFoundError):
            h.pool.lease(lease.id)


async def test_if_traffic_flows_then_the_idle_ttl_counts_from_it(autojump_clock: MockClock) -> None:
    """If traffic is reported, then the idle TTL restarts from that moment."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 1)
        lease = await h.pool.acquire(ttl=60)
        await trio.sleep(50)
        h.pool.traffic(lease.id)
        await trio.sleep(50)
        h.pool.lease(lease.id)
        await trio.sleep(11)
        with pytest.raises(LeaseNotFoundError):
            h.pool.lease(lease.id)


async def test_if_the_maximum_lifetime_passes_then_even_an_attached_lease_ends(
    autojump_clock: MockClock,
) -> None:
    """If max_lifetime passes, then the lease expires although a client is attached."""
    s = settings(lease=LeaseSettings(max_lifetime=1000.0))
    async with running_pool(FakeWorld(), _source(), s) as h:
        await _ready(h, 1)
        lease = await h.pool.acquire()
        h.pool.attached(lease.id)
        await trio.sleep(1001)
        with pytest.raises(LeaseNotFoundError):
            h.pool.lease(lease.id)
        ended = [e for e in h.events if isinstance(e, LeaseEnded)]
        assert [e.reason for e in ended] == ["expired_lifetime"]


async def test_if_a_lease_is_extended_then_its_idle_ttl_restarts(autojump_clock: MockClock) -> None:
    """If extend is called with a new TTL, then the lease lives that long from now."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 1)
        lease = await h.pool.acquire(ttl=60)
        await trio.sleep(50)
        extended = await h.pool.extend(lease.id, ttl=120)
        assert (extended.ttl, extended.secret) == (120.0, None)
        await trio.sleep(110)
        h.pool.lease(lease.id)
        await trio.sleep(11)
        with pytest.raises(LeaseNotFoundError):
            h.pool.lease(lease.id)


async def test_if_a_ttl_is_over_the_cap_then_it_is_capped_and_a_bad_one_refused(
    autojump_clock: MockClock,
) -> None:
    """If ttl exceeds max_ttl, then it is capped; if it is not positive, then acquire refuses it."""
    s = settings(lease=LeaseSettings(max_ttl=600.0))
    async with running_pool(FakeWorld(), _source(), s) as h:
        await _ready(h, 1)
        assert (await h.pool.acquire(ttl=10_000)).ttl == 600.0
        with pytest.raises(InvalidRequestError, match="lease TTL -5 is not a positive number"):
            await h.pool.acquire(ttl=-5)
        with pytest.raises(InvalidRequestError, match="string pair"):
            await h.pool.acquire(labels={"a": 1})  # type: ignore[dict-item]


async def test_if_a_lease_is_released_then_its_clone_goes_and_the_pool_refills(
    autojump_clock: MockClock,
) -> None:
    """If a lease is released, then its clone is destroyed, a second release fails, and 3 are warm."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        lease = await h.pool.acquire()
        await h.pool.release(lease.id)
        with pytest.raises(LeaseNotFoundError):
            await h.pool.release(lease.id)
        await wait_for(lambda: h.world.get(Kind.CLONE, lease.clone) is None, what="destroy")
        await _ready(h, 3)
        assert h.pool.verify_secret(lease.id, lease.secret or "") is False
        assert len(h.world.of(Kind.CLONE)) == 3


async def test_if_a_lease_is_reset_then_it_keeps_its_id_and_secret_on_a_fresh_clone(
    autojump_clock: MockClock,
) -> None:
    """If reset is called, then the lease id and secret stay, the clone is new, the old one goes."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        lease = await h.pool.acquire()
        assert lease.secret is not None
        fresh = await h.pool.reset(lease.id)
        assert fresh.id == lease.id
        assert fresh.clone != lease.clone
        assert fresh.resets == 1
        assert h.pool.verify_secret(lease.id, lease.secret) is True
        await wait_for(lambda: h.world.get(Kind.CLONE, lease.clone) is None, what="old clone gone")
        stored = h.world.get(Kind.CLONE, fresh.clone)
        assert stored is not None
        assert (stored.meta["lease_id"], stored.meta["lease_generation"]) == (lease.id, "1")


async def test_if_the_pool_drains_then_nothing_new_is_handed_out_but_leases_live(
    autojump_clock: MockClock,
) -> None:
    """If drain() is called, then acquire raises PoolDrainingError and existing leases stay."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        lease = await h.pool.acquire()
        h.pool.drain()
        with pytest.raises(PoolDrainingError, match="draining"):
            await h.pool.acquire()
        assert h.pool.lease(lease.id).id == lease.id
        assert h.pool.statistics().draining is True


async def test_if_a_lease_is_killed_then_it_ends_with_reason_killed(
    autojump_clock: MockClock,
) -> None:
    """If an admin kills a lease, then it ends with reason `killed` and its clone goes."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 1)
        lease = await h.pool.acquire()
        await h.pool.kill(lease.id)
        ended = [e for e in h.events if isinstance(e, LeaseEnded)]
        assert [(e.lease_id, e.reason) for e in ended] == [(lease.id, "killed")]
        await wait_for(lambda: h.world.get(Kind.CLONE, lease.clone) is None, what="destroy")


async def test_if_statistics_are_read_then_they_count_clones_leases_and_snapshots(
    autojump_clock: MockClock,
) -> None:
    """If one lease is out of a pool of 3, then statistics show 3 warm, 1 leased, 1 ready snapshot."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        lease = await h.pool.acquire(labels={"who": "me"})
        await _ready(h, 3)
        stats = h.pool.statistics()
        assert stats.clones == {
            "provisioning": 0,
            "warm": 3,
            "leased": 1,
            "destroying": 0,
            "broken": 0,
        }
        assert (stats.leases_active, stats.queue_length) == (1, 0)
        assert [(i.id, i.labels, i.state) for i in stats.leases] == [
            (lease.id, {"who": "me"}, "idle")
        ]
        assert [s.status for s in stats.snapshots] == ["ready"]
        assert stats.snapshots_by_status["ready"] == 1
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            stats.queue_length = 5  # type: ignore[misc]


async def test_if_a_warm_clone_dies_then_the_health_check_replaces_it(
    autojump_clock: MockClock,
) -> None:
    """If a warm clone's database dies, then the health check destroys it and a new one is made."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        dead = h.world.of(Kind.CLONE)[0].name
        h.world.kill(dead)
        await wait_for(lambda: h.world.get(Kind.CLONE, dead) is None, what="dead clone gone")
        await _ready(h, 3)
        lease = await h.pool.acquire()
        assert lease.clone != dead


async def test_if_making_clones_fails_then_the_pool_backs_off_and_recovers(
    autojump_clock: MockClock,
) -> None:
    """If the first clones fail to start, then the keeper retries later and fills the pool."""
    world = FakeWorld(fail_clones=4)
    async with running_pool(world, _source(), SIZE3) as h:
        await _ready(h, 3)
        states = [r.meta["status"] for r in world.of(Kind.CLONE)]
        assert states == ["warm", "warm", "warm"]
        assert world.clone_calls == 1 + 4 + 3  # verify clone, failures, the pool


async def test_if_a_clone_was_handed_out_then_it_never_goes_back_to_the_pool(
    autojump_clock: MockClock,
) -> None:
    """If a lease is released, then its clone is never warm again (handed out at most once)."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        seen: set[str] = set()
        for _ in range(10):
            lease = await h.pool.acquire(timeout=600)
            assert lease.clone not in seen
            seen.add(lease.clone)
            await h.pool.release(lease.id)
        warm = [r.name for r in h.world.of(Kind.CLONE) if r.meta["status"] == "warm"]
        assert seen.isdisjoint(warm)


async def test_if_a_lease_lives_and_ends_then_one_canonical_line_is_logged_without_its_secret(
    autojump_clock: MockClock,
) -> None:
    """If a lease is acquired, reset and released, then one `lease.ended` line logs it, never the secret."""
    async with running_pool(FakeWorld(), _source(), SIZE3) as h:
        await _ready(h, 3)
        with structlog.testing.capture_logs() as logs:
            lease = await h.pool.acquire(labels={"job": "9"})
            h.pool.attached(lease.id)
            await h.pool.reset(lease.id)
            h.pool.detached(lease.id)
            await h.pool.release(lease.id)
            await trio.sleep(5)
        assert lease.secret is not None
        assert lease.secret not in repr(logs)
        ended = [entry for entry in logs if entry["event"] == "lease.ended"]
        assert len(ended) == 1
        assert (ended[0]["lease_id"], ended[0]["reason"], ended[0]["resets"]) == (
            lease.id,
            "released",
            1,
        )
        assert ended[0]["labels"] == {"job": "9"}
