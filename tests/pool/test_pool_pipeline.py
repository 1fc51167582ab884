"""The snapshot pipeline, roll-over and pruning over the fake provider."""

from __future__ import annotations

import pytest
import trio
from pool_fakes import FakeSource, FakeWorld, Harness, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    Kind,
    RestoreFinished,
    SnapshotFailed,
    SnapshotReady,
    SnapshotSettings,
    SourceSettings,
    WarmPoolSettings,
)

FAST = settings(
    pool=WarmPoolSettings(size=2, max_provisioning=2),
    source=SourceSettings(poll_interval=60.0),
)


def _statuses(h: Harness) -> list[tuple[str, str]]:
    return [(s.backup_key, s.status) for s in h.pool.statistics().snapshots]


def _stored(world: FakeWorld) -> list[tuple[str, str]]:
    return [
        (r.meta.get("backup_key", ""), r.meta.get("status", "")) for r in world.of(Kind.SNAPSHOT)
    ]


async def _settled(h: Harness, count: int) -> None:
    await wait_for(
        lambda: len(h.pool.statistics().snapshots) == count and h.pool.statistics().restore is None,
        what=f"{count} snapshots",
    )


async def test_if_a_backup_appears_then_it_becomes_a_ready_snapshot_and_warm_clones(
    autojump_clock: MockClock,
) -> None:
    """If a backup is in the source, then it is restored, sealed, verified, ready, and cloned."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();\n" * 200, modified=10.0)
    async with running_pool(FakeWorld(), source, FAST) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 2, what="2 warm")
        assert _statuses(h) == [("a.sql", "ready")]
        assert _stored(h.world) == [("a.sql", "ready")]
        assert h.world.of(Kind.VOLUME) == []
        finished = [e for e in h.events if isinstance(e, RestoreFinished)]
        assert [(e.backup_key, e.bytes, e.succeeded) for e in finished] == [("a.sql", 3600, True)]
        assert [e.backup_key for e in h.events if isinstance(e, SnapshotReady)] == ["a.sql"]
        # No verify clone is left over; only the two warm ones.
        assert [r.meta["status"] for r in h.world.of(Kind.CLONE)] == ["warm", "warm"]


async def test_if_a_restore_is_running_then_acquire_reports_its_progress(
    autojump_clock: MockClock,
) -> None:
    """If the first restore is under way, then acquire's error and statistics show its progress."""
    source = FakeSource()
    source.put("big.sql", b"x" * 20_000, modified=10.0)
    world = FakeWorld(restore_seconds_per_chunk=10.0)
    async with running_pool(world, source, FAST) as h:
        await wait_for(lambda: h.pool.statistics().restore is not None, what="restore")
        await trio.sleep(25)
        restore = h.pool.statistics().restore
        assert restore is not None
        assert (restore.backup_key, restore.progress.total_bytes) == ("big.sql", 20_000)
        assert restore.progress.done_bytes >= 2000
        with pytest.raises(Exception, match=r"'big.sql' is being restored \(0\.\d of 0\.0 MiB"):
            await h.pool.acquire()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"FAIL here", "exited with status 3"),
        (b"NOTABLES", "no user tables"),
    ],
)
async def test_if_a_new_backup_fails_then_it_is_failed_and_the_old_one_serves(
    autojump_clock: MockClock, content: bytes, reason: str
) -> None:
    """If the newer backup's restore or check fails, then it is `failed` and the old snapshot serves."""
    source = FakeSource()
    source.put("old.sql", b"CREATE TABLE a();", modified=10.0)
    async with running_pool(FakeWorld(), source, FAST) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 2, what="2 warm")
        old = h.pool.statistics().newest_ready_snapshot
        source.put("new.sql", content, modified=20.0)
        h.pool.trigger_refresh()
        await _settled(h, 2)
        assert _statuses(h) == [("new.sql", "failed"), ("old.sql", "ready")]
        failed = h.pool.statistics().snapshots[0]
        assert failed.reason is not None
        assert reason in failed.reason
        assert sorted(_stored(h.world)) == [("new.sql", "failed"), ("old.sql", "ready")]
        assert [e.reason for e in h.events if isinstance(e, SnapshotFailed)] == [failed.reason]
        # Nothing of the failed attempt is left but its record.
        assert h.world.of(Kind.VOLUME) == []
        assert [r.record_only for r in h.world.of(Kind.SNAPSHOT) if r.name == failed.name] == [True]
        lease = await h.pool.acquire()
        assert lease.snapshot == old
        # The failed backup is not tried again at the next polls.
        restores = len(h.world.restore_calls)
        await trio.sleep(300)
        assert len(h.world.restore_calls) == restores


