"""Sequential load: N acquire → query → release cycles against a pool of size 3 (issue 6).

Runs the pool on the local provider (real PostgreSQL clones) in this process
and drives it through the Pool API directly (the broker and client CLI had
not landed when this was written; with them, the same cycle goes through
``aldaas run``). For every cycle: ``acquire()`` (timed: hand-out, including
any wait in the queue), one query over the lease's endpoint with psycopg,
``release()``. At the end it waits for the pool to settle and checks that
nothing was left behind: no lease, exactly ``size`` warm clones, no volume,
no half-made or half-deleted folder, no PostgreSQL beyond the warm clones,
and file descriptors and trio tasks back to where they were.

    python bench/load_cycles.py [--cycles 500] [--size 3] [--seconds 900]

Bounded: stops after ``--cycles`` or ``--seconds``, whichever comes first.
Prints one JSON object (figures in ms) and exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

import psycopg
import structlog
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import traversable_data_dir  # noqa: E402

from pool import (  # noqa: E402
    DirectorySettings,
    DirectorySource,
    Kind,
    LeaseHandedOut,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    SourceSettings,
    WarmPoolSettings,
)

SQL = b"CREATE TABLE items (id int PRIMARY KEY, name text);\n" + b"".join(
    b"INSERT INTO items VALUES (%d, 'item %d');\n" % (i, i) for i in range(1000)
)


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def postmasters(data_dir: pathlib.Path) -> int:
    return sum(1 for _ in data_dir.glob("*/*/pgdata/postmaster.pid"))


def query(host: str, port: int, user: str, db: str, password: str | None) -> int:
    with psycopg.connect(
        host=host, port=port, user=user, dbname=db, password=password, connect_timeout=10
    ) as conn:
        row = conn.execute("SELECT count(*) FROM items").fetchone()
        assert row is not None
        return int(row[0])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(cycles: int, size: int, seconds: float, data_dir: pathlib.Path) -> dict[str, object]:
    backups = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-load-backups-"))
    (backups / "a.sql").write_bytes(SQL)
    local = LocalSettings(data_dir=data_dir)
    settings = PoolSettings(
        pool=WarmPoolSettings(size=size, max_provisioning=2, health_check_interval=10.0),
        source=SourceSettings(poll_interval=3600.0),
        local=local,
    )
    handouts: list[float] = []
    queued: list[float] = []

    def observe(event: object) -> None:
        if isinstance(event, LeaseHandedOut):
            handouts.append(event.seconds * 1000)
            queued.append(event.queued_seconds * 1000)

    provider = LocalProvider(local)
    pool = Pool(
        settings,
        provider,
        DirectorySource(DirectorySettings(path=backups, suffix=".sql")),
        observers=[observe],
    )
    served = failed = 0
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with trio.fail_after(300):
            while pool.statistics().clones["warm"] < size:  # noqa: ASYNC110 - a script
                await trio.sleep(0.05)
        fds_before, tasks_before = open_fds(), count_tasks()
        started = time.monotonic()
        for _ in range(cycles):
            if time.monotonic() - started > seconds:
                break
            try:
                lease = await pool.acquire(timeout=120)
                e = lease.endpoint
                rows = await trio.to_thread.run_sync(
                    query, e.host, e.port, e.user, e.database, e.password
                )
                assert rows == 1000, rows
                await pool.release(lease.id)
                served += 1
            except Exception as exc:  # counted and reported, the loop goes on
                failed += 1
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
        elapsed = time.monotonic() - started
        with trio.move_on_after(300):
            while not (  # noqa: ASYNC110 - a script
                pool.statistics().clones["warm"] == size
                and pool.statistics().clones["destroying"] == 0
                and pool.statistics().clones["provisioning"] == 0
                and len(await provider.list(Kind.CLONE)) == size
            ):
                await trio.sleep(0.1)
        await trio.sleep(0.5)
        fds_after, tasks_after = open_fds(), count_tasks()
        stats = pool.statistics()
        clones = await provider.list(Kind.CLONE)
        volumes = await provider.list(Kind.VOLUME)
        leftovers = [
            p.name
            for sub in ("volumes", "snapshots", "clones")
            for p in (data_dir / sub).iterdir()
            if p.name.startswith(".")
        ]
        running = postmasters(data_dir)
        nursery.cancel_scope.cancel()
    checks = {
        "every cycle served": failed == 0 and served == cycles,
        "no lease left": stats.leases_active == 0,
        "exactly size warm clones": len(clones) == size and stats.clones["warm"] == size,
        "no volume": not volumes,
        "no half-made/half-deleted folder": not leftovers,
        "postgres only for warm clones": running == size,
        "fds back to start": fds_after <= fds_before,
        "tasks back to start": tasks_after <= tasks_before,
    }
    return {
        "cycles": served + failed,
        "served": served,
        "failed": failed,
        "errors": errors[:5],
        "seconds": round(elapsed, 1),
        "cycles_per_second": round((served + failed) / elapsed, 2),
        "handout_ms": {
            "p50": round(pct(handouts, 0.5), 2),
            "p90": round(pct(handouts, 0.9), 2),
            "p99": round(pct(handouts, 0.99), 2),
            "max": round(max(handouts), 2),
        },
        "handouts_that_queued": sum(1 for q in queued if q > 0),
        "handout_ms_when_not_queued_p99": round(
            pct([h for h, q in zip(handouts, queued, strict=True) if q == 0] or [0.0], 0.99), 2
        ),
        "mean_handout_ms": round(statistics.fmean(handouts), 2),
        "fds": [fds_before, fds_after],
        "tasks": [tasks_before, tasks_after],
        "postgres_running_after": running,
        "checks": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=900.0)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with traversable_data_dir() as data_dir:
        result = trio.run(run, args.cycles, args.size, args.seconds, data_dir)
    print(json.dumps(result, indent=2))
    sys.exit(0 if all(result["checks"].values()) else 1)  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
