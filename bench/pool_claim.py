"""Claim latency: how long ``Pool.acquire()`` takes when a warm clone is free.

Runs N acquires against a warm pool on the local provider (real PostgreSQL
clones, the lease persisted in the clone's meta with fsync) and the same loop
against the in-memory fake provider of the tests as the baseline (pure pool
logic, no I/O). Each acquire is timed once clones are free, then released:

- *idle warm pool*: every timed acquire waits (untimed) until the pool is
  full again, so nothing else runs meanwhile — the claim latency proper;
- *refilling meanwhile*: the next acquire starts as soon as one clone is
  warm, so it shares the event loop and the disk with clones being made and
  destroyed (what back-to-back CI jobs see);
- *idle, no liveness check*: the idle loop again with the provider's cheap
  liveness check (:class:`pool.Liveness`, asked at every hand-out) hidden from
  the pool, as before it existed; the idle runs alternate in rounds so both
  see the same machine. The check's own cost is timed on its own too.

    python bench/pool_claim.py [--acquires 200] [--size 4] [--rounds 4]

Prints p50 / p90 / p99 / max in milliseconds. Run as root or not:
the local provider runs PostgreSQL as an unprivileged user either way.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import structlog
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "pool")]

from aldaas.pool import (  # noqa: E402
    DirectorySettings,
    DirectorySource,
    Kind,
    Liveness,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    Provider,
    Source,
    WarmPoolSettings,
)

SQL = b"CREATE TABLE items (id int PRIMARY KEY, name text);\n" + b"".join(
    b"INSERT INTO items VALUES (%d, 'item %d');\n" % (i, i) for i in range(1000)
)


async def measure(
    provider: Provider, source: Source, acquires: int, size: int, *, settle: bool
) -> list[float]:
    """Time ``acquires`` hand-outs; with ``settle``, wait for a full, idle pool before each."""
    settings = PoolSettings(pool=WarmPoolSettings(size=size, max_provisioning=2))
    pool = Pool(settings, provider, source)
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with trio.fail_after(600):
            for _ in range(acquires):
                wanted = size if settle else 1
                while pool.statistics().clones["warm"] < wanted:  # noqa: ASYNC110 - untimed refill
                    await trio.sleep(0.001)
                started = time.perf_counter()
                lease = await pool.acquire(timeout=60)
                samples.append(time.perf_counter() - started)
                await pool.release(lease.id)
        nursery.cancel_scope.cancel()
    return samples


class WithoutLiveness:
    """The same provider with its :class:`pool.Liveness` method hidden (as before it existed)."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    def __getattr__(self, name: str) -> object:
        if name == "alive":
            raise AttributeError(name)
        return getattr(self._provider, name)


async def liveness_cost(
    provider: Provider, source: Source, calls: int, local: LocalSettings
) -> tuple[list[float], list[float]]:
    """Seconds per ``alive()`` call on a warm clone (batches of 100), and per first sight of it.

    The first sight is what a provider that did not make the clone pays (an adopted clone after
    a restart): ``postmaster.pid`` and ``/proc/<pid>/cwd`` too; timed on fresh providers.
    """
    settings = PoolSettings(pool=WarmPoolSettings(size=1, max_provisioning=1))
    pool = Pool(settings, provider, source)
    assert isinstance(provider, Liveness)
    samples: list[float] = []
    first: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        while pool.statistics().clones["warm"] < 1:  # noqa: ASYNC110 - untimed setup
            await trio.sleep(0.001)
        (clone,) = [r.name for r in await provider.list(Kind.CLONE)]
        for _ in range(calls // 100):
            started = time.perf_counter()
            for _ in range(100):
                assert provider.alive(clone)
            samples.append((time.perf_counter() - started) / 100)
        for _ in range(calls // 10):
            fresh = LocalProvider(local)
            started = time.perf_counter()
            assert fresh.alive(clone)
            first.append(time.perf_counter() - started)
        nursery.cancel_scope.cancel()
    return samples, first


def summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=100)
    return (
        f"{name:<28} n={len(ms):<4} p50={q[49]:.3f} ms  p90={q[89]:.3f} ms  "
        f"p99={q[98]:.3f} ms  max={ms[-1]:.3f} ms"
    )


def prepare() -> pathlib.Path:
    """A folder PostgreSQL's run user can traverse, holding ``backups/a.sql.gz``."""
    parent = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-bench-", dir="/tmp"))
    parent.chmod(0o711)
    (parent / "backups").mkdir()
    (parent / "backups" / "a.sql.gz").write_bytes(gzip.compress(SQL))
    return parent


async def main(parent: pathlib.Path, acquires: int, size: int, rounds: int) -> None:
    from pool_fakes import FakeProvider, FakeSource, FakeWorld

    fake_source = FakeSource()
    fake_source.put("a.sql", SQL, modified=1.0)
    world = FakeWorld(clone_seconds=0.0, restore_seconds_per_chunk=0.0, check_seconds=0.0)
    baseline = await measure(FakeProvider(world), fake_source, acquires, size, settle=True)

    backups = parent / "backups"
    local = LocalSettings(data_dir=parent / "data")
    provider = LocalProvider(local)
    source = DirectorySource(DirectorySettings(path=backups))
    hidden = WithoutLiveness(provider)
    idle: list[float] = []
    unchecked: list[float] = []
    per_round = max(1, acquires // rounds)
    try:
        for _ in range(rounds):  # alternate, so both see the same machine
            idle += await measure(provider, source, per_round, size, settle=True)
            unchecked += await measure(hidden, source, per_round, size, settle=True)  # type: ignore[arg-type]
        busy = await measure(provider, source, acquires, size, settle=False)
        alive, first = await liveness_cost(provider, source, 10_000, local)
    finally:
        for resource in await provider.list():
            await provider.destroy(resource.kind, resource.name)
        await provider.aclose()
    print(summary("fake provider (baseline)", baseline))
    print(summary("local, idle warm pool", idle))
    print(summary("local, refilling meanwhile", busy))
    print(summary("local, idle, no liveness check", unchecked))
    us = sorted(a * 1e6 for a in alive)
    print(f"{'alive() alone':<28} n={len(us) * 100:<5} median={statistics.median(us):.1f} µs/call")
    first_us = statistics.median(f * 1e6 for f in first)
    print(f"{'alive(), first sight':<28} n={len(first):<5} median={first_us:.1f} µs/call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acquires", type=int, default=200)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    folder = prepare()
    try:
        trio.run(main, folder, args.acquires, args.size, args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
