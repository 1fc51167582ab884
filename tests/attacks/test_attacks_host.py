"""No path from a database to the broker: even code running as the PostgreSQL OS user is refused.

The worst case is assumed: the lease login is a superuser (``lease.superuser``), so
it can read files and run programs as the PostgreSQL OS user. The broker's
state files and its environment must still be out of reach, because the
broker runs as another uid (root here) and keeps them 0600.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import psycopg
import pytest
import trio
from pg_query import aquery

from aldaas.pool import DataFolderLock, Endpoint, Kind, LocalProvider, LocalSettings
from aldaas.pool.providers.local._files import LOCK_FILE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="PostgreSQL runs under the broker's own uid unless the broker is root",
    ),
]


@pytest.fixture
def superuser_clone(data_dir: pathlib.Path) -> Iterator[tuple[LocalProvider, Endpoint]]:
    """A clone whose login is a superuser, in a data folder a broker holds."""
    settings = LocalSettings(data_dir=data_dir)
    provider = LocalProvider(settings, lease_superuser=True)
    lock = DataFolderLock(data_dir)

    async def make() -> Endpoint:
        await provider.create_volume("v", {})
        await provider.seal("v", "s", {"lease_secret_hash": "not for postgres"})
        return await provider.clone("s", "c", {"lease_secret_hash": "not for postgres"})

    try:
        yield provider, trio.run(make)
    finally:
        lock.release()

        async def tear_down() -> None:
            await provider.destroy(Kind.CLONE, "c")
            await provider.destroy(Kind.SNAPSHOT, "s")

        trio.run(tear_down)


async def refused(endpoint: Endpoint, sql: str) -> str:
    with pytest.raises(psycopg.Error) as caught:
        await aquery(endpoint, sql)
    return str(caught.value)


async def test_if_postgres_reads_the_brokers_state_files_then_the_os_refuses(
    superuser_clone: tuple[LocalProvider, Endpoint],
) -> None:
    """If a superuser login reads state.json, meta.json or broker.lock, then the OS refuses."""
    provider, endpoint = superuser_clone
    clone = provider.data_dir / "clones" / "c"
    for path in (clone / "state.json", clone / "meta.json", provider.data_dir / LOCK_FILE):
        error = await refused(endpoint, f"SELECT pg_read_file('{path}')")
        assert "Permission denied" in error, path
    error = await refused(endpoint, f"COPY (SELECT 1) TO PROGRAM 'cat {clone / 'state.json'}'")
    assert "Permission denied" in error or "exit code 1" in error


async def test_if_postgres_reads_the_brokers_environment_then_the_os_refuses(
    superuser_clone: tuple[LocalProvider, Endpoint],
) -> None:
    """If a superuser login reads the broker's /proc/<pid>/environ, then the OS refuses."""
    _, endpoint = superuser_clone
    error = await refused(endpoint, f"SELECT pg_read_file('/proc/{os.getpid()}/environ')")
    assert "Permission denied" in error
    rows = await aquery(endpoint, "SELECT current_setting('data_directory')")
    assert rows == [(str(superuser_clone[0].data_dir / "clones" / "c" / "pgdata"),)]
