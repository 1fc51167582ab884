"""Backup keys and lease labels are untrusted; secrets never reach logs; files stay private."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import uuid
from contextlib import aclosing

import attrs
import pytest
import structlog
import trio
from pg_query import aquery
from reliability_helpers import rows_sql, wait_for

from aldaas.pool import (
    Backup,
    DirectorySettings,
    DirectorySource,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    ProviderError,
    SourceSettings,
    WarmPoolSettings,
)


def outside_etag(path: pathlib.Path) -> str:
    """The ETag the directory source would give ``path`` (so only the key check can stop it)."""
    st = path.stat()
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:20]


@pytest.mark.parametrize(
    "key",
    [
        "../outside.sql.gz",
        "../../etc/x.sql.gz",
        "nested/../../outside.sql.gz",
        "ABSOLUTE",
        "inside.sql.gz\x00.txt",
        "x" * 5000 + ".sql.gz",
        "",
    ],
)
async def test_if_a_backup_key_points_out_of_the_folder_then_nothing_is_read(
    tmp_path: pathlib.Path, key: str
) -> None:
    """If a key is absolute, climbs with '..', holds NUL or is huge, then it is refused unread."""
    folder = tmp_path / "backups"
    folder.mkdir()
    (folder / "inside.sql.gz").write_bytes(b"inside")
    outside = tmp_path / "outside.sql.gz"
    outside.write_bytes(b"SECRET BYTES OUTSIDE THE BACKUP FOLDER")
    if key == "ABSOLUTE":
        key = str(outside)
    source = DirectorySource(DirectorySettings(path=folder))
    backup = Backup(key=key, etag=outside_etag(outside), size=38, modified=0.0)
    read: list[bytes] = []

    async def read_all() -> None:
        async with aclosing(source.open(backup)) as stream:
            async for chunk in stream:
                read.append(chunk)

    with pytest.raises(ProviderError) as caught:
        await read_all()
    assert read == []
    assert len(str(caught.value)) < 400


@pytest.mark.slow
async def test_if_keys_and_labels_hold_shell_syntax_then_nothing_runs_and_nothing_leaks(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If a backup key and labels hold $(..), ; and quotes, then no shell runs them; secrets stay out of logs."""
    marker = pathlib.Path("/tmp") / f"aldaas-pwned-{uuid.uuid4().hex[:8]}"
    evil = f"$(touch {marker}-a);touch {marker}-b;`touch {marker}-c`'\".sql"
    backups = tmp_path / "backups"
    (backups / evil).parent.mkdir(parents=True)
    (backups / evil).write_bytes(rows_sql(10))
    labels = {
        "job": f"$(touch {marker}-d)",
        "../../etc/passwd": "'; DROP TABLE items; --",
        "nul": "a\x00b",
        "long": "é" * 256,
    }
    local = LocalSettings(data_dir=data_dir)
    settings = attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(size=1, max_provisioning=1),
        source=SourceSettings(poll_interval=3600.0),
        local=local,
    )
    source = DirectorySource(DirectorySettings(path=backups, suffix=".sql"))

    def make_pool() -> Pool:
        return Pool(settings, LocalProvider(local), source)

    with structlog.testing.capture_logs() as logs:
        pool = make_pool()
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await wait_for(lambda: pool.statistics().clones["warm"] == 1, "a warm clone", 120)
            (snapshot,) = pool.statistics().snapshots
            assert (snapshot.backup_key, snapshot.status) == (evil, "ready")
            lease = await pool.acquire(labels=labels)
            other = await pool.acquire(timeout=60)
            assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(10,)]
            await pool.extend(lease.id, ttl=600)
            assert not pool.verify_secret(other.id, lease.secret or "")
            await pool.release(other.id)
            nursery.cancel_scope.cancel()
        # A restart reads the labels back from the clone's meta, unchanged.
        pool = make_pool()
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert dict(pool.lease(lease.id).labels) == labels
            assert pool.verify_secret(lease.id, lease.secret or "")
            await pool.release(lease.id)
            nursery.cancel_scope.cancel()

    assert not list(marker.parent.glob(marker.name + "*")), "a shell ran a backup key or label"
    assert lease.secret is not None
    assert lease.endpoint.password is not None
    assert logs, "structlog output was captured"
    text = repr(logs)
    for secret in (lease.secret, other.secret, lease.endpoint.password):
        assert secret is not None
        assert secret not in text
        assert secret not in repr(lease)
        assert secret not in repr(pool.statistics())

    # Data folder 0700 throughout (PostgreSQL's own files aside), state files 0600.
    root = data_dir
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for dirpath, dirnames, filenames in os.walk(root):
        here = pathlib.Path(dirpath)
        # The private copy of the PostgreSQL binaries (made when the run user cannot reach the
        # venv, as in CI under /root) holds programs, not data: it is world-readable on purpose.
        dirnames[:] = [name for name in dirnames if not name.startswith(".pginstall")]
        for name in dirnames:
            mode = stat.S_IMODE((here / name).lstat().st_mode)
            assert mode & 0o077 == 0, f"{here / name} is mode {mode:o}"
        for name in filenames:
            mode = stat.S_IMODE((here / name).lstat().st_mode)
            assert mode & 0o077 == 0, f"{here / name} is mode {mode:o}"
            if name in ("meta.json", "state.json"):
                assert mode == 0o600, f"{here / name} is mode {mode:o}"
