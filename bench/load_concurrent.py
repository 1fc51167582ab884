"""Concurrent load: N leases at once, each with S pgbench streams, for a bounded time (issue 6).

The pool runs on the local provider in this process. N leases are acquired
at once (the pool is sized N, so all of them are warm first); each lease then
gets one ``pgbench`` run with S client connections (``-c S``) running a
read-and-write script against its own clone for ``--seconds``. Meanwhile
this process's RSS, CPU and open file descriptors are sampled every 2 s.
Afterwards every lease is released and the script checks that nothing leaked:
file descriptors and trio tasks back to their values before the load, every
leased clone destroyed, no PostgreSQL beyond the warm ones.

pgbench talks to the clones directly: until the broker, gateway and
``aldaas connect`` land on main this measures the pool and provider holding
N busy leases, not the tunnel. (With them, the pgbench runs go through
``aldaas connect`` instead and the sampled process is the broker.)

    python bench/load_concurrent.py [--leases 50] [--streams 4] [--seconds 60]

Bounded by ``--seconds`` (+ the time to make N clones). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
import time

import structlog
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import traversable_data_dir  # noqa: E402

from pool import (  # noqa: E402
    DirectorySettings,
    DirectorySource,
    Kind,
    Lease,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    SourceSettings,
    WarmPoolSettings,
)
from pool._postgres import embedded_bin_dir  # noqa: E402

SQL = (
    b"CREATE TABLE items (id int PRIMARY KEY, name text, hits int NOT NULL DEFAULT 0);\n"
    b"INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 1000) AS i;\n"
)
SCRIPT = (
    "\\set id random(1, 1000)\n"
    "SELECT name FROM items WHERE id = :id;\n"
    "UPDATE items SET hits = hits + 1 WHERE id = :id;\n"
)


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def sample() -> dict[str, float]:
    status = pathlib.Path("/proc/self/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    t = os.times()
    return {
        "t": time.monotonic(),
        "rss_mb": rss_kb / 1024,
        "cpu_s": t.user + t.system,
        "fds": len(os.listdir("/proc/self/fd")),
    }


async def pgbench(
    lease: Lease, streams: int, seconds: float, script: pathlib.Path
) -> dict[str, object]:
    e = lease.endpoint
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGHOST": e.host,
        "PGPORT": str(e.port),
        "PGUSER": e.user,
        "PGDATABASE": e.database,
        "PGPASSWORD": e.password or "",
    }
    argv = [
        str(embedded_bin_dir() / "pgbench"),
        "-n",
        "-f",
        str(script),
        "-c",
        str(streams),
        "-j",
        "1",
        "-T",
        str(int(seconds)),
    ]
    with trio.fail_after(seconds + 60):
        result = await trio.run_process(
            argv, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    out = result.stdout.decode(errors="replace")
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+)", out)
    return {
        "exit": result.returncode,
        "transactions": int(done.group(1)) if done else 0,
        "failed": int(failed.group(1)) if failed else (0 if result.returncode == 0 else -1),
        "tps": float(tps.group(1)) if tps else 0.0,
        "stderr": result.stderr.decode(errors="replace")[-300:] if result.returncode else "",
    }


async def settled(pool: Pool, provider: LocalProvider, size: int) -> None:
    """Wait until the pool holds exactly ``size`` warm clones and makes or destroys nothing."""
    while True:
        c = pool.statistics().clones
        quiet = (c["warm"], c["provisioning"], c["destroying"], c["leased"]) == (size, 0, 0, 0)
        if quiet and len(await provider.list(Kind.CLONE)) == size:
            return
        await trio.sleep(0.2)


async def run(
    leases: int, streams: int, seconds: float, size: int, data_dir: pathlib.Path
) -> dict[str, object]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-load-"))
    (work / "backups").mkdir()
    (work / "backups" / "a.sql").write_bytes(SQL)
    script = work / "script.sql"
    script.write_text(SCRIPT)
    local = LocalSettings(data_dir=data_dir, conf={"max_connections": str(streams + 10)})
    settings = PoolSettings(
        pool=WarmPoolSettings(size=size, max_provisioning=2, health_check_interval=10.0),
        source=SourceSettings(poll_interval=3600.0),
        local=local,
    )
    provider = LocalProvider(local)
    pool = Pool(
        settings, provider, DirectorySource(DirectorySettings(path=work / "backups", suffix=".sql"))
    )
    samples: list[dict[str, float]] = []
    results: list[dict[str, object]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with trio.fail_after(300):
            await settled(pool, provider, size)
        await trio.sleep(1.0)
        fds_before, tasks_before = sample()["fds"], count_tasks()
        made = time.monotonic()
        held: list[Lease] = []

        async def take() -> None:
            held.append(await pool.acquire(ttl=3600, timeout=60 + 10 * leases))

        async with trio.open_nursery() as crowd:  # N acquires at once: the queue serves them
            for _ in range(leases):
                crowd.start_soon(take)
        warm_seconds = time.monotonic() - made

        async def sampler() -> None:
            while True:
                samples.append(sample())
                await trio.sleep(2.0)

        async def one(lease: Lease) -> None:
            results.append(await pgbench(lease, streams, seconds, script))

        async with trio.open_nursery() as load:
            load.start_soon(sampler)
            async with trio.open_nursery() as runs:
                for lease in held:
                    runs.start_soon(one, lease)
            load.cancel_scope.cancel()
        for lease in held:
            await pool.release(lease.id)
        with trio.move_on_after(300):
            await settled(pool, provider, size)
        await trio.sleep(1.0)
        fds_after, tasks_after = sample()["fds"], count_tasks()
        left = {lease.clone for lease in held} & {r.name for r in await provider.list(Kind.CLONE)}
        running = await trio.to_thread.run_sync(
            lambda: sum(1 for _ in data_dir.glob("*/*/pgdata/postmaster.pid"))
        )
        nursery.cancel_scope.cancel()
    t0 = samples[0]["t"] if samples else 0.0
    series = [
        {
            "t": round(s["t"] - t0, 1),
            "rss_mb": round(s["rss_mb"], 1),
            "cpu_pct": round(100 * (s["cpu_s"] - p["cpu_s"]) / max(1e-9, s["t"] - p["t"]), 1),
            "fds": int(s["fds"]),
        }
        for p, s in itertools.pairwise(samples)
    ]
    total = sum(int(r["transactions"]) for r in results)  # type: ignore[call-overload]
    errors = [r for r in results if r["exit"] != 0 or r["failed"] != 0]
    return {
        "leases": leases,
        "streams_per_lease": streams,
        "seconds": seconds,
        "pool_size": size,
        "seconds_until_all_leases_held": round(warm_seconds, 1),
        "transactions": total,
        "tps_total": round(sum(float(r["tps"]) for r in results), 1),  # type: ignore[arg-type]
        "pgbench_runs_with_errors": len(errors),
        "first_errors": [r["stderr"] for r in errors[:3]],
        "fds_before_after": [fds_before, fds_after],
        "tasks_before_after": [tasks_before, tasks_after],
        "leased_clones_left": sorted(left),
        "postgres_running_after": running,
        "pool_process_rss_mb_max": max((s["rss_mb"] for s in series), default=0.0),
        "pool_process_cpu_pct_mean": round(
            sum(s["cpu_pct"] for s in series) / max(1, len(series)), 1
        ),
        "series": series,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=50)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", type=int, default=2, help="warm pool size")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with traversable_data_dir() as data_dir:
        result = trio.run(run, args.leases, args.streams, args.seconds, args.size, data_dir)
    print(json.dumps(result, indent=2))
    ok = (
        result["pgbench_runs_with_errors"] == 0
        and not result["leased_clones_left"]
        and result["fds_before_after"][1] <= result["fds_before_after"][0]  # type: ignore[index]
        and result["tasks_before_after"][1] <= result["tasks_before_after"][0]  # type: ignore[index]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
