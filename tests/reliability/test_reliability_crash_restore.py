"""kill -9 of a process running the pool in the middle of a restore, then a restart.

The ready snapshot and the live lease survive intact, the half-made volume
(and the restore command still feeding it) are cleaned away, and no clone is
ever handed out twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import attrs
import pytest
import trio
from pg_query import aquery
from reliability_helpers import rows_sql, wait_for

from aldaas.pool import (
    DirectorySettings,
    DirectorySource,
    Endpoint,
    Kind,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    SourceSettings,
    WarmPoolSettings,
)

pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent


def processes_in(folder: pathlib.Path) -> list[int]:
    """Pids of processes whose working directory is ``folder`` or below it."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cwd = os.readlink(proc / "cwd").removesuffix(" (deleted)")
                if cwd == str(folder) or cwd.startswith(f"{folder}/"):
                    found.append(int(proc.name))
    return found


def run_until_restoring(
    data_dir: pathlib.Path, backups: pathlib.Path
) -> tuple[dict[str, str], str]:
    """Start the pool process, take its lease, give it a big backup, kill -9 it mid-restore."""
    lease: dict[str, str] = {}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with subprocess.Popen(
        [sys.executable, str(HERE / "reliability_pool_child.py"), str(data_dir), str(backups)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("LEASE "):  # other lines are the pool's logs
                    lease = json.loads(line.removeprefix("LEASE "))
                if line.startswith("READY"):
                    break
            (backups / "b.sql").write_bytes(rows_sql(300_000))
            for line in proc.stdout:  # the log says when the restore has begun
                if "snapshot.restore_progress" in line:
                    break
            volumes = [p.name for p in (data_dir / "volumes").iterdir()]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (volume,) = volumes
    return lease, volume


async def test_if_the_pool_is_killed_mid_restore_then_a_restart_keeps_what_was_ready(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If kill -9 hits during a restore, then the restart serves the old snapshot and drops the half-made one."""
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "a.sql").write_bytes(rows_sql(1000))
    lease, volume = await trio.to_thread.run_sync(run_until_restoring, data_dir, backups)
    assert (data_dir / "volumes" / volume).is_dir(), "killed while the volume was being restored"
    endpoint = Endpoint(**lease["endpoint"])  # type: ignore[arg-type]
    assert await aquery(endpoint, "SELECT count(*) FROM items") == [(1000,)]
    snapshots_before = sorted(p.name for p in (data_dir / "snapshots").iterdir())

    (backups / "b.sql").unlink()  # the restart should not start the big restore again
    local = LocalSettings(data_dir=data_dir)
    settings = attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(size=1, max_provisioning=1),
        source=SourceSettings(poll_interval=3600.0),
        local=local,
    )
    provider = LocalProvider(local)
    pool = Pool(settings, provider, DirectorySource(DirectorySettings(path=backups, suffix=".sql")))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        assert [r.name for r in await provider.list(Kind.VOLUME)] == []
        assert not (data_dir / "volumes" / volume).exists()
        await wait_for(lambda: not processes_in(data_dir / "volumes"), "the restore to be gone", 30)
        stats = pool.statistics()
        assert [s.status for s in stats.snapshots] == ["ready"]
        assert sorted(p.name for p in (data_dir / "snapshots").iterdir()) == snapshots_before
        assert pool.verify_secret(lease["id"], lease["secret"])
        assert pool.lease(lease["id"]).clone == lease["clone"]
        assert await aquery(endpoint, "SELECT count(*) FROM items") == [(1000,)]
        taken = [await pool.acquire(timeout=60) for _ in range(2)]
        clones = [lease["clone"], *(t.clone for t in taken)]
        assert len(set(clones)) == 3, clones
        for t in taken:
            assert await aquery(t.endpoint, "SELECT count(*) FROM items") == [(1000,)]
        nursery.cancel_scope.cancel()
