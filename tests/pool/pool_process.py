"""Runs a pool in its own process for the kill -9 test: prints one JSON line per lease, then waits.

Usage: python pool_process.py DATA_DIR BACKUP_DIR LEASES (lease lines start with "LEASE ")
"""

from __future__ import annotations

import json
import pathlib
import sys

import attrs
import trio

from aldaas.pool import (
    DirectorySettings,
    DirectorySource,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    WarmPoolSettings,
)


async def main(data_dir: pathlib.Path, backups: pathlib.Path, leases: int) -> None:
    local = LocalSettings(data_dir=data_dir)
    settings = attrs.evolve(
        PoolSettings(), pool=WarmPoolSettings(size=2, max_provisioning=2), local=local
    )
    pool = Pool(settings, LocalProvider(local), DirectorySource(DirectorySettings(path=backups)))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        while pool.statistics().clones["warm"] < 2:  # noqa: ASYNC110 - a test helper
            await trio.sleep(0.05)
        for _ in range(leases):
            lease = await pool.acquire(ttl=3600, timeout=60)
            endpoint = attrs.asdict(lease.endpoint)
            print(
                "LEASE", json.dumps({"id": lease.id, "secret": lease.secret, "endpoint": endpoint})
            )
        while pool.statistics().clones["warm"] < 2:  # noqa: ASYNC110
            await trio.sleep(0.05)
        print("READY", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]))
