"""Bad input and failing edges: the pool reports them and keeps serving."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
from pool_fakes import (
    FakeProvider,
    FakeSource,
    FakeWorld,
    running_pool,
    settings,
    wait_for,
    wall_clock,
)
from trio.testing import MockClock

from aldaas.pool import (
    Backup,
    Kind,
    LeaseNotFoundError,
    Pool,
    PoolDrainingError,
    PoolErrorEvent,
    ProviderError,
    QueueLeft,
    SourceSettings,
    TemporaryProviderError,
    WarmPoolSettings,
)

POLL = settings(
    pool=WarmPoolSettings(size=1, max_provisioning=1), source=SourceSettings(poll_interval=60.0)
)


class FlakySource(FakeSource):
    """A source whose listing fails while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def list_backups(self) -> Sequence[Backup]:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise ProviderError("the backup folder /srv/backups does not exist; create it")
        return await super().list_backups()


async def test_if_the_source_is_unreachable_then_the_pool_reports_it_and_recovers(
    autojump_clock: MockClock,
) -> None:
    """If listing the source fails, then an error event is emitted and the next poll recovers."""
    source = FlakySource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    async with running_pool(FakeWorld(), source, POLL) as h:
        await wait_for(lambda: any(isinstance(e, PoolErrorEvent) for e in h.events), what="error")
        errors = [e for e in h.events if isinstance(e, PoolErrorEvent)]
        assert (errors[0].component, errors[0].message) == (
            "source",
            "the backup folder /srv/backups does not exist; create it",
        )
        source.down = False
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="recovered")


async def test_if_an_observer_raises_then_the_pool_goes_on(autojump_clock: MockClock) -> None:
    """If an observer raises, then the hand-out still succeeds and other observers still see it."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    async with running_pool(FakeWorld(), source, POLL) as h:
        raised: list[object] = []

        def broken(event: object) -> None:
            if not raised:  # once: each failure logs a whole traceback
                raised.append(event)
                raise RuntimeError("metrics exploded")

        h.pool.add_observer(broken)
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="warm")
        lease = await h.pool.acquire()
        assert h.pool.lease(lease.id).id == lease.id
        assert len(raised) == 1


async def test_if_a_restore_fails_temporarily_then_nothing_is_recorded_and_it_is_retried(
    autojump_clock: MockClock,
) -> None:
    """If the provider says a restore failure is temporary, then no failed snapshot stays and it is retried."""

    class HiccupProvider(FakeProvider):
        hiccups = 1

        async def create_volume(self, name: str, meta: dict[str, str]) -> object:  # type: ignore[override]
            if self.hiccups:
                self.hiccups -= 1
                raise TemporaryProviderError("the API answered 503; retrying", delay=1.0)
            return await super().create_volume(name, meta)

    world = FakeWorld()
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    events: list[object] = []
    pool = Pool(
        POLL, HiccupProvider(world), source, wall_clock=wall_clock, observers=[events.append]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await wait_for(lambda: any(isinstance(e, PoolErrorEvent) for e in events), what="hiccup")
        assert pool.statistics().snapshots == ()
        assert world.of(Kind.SNAPSHOT) == []
        await wait_for(lambda: pool.statistics().clones["warm"] == 1, what="retried at next poll")
        assert [s.status for s in pool.statistics().snapshots] == ["ready"]
        nursery.cancel_scope.cancel()


async def test_if_the_pool_drains_then_queued_acquirers_are_told_at_once(
    autojump_clock: MockClock,
) -> None:
    """If drain() is called while acquirers wait, then they fail with PoolDrainingError right away."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    world = FakeWorld()
    async with running_pool(world, source, POLL) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="warm")
        world.clone_seconds = 10_000.0
        await h.pool.acquire()
        failures: list[BaseException] = []

        async def wait_in_queue() -> None:
            try:
                await h.pool.acquire(timeout=5000)
            except PoolDrainingError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_in_queue)
            await wait_for(lambda: h.pool.statistics().queue_length == 1, what="queued")
            started = trio.current_time()
            h.pool.drain()
        assert trio.current_time() - started < 1.0
        assert len(failures) == 1
        outcomes = [e.outcome for e in h.events if isinstance(e, QueueLeft)]
        assert outcomes == ["draining"]


async def test_if_a_lease_is_released_during_its_reset_then_the_reset_fails_cleanly(
    autojump_clock: MockClock,
) -> None:
    """If a lease is released while its reset waits for a clone, then reset raises and no clone leaks."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    world = FakeWorld()
    async with running_pool(world, source, POLL) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="warm")
        world.clone_seconds = 100.0
        lease = await h.pool.acquire()
        outcome: list[BaseException] = []

        async def reset() -> None:
            try:
                await h.pool.reset(lease.id, timeout=1000)
            except LeaseNotFoundError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset)
            await wait_for(lambda: h.pool.statistics().queue_length == 1, what="reset queued")
            await h.pool.release(lease.id)
        assert len(outcome) == 1
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="clone back in pool")
        leased = [r for r in world.of(Kind.CLONE) if r.meta.get("status") == "leased"]
        assert leased == []


async def test_if_a_secret_is_checked_then_unknown_and_ended_leases_never_verify(
    autojump_clock: MockClock,
) -> None:
    """If a secret is checked for an unknown or released lease, then verify_secret is False."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    async with running_pool(FakeWorld(), source, POLL) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="warm")
        lease = await h.pool.acquire()
        assert lease.secret is not None
        assert h.pool.verify_secret("", "") is False
        assert h.pool.verify_secret(lease.id, "") is False
        await h.pool.release(lease.id)
        assert h.pool.verify_secret(lease.id, lease.secret) is False
        with pytest.raises(LeaseNotFoundError, match="acquire a new one"):
            await h.pool.extend(lease.id)


async def test_if_the_provider_cannot_list_at_start_then_the_pool_retries_until_it_can(
    autojump_clock: MockClock,
) -> None:
    """If list() fails at start-up, then run() reports it, retries with backoff, and starts later."""

    class SlowToWake(FakeProvider):
        failures = 2

        async def list(self, kind: Kind | None = None) -> Sequence[object]:  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise ProviderError("the data folder /srv/aldaas is not readable; fix its mode")
            return await super().list(kind)

    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    events: list[object] = []
    pool = Pool(
        POLL, SlowToWake(FakeWorld()), source, wall_clock=wall_clock, observers=[events.append]
    )
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(pool.run)
        assert trio.current_time() - started == pytest.approx(3.0)  # 1 s, then 2 s of backoff
        assert [(e.component) for e in events if isinstance(e, PoolErrorEvent)] == [
            "adopt",
            "adopt",
        ]
        await wait_for(lambda: pool.statistics().clones["warm"] == 1, what="serving")
        nursery.cancel_scope.cancel()