async def test_if_a_backup_has_an_unknown_suffix_then_the_failure_says_which(
    autojump_clock: MockClock,
) -> None:
    """If a backup's suffix has no default restore, then its snapshot fails naming the suffixes."""
    source = FakeSource()
    source.put("nightly.tar", b"data", modified=10.0)
    async with running_pool(FakeWorld(), source, FAST) as h:
        await _settled(h, 1)
        (snap,) = h.pool.statistics().snapshots
        assert snap.status == "failed"
        assert snap.reason == (
            "backup 'nightly.tar' has no known suffix (.sql, .sql.gz, .dump, .pgdump); "
            "rename it or set restore.argv."
        )
        assert h.world.restore_calls == []


async def test_if_a_newer_snapshot_turns_ready_then_idle_clones_roll_over(
    autojump_clock: MockClock,
) -> None:
    """If a newer backup becomes ready, then warm clones move to it and leased ones stay."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=10.0)
    async with running_pool(FakeWorld(), source, FAST) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 2, what="2 warm")
        old = h.pool.statistics().newest_ready_snapshot
        lease = await h.pool.acquire()
        source.put("b.sql", b"CREATE TABLE b();", modified=20.0)
        h.pool.trigger_refresh()
        await wait_for(lambda: h.pool.statistics().newest_ready_snapshot != old, what="new ready")
        new = h.pool.statistics().newest_ready_snapshot

        def rolled() -> bool:
            warm = [r for r in h.world.of(Kind.CLONE) if r.meta.get("status") == "warm"]
            return len(warm) == 2 and all(r.meta["snapshot"] == new for r in warm)

        await wait_for(rolled, what="roll-over")
        # The leased clone keeps its old snapshot, which is kept while the lease needs it.
        assert h.pool.lease(lease.id).snapshot == old
        assert sorted(_statuses(h)) == [("a.sql", "ready"), ("b.sql", "ready")]
        assert (await h.pool.acquire()).snapshot == new
        await h.pool.release(lease.id)
        await wait_for(lambda: len(h.pool.statistics().snapshots) == 1, what="old pruned")
        assert _stored(h.world) == [("b.sql", "ready")]


async def test_if_keep_is_two_then_the_two_newest_ready_snapshots_stay(
    autojump_clock: MockClock,
) -> None:
    """If snapshots.keep is 2 and three backups became ready, then the oldest one is pruned."""
    source = FakeSource()
    s = settings(pool=WarmPoolSettings(size=1), snapshots=SnapshotSettings(keep=2))
    async with running_pool(FakeWorld(), source, s) as h:
        for i, key in enumerate(("a.sql", "b.sql", "c.sql")):
            source.put(key, f"CREATE TABLE t{i}();".encode(), modified=10.0 + i)
            h.pool.trigger_refresh()
            await wait_for(
                lambda k=key: any(
                    s.backup_key == k and s.status == "ready" for s in h.pool.statistics().snapshots
                ),
                what=f"{key} ready",
            )
        await wait_for(lambda: len(_stored(h.world)) == 2, what="prune")
        assert sorted(_stored(h.world)) == [("b.sql", "ready"), ("c.sql", "ready")]


async def test_if_a_failed_snapshot_outlives_its_grace_then_its_record_is_pruned(
    autojump_clock: MockClock,
) -> None:
    """If failed_grace passes, then the failed record goes (and the backup may be tried again)."""
    source = FakeSource()
    source.put("bad.sql", b"FAIL", modified=10.0)
    s = settings(
        snapshots=SnapshotSettings(failed_grace=3600.0),
        source=SourceSettings(poll_interval=100_000.0),
    )
    async with running_pool(FakeWorld(), source, s) as h:
        await _settled(h, 1)
        assert _stored(h.world) == [("bad.sql", "failed")]
        await trio.sleep(3000)
        assert _stored(h.world) == [("bad.sql", "failed")]
        await trio.sleep(700)
        assert _stored(h.world) == []


async def test_if_the_newest_backup_is_deleted_then_the_pool_does_not_roll_back(
    autojump_clock: MockClock,
) -> None:
    """If the newest backup disappears from the source, then the older one is not restored again."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=10.0)
    async with running_pool(FakeWorld(), source, FAST) as h:
        await _settled(h, 1)
        source.put("b.sql", b"CREATE TABLE b();", modified=20.0)
        h.pool.trigger_refresh()
        await wait_for(lambda: _statuses(h) == [("b.sql", "ready")], what="b ready, a pruned")
        del source.backups["b.sql"]
        h.pool.trigger_refresh()
        await trio.sleep(120)
        assert _statuses(h) == [("b.sql", "ready")]
        assert h.world.restore_calls == ["a.sql", "b.sql"]
