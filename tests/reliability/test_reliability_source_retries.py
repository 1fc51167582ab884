"""A backup whose download keeps breaking is retried with back-off, then recorded as failed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import trio
from pool_fakes import FakeSource, FakeWorld, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    Backup,
    SnapshotFailed,
    SourceSettings,
    TemporaryProviderError,
    WarmPoolSettings,
)

POLL = settings(
    pool=WarmPoolSettings(size=1, max_provisioning=1),
    source=SourceSettings(poll_interval=3600.0),
)


class BreakingSource(FakeSource):
    """Streams ``broken`` backups' first chunk, then breaks off (as S3 behind a cut link does)."""

    def __init__(self, breaks: int) -> None:
        super().__init__()
        self.breaks = breaks
        self.attempts: list[float] = []

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        async with aclosing(super().open(backup)) as inner:
            if backup.key != "b.sql":
                async for chunk in inner:
                    yield chunk
                return
            self.attempts.append(trio.current_time())
            async for chunk in inner:
                yield chunk
                if self.breaks > 0:
                    self.breaks -= 1
                    raise TemporaryProviderError(
                        "reading backup 'b.sql' from s3://backups broke off; it will be retried",
                        delay=5.0,
                    )


async def test_if_a_download_keeps_breaking_then_it_is_retried_with_backoff_and_then_failed(
    autojump_clock: MockClock,
) -> None:
    """If every download of a backup breaks off, then 3 attempts ≥5 s and ≥10 s apart, then failed."""
    source = BreakingSource(breaks=1000)
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    async with running_pool(FakeWorld(), source, POLL) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="warm")
        good = h.pool.statistics().newest_ready_snapshot
        source.put("b.sql", b"CREATE TABLE b();" * 200, modified=2.0)
        h.pool.trigger_refresh()
        await wait_for(
            lambda: any(isinstance(e, SnapshotFailed) for e in h.events), what="given up"
        )
        gaps = [b - a for a, b in zip(source.attempts, source.attempts[1:], strict=False)]
        assert len(source.attempts) == 3
        assert gaps[0] >= 5.0  # the source asked for 5 s
        assert gaps[1] >= 10.0  # doubled
        (failed,) = [s for s in h.pool.statistics().snapshots if s.status == "failed"]
        assert failed.reason is not None
        assert failed.reason.startswith("gave up after 3 attempts: reading backup 'b.sql'")
        assert h.pool.statistics().newest_ready_snapshot == good
        lease = await h.pool.acquire()
        assert lease.snapshot == good
        await trio.sleep(600)
        assert len(source.attempts) == 3, "a failed backup is not downloaded again"


async def test_if_a_download_breaks_twice_then_the_third_attempt_makes_it_ready(
    autojump_clock: MockClock,
) -> None:
    """If the link heals before the last attempt, then the backup becomes the ready snapshot."""
    source = BreakingSource(breaks=2)
    source.put("b.sql", b"CREATE TABLE b();" * 200, modified=2.0)
    async with running_pool(FakeWorld(), source, POLL) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="ready after retries")
        assert len(source.attempts) == 3
        assert [s.status for s in h.pool.statistics().snapshots] == ["ready"]
