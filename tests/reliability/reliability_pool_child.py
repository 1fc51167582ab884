"""Runs a pool in its own process, to be killed with SIGKILL by a test.

Usage: python reliability_pool_child.py DATA_DIR BACKUP_DIR
Prints ``LEASE <json>`` for one lease (id, secret, clone, endpoint), then
``READY``, then keeps polling the backup folder every 0.2 s (so a backup the
test puts there is restored while the test waits to kill it).
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
    SourceSettings,
    WarmPoolSettings,
)


async def main(data_dir: pathlib.Path, backups: pathlib.Path) -> None:
    local = LocalSettings(data_dir=data_dir)
    settings = attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(size=1, max_provisioning=1),
        source=SourceSettings(poll_interval=0.2),
        local=local,
    )
    source = DirectorySource(DirectorySettings(path=backups, suffix=".sql"))
    pool = Pool(settings, LocalProvider(local), source)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        while pool.statistics().clones["warm"] < 1:  # noqa: ASYNC110 - a test helper
            await trio.sleep(0.05)
        lease = await pool.acquire(ttl=3600, timeout=60)
        record = {
            "id": lease.id,
            "secret": lease.secret,
            "clone": lease.clone,
            "endpoint": attrs.asdict(lease.endpoint),
        }
        print("LEASE", json.dumps(record), flush=True)
        while pool.statistics().clones["warm"] < 1:  # noqa: ASYNC110
            await trio.sleep(0.05)
        print("READY", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
