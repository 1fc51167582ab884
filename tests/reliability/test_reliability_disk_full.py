"""Disk full during a restore and during cloning, on real PostgreSQL over a small tmpfs.

The data folder sits on a tmpfs the test mounts (as root; skipped otherwise,
saying why). Once a first snapshot serves, a filler file takes the free space
down so that the next restore, and later the next clones, run out of disk.
"""

from __future__ import annotations

import pathlib

import pytest
import trio
from pg_query import aquery
from reliability_helpers import fill, local_pool, rows_sql, small_disk, used_bytes, wait_for

from aldaas.pool import (
    CloneFailed,
    Kind,
    QueueTimeoutError,
    WarmPoolSettings,
)

pytestmark = pytest.mark.slow

MB = 1024 * 1024


async def test_if_the_disk_fills_during_restore_and_cloning_then_the_old_snapshot_keeps_serving(
    tmp_path: pathlib.Path,
) -> None:
    """If the disk fills mid-restore and mid-clone, then both fail cleanly and the pool serves on."""
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "a.sql").write_bytes(rows_sql(1000))
    (backups / "a.sql").touch()
    with small_disk(256) as disk:
        events: list[object] = []
        pool, provider = local_pool(
            disk / "data",
            backups,
            WarmPoolSettings(size=1, max_provisioning=1, health_check_interval=1.0),
            observers=[events.append],
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a warm clone", 120)
            lease = await pool.acquire()
            await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a new warm clone", 60)
            good = pool.statistics().newest_ready_snapshot
            assert good is not None
            snapshot_bytes = used_bytes(disk / "data" / "snapshots" / good)

            # 1. Disk full during a restore: room for a fresh volume, not for its data.
            fill(disk, leave_free=snapshot_bytes + 8 * MB)
            (backups / "b.sql").write_bytes(rows_sql(400_000))
            pool.trigger_refresh()
            await wait_for(
                lambda: any(s.status == "failed" for s in pool.statistics().snapshots),
                "the restore on a full disk to fail",
                120,
            )
            (failed,) = [s for s in pool.statistics().snapshots if s.status == "failed"]
            assert failed.backup_key == "b.sql"
            assert failed.reason is not None
            assert "full" in failed.reason, failed.reason
            assert pool.statistics().newest_ready_snapshot == good
            assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(1000,)]
            served = await pool.acquire(timeout=60)
            assert served.snapshot == good
            assert await aquery(served.endpoint, "SELECT count(*) FROM items") == [(1000,)]
            assert [r.name for r in await provider.list(Kind.VOLUME)] == []

            # 2. Disk full while cloning: the keeper fails and backs off, leases keep working.
            await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a new warm clone", 60)
            filler = fill(disk, leave_free=4 * MB)
            taken = await pool.acquire()  # its replacement must be cloned on the full disk
            await wait_for(
                lambda: any(isinstance(e, CloneFailed) for e in events),
                "a clone to fail on the full disk",
                60,
            )
            (clone_failure,) = [e for e in events if isinstance(e, CloneFailed)][:1]
            assert "full" in clone_failure.reason, clone_failure.reason
            with pytest.raises(QueueTimeoutError):
                await pool.acquire(timeout=0)
            for held in (lease, served, taken):
                assert await aquery(held.endpoint, "SELECT count(*) FROM items") == [(1000,)]
            half_made = [p.name for p in (disk / "data" / "clones").iterdir()]
            assert not [n for n in half_made if n.startswith(".partial")], half_made

            # 3. Space comes back: the pool recovers on its own (after its back-off).
            filler.unlink()
            third = await pool.acquire(timeout=90)
            assert await aquery(third.endpoint, "SELECT count(*) FROM items") == [(1000,)]
            for held in (lease, served, taken, third):
                await pool.release(held.id)
            nursery.cancel_scope.cancel()
