"""A clone's PostgreSQL dies (kill -9): its lease is reported dead and reset recovers; warm ones are replaced."""

from __future__ import annotations

import os
import pathlib
import signal

import psycopg
import pytest
import trio
from pg_query import aquery
from reliability_helpers import local_pool, rows_sql, wait_for

from aldaas.pool import (
    CloneFailed,
    CloneProvisioned,
    Kind,
    WarmPoolSettings,
)

pytestmark = pytest.mark.slow


def kill_database(data_dir: pathlib.Path, clone: str) -> int:
    """kill -9 the postmaster of ``clone`` (its children exit when it is gone); return its pid."""
    pid = int((data_dir / "clones" / clone / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    return pid


def dead(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


async def test_if_a_leased_or_warm_database_dies_then_it_is_reported_and_replaced(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If a leased clone's postgres is killed, then the lease shows dead and reset heals it."""
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "a.sql").write_bytes(rows_sql(100))
    pool, provider = local_pool(
        data_dir,
        backups,
        WarmPoolSettings(size=1, max_provisioning=1, health_check_interval=0.2),
    )

    def lease_healthy(lease_id: str) -> bool:
        (info,) = [i for i in pool.statistics().leases if i.id == lease_id]
        return info.healthy

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a warm clone", 120)
        lease = await pool.acquire()
        assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(100,)]
        assert lease_healthy(lease.id)

        # The leased database dies: the client gets a clear error, the pool says so.
        kill_database(data_dir, lease.clone)
        with pytest.raises(psycopg.OperationalError):
            await aquery(lease.endpoint, "SELECT 1")
        await wait_for(lambda: not lease_healthy(lease.id), "the lease to be reported dead", 30)
        assert lease.id in {i.id for i in pool.statistics().leases}, "the lease is kept for reset"
        healed = await pool.reset(lease.id, timeout=60)
        assert healed.clone != lease.clone
        assert await aquery(healed.endpoint, "SELECT count(*) FROM items") == [(100,)]
        assert lease_healthy(lease.id)

        # A warm database dies: the health loop replaces it; the next acquire gets a live one.
        await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a warm clone", 60)
        (warm,) = [
            r.name for r in await provider.list(Kind.CLONE) if r.meta.get("status") == "warm"
        ]
        kill_database(data_dir, warm)
        await wait_for(
            lambda: (
                not (data_dir / "clones" / warm).exists() and pool.statistics().clones["warm"] == 1
            ),
            "the dead warm clone to be replaced",
            60,
        )
        fresh = await pool.acquire(timeout=60)
        assert fresh.clone != warm
        assert await aquery(fresh.endpoint, "SELECT count(*) FROM items") == [(100,)]
        nursery.cancel_scope.cancel()


async def test_if_a_warm_database_died_since_the_last_health_check_then_acquire_skips_it(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If a warm clone's postgres was killed and no health check ran since, then acquire gives a working one."""
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "a.sql").write_bytes(rows_sql(100))
    events: list[object] = []
    pool, provider = local_pool(
        data_dir,
        backups,
        # No health check runs during the test: only the hand-out can notice the death.
        WarmPoolSettings(size=2, max_provisioning=2, health_check_interval=3600.0),
        observers=[events.append],
    )

    async def warm_clones() -> list[str]:
        return [r.name for r in await provider.list(Kind.CLONE) if r.meta.get("status") == "warm"]

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await wait_for(lambda: pool.statistics().clones["warm"] == 2, "two warm clones", 120)
        # The pool hands out the clone that became warm first: kill that one.
        victim, survivor = [e.clone for e in events if isinstance(e, CloneProvisioned)]
        pid = kill_database(data_dir, victim)
        await wait_for(lambda: dead(pid), "the killed postmaster to exit", 10)
        lease = await pool.acquire(timeout=0)  # a free clone is left: no queueing allowed
        assert lease.clone == survivor
        assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(100,)]
        found = [e for e in events if isinstance(e, CloneFailed)]
        assert [(e.clone, e.reason) for e in found] == [
            (victim, "its database was found dead at hand-out")
        ]
        await wait_for(lambda: not (data_dir / "clones" / victim).exists(), "the dead one gone", 60)

        # Every warm clone dead: acquire queues for a replacement instead of handing one out.
        await wait_for(lambda: pool.statistics().clones["warm"] == 2, "two warm clones again", 120)
        killed = {name: kill_database(data_dir, name) for name in await warm_clones()}
        await wait_for(lambda: all(map(dead, killed.values())), "both postmasters to exit", 10)
        fresh = await pool.acquire(timeout=120)
        assert fresh.clone not in killed
        assert await aquery(fresh.endpoint, "SELECT count(*) FROM items") == [(100,)]
        nursery.cancel_scope.cancel()
