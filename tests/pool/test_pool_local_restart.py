"""kill -9 of a process holding the pool, then a restart: live leases still connect, orphans go."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys

import attrs
import pytest
import trio
from pg_query import query

from aldaas.pool import (
    DirectorySettings,
    DirectorySource,
    Endpoint,
    Kind,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    WarmPoolSettings,
)

pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent


def run_and_kill(data_dir: pathlib.Path, backups: pathlib.Path) -> list[dict[str, object]]:
    """Start the pool process, read its two leases, then kill -9 it."""
    leases = []
    with subprocess.Popen(
        [sys.executable, str(HERE / "pool_process.py"), str(data_dir), str(backups), "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("READY"):
                    break
                if line.startswith("LEASE "):  # other lines are the pool's logs
                    leases.append(json.loads(line.removeprefix("LEASE ")))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return leases


async def test_if_the_pool_process_is_killed_then_a_new_pool_keeps_its_leases(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If the pool process gets kill -9, then a new pool adopts leases, drops orphans, serves 6 at once."""
    backups = tmp_path / "backups"
    backups.mkdir()
    sql = b"CREATE TABLE items (id int);\nINSERT INTO items SELECT generate_series(1, 42);\n"
    (backups / "a.sql.gz").write_bytes(gzip.compress(sql))
    leases = await trio.to_thread.run_sync(run_and_kill, data_dir, backups)
    assert len(leases) == 2
    endpoints = [Endpoint(**lease["endpoint"]) for lease in leases]  # type: ignore[arg-type]
    # The databases outlive the broker: the lease holders keep working.
    for endpoint in endpoints:
        assert await trio.to_thread.run_sync(query, endpoint, "SELECT count(*) FROM items") == [
            (42,)
        ]
    local = LocalSettings(data_dir=data_dir)
    provider = LocalProvider(local)
    # Half-made things a crash could leave: a clone that was starting, a volume mid-restore.
    resources = await provider.list()
    (snapshot,) = [r.name for r in resources if r.kind is Kind.SNAPSHOT]
    await provider.clone(snapshot, "clone-orphan", {"status": "provisioning"})
    settings = attrs.evolve(
        PoolSettings(), pool=WarmPoolSettings(size=2, max_provisioning=2), local=local
    )
    pool = Pool(settings, provider, DirectorySource(DirectorySettings(path=backups)))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            names = {r.name for r in await provider.list(Kind.CLONE)}
            assert "clone-orphan" not in names
            for lease, endpoint in zip(leases, endpoints, strict=True):
                assert pool.verify_secret(str(lease["id"]), str(lease["secret"])) is True
                adopted = pool.lease(str(lease["id"]))
                assert (adopted.endpoint.host, adopted.endpoint.port) == (
                    endpoint.host,
                    endpoint.port,
                )
                rows = await trio.to_thread.run_sync(query, endpoint, "SELECT count(*) FROM items")
                assert rows == [(42,)]
            stats = pool.statistics()
            assert (stats.leases_active, stats.clones["warm"]) == (2, 2)
            assert [s.status for s in stats.snapshots] == ["ready"]
            await pool.release(str(leases[0]["id"]))

            # Six acquires at once on real clones: six different databases (the pool logic is
            # tested with 20 concurrent acquires over the fake provider; real clones cost ~1 s each).
            taken = []

            async def take() -> None:
                taken.append(await pool.acquire(timeout=120))

            async with trio.open_nursery() as crowd:
                for _ in range(6):
                    crowd.start_soon(take)
            assert len({lease.clone for lease in taken}) == 6
            assert len({lease.endpoint.port for lease in taken}) == 6
            for i, lease in enumerate(taken):
                await trio.to_thread.run_sync(query, lease.endpoint, f"CREATE TABLE mark_{i} ()")
            first = await trio.to_thread.run_sync(
                query,
                taken[0].endpoint,
                "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'mark%'",
            )
            assert first == [(1,)]

            # A short idle TTL on a real clone: expiry stops and deletes its database.
            brief = await pool.acquire(ttl=0.3)
            with trio.fail_after(30):
                while brief.clone in {r.name for r in await provider.list(Kind.CLONE)}:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert brief.id not in {lease.id for lease in pool.leases()}
        finally:
            nursery.cancel_scope.cancel()
    for resource in await provider.list():
        await provider.destroy(resource.kind, resource.name)
