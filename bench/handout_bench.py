#!/usr/bin/env python3
"""Client-visible hand-out latency: from asking for a database to the first query result.

Starts ``aldaas serve`` (local provider) over a generated backup of the asked
size, waits until the warm pool is full, then measures rounds of

- ``library``: ``tunnel.serve_client(NewSession)`` in this process → psycopg
  connects to the local listener → ``SELECT 1`` returns (what ``aldaas
  connect`` does after Python has started);
- ``cli``: spawn ``aldaas connect --port 0`` → read the DSN it prints →
  psycopg ``SELECT 1`` (adds interpreter start-up and imports);
- ``direct`` (baseline): psycopg straight to an already warm clone's port,
  no broker and no tunnel: what connecting to a running database costs anyway.

Each round releases its lease and waits (untimed) until the pool is warm
again, so every round measures a hand-out from a warm pool — the case the
pool exists for. The refill of each round (the clone that replaces the
handed-out one: copy, start, and its login's own password) is read from the
broker's ``aldaas_provision_seconds`` histogram. Prints p50/p90/p99/max per
mode and size, and a Markdown table for docs/benchmarks.md.

``--baseline DIR`` runs every size first against the aldaas installed in
``DIR`` (``pip install --no-deps --target DIR <older wheel>``, put first on the
broker's PYTHONPATH), then against this one, in the same run: the before/after
of a change, side by side.

    python bench/handout_bench.py --rounds 50 --sizes 100M 1G
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import pathlib
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial

import psycopg
import structlog
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aldaas import tunnel  # noqa: E402
from aldaas.client import _render as render  # noqa: E402

TOKEN = "bench-token"
ADMIN = "bench-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


def write_backup(folder: pathlib.Path, size: int) -> None:
    """A small .sql.gz that makes the server generate ~``size`` bytes of table data."""
    rows = max(1, size // 1100)  # ~1 KiB payload + tuple overhead per row
    sql = (
        "CREATE TABLE filler (id bigint PRIMARY KEY, payload text NOT NULL);\n"
        "INSERT INTO filler SELECT g, repeat(md5(g::text), 32) "
        f"FROM generate_series(1, {rows}) AS g;\n"
        "CREATE TABLE items (id int PRIMARY KEY);\nINSERT INTO items VALUES (1);\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.sql.gz").write_bytes(gzip.compress(sql.encode(), mtime=0))


def api(port: int, path: str) -> dict:  # type: ignore[type-arg]
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    req.add_header("Authorization", f"Bearer {ADMIN}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def wait_warm(admin_port: int, size: int, limit: float = 3600, quiesce: bool = False) -> None:
    """Until the pool is full; with ``quiesce`` also until nothing is made or destroyed and the
    page cache is written back (so a round does not share the disk with a 1 GB copy)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            status = api(admin_port, "/api/status")
            clones = status["pool"]["clones"]
            busy = quiesce and (clones["provisioning"] or clones["destroying"])
            if status["ready"] and clones["warm"] >= size and not busy:
                if quiesce:
                    os.sync()
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the pool did not fill up in time")


async def library_round(url: str) -> float:
    settings = tunnel.ClientSettings(url=url, listen_port=0)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        client = await nursery.start(
            partial(tunnel.serve_client, settings, tunnel.NewSession(token=TOKEN, params={}))
        )
        host, port = client.local_address
        dsn = render.dsn(client.session.info, host, port)  # what aldaas connect prints
        # psycopg's async API needs asyncio; its blocking API in a worker thread is what a
        # synchronous application does anyway.
        conn = await trio.to_thread.run_sync(partial(psycopg.connect, dsn, autocommit=True))
        row = await trio.to_thread.run_sync(lambda: conn.execute("SELECT 1").fetchone())
        assert row == (1,)
        elapsed = time.perf_counter() - started
        conn.close()
        await client.request("release", {})
        client.close()
    return elapsed


def direct_round(data: pathlib.Path) -> float:
    """Baseline: psycopg straight to a warm clone (no broker, no tunnel), same DSN options."""
    for folder in sorted((data / "clones").iterdir()):
        meta = json.loads((folder / "meta.json").read_text())["meta"]
        if meta.get("status") == "warm":
            break
    else:
        raise SystemExit("no warm clone found")
    state = json.loads((folder / "state.json").read_text())
    port = int((folder / "pgdata" / "postmaster.pid").read_text().splitlines()[3])
    info = {"user": state["user"], "password": state["password"], "database": state["database"]}
    dsn = render.dsn(info, "127.0.0.1", port)
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        elapsed = time.perf_counter() - started
    return elapsed


def cli_round(url: str, state: pathlib.Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALDAAS_")}
    env.update(ALDAAS_SERVER=url, ALDAAS_TOKEN=TOKEN, XDG_STATE_HOME=str(state))
    env["PYTHONPATH"] = str(ROOT)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aldaas.broker",
            "connect",
            "--port",
            "0",
            "--new",
            "--release-on-exit",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    dsn = proc.stdout.readline().decode().strip() if ready else ""
    if not dsn.startswith("postgresql://"):
        proc.kill()
        raise SystemExit("aldaas connect printed no DSN")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    elapsed = time.perf_counter() - started
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    return elapsed


def stop_postmasters(data: pathlib.Path) -> None:
    """Stop every PostgreSQL serving a folder under ``data`` (by the pid in postmaster.pid)."""
    for pidfile in data.glob("*/*/pgdata/postmaster.pid"):
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            if os.readlink(f"/proc/{pid}/cwd") == str(pidfile.parent.resolve()):
                os.kill(pid, signal.SIGQUIT)
        except (OSError, ValueError, IndexError):
            continue


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarize(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50": statistics.median(ms),
        "p90": quantile(ms, 0.90),
        "p99": quantile(ms, 0.99),
        "max": max(ms),
    }


def provisioned(admin_port: int) -> tuple[float, float]:
    """``aldaas_provision_seconds``' sum and count (clones made so far, and their total time)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in found:
            if line.startswith(f"aldaas_provision_seconds_{key}"):
                found[key] += float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


def bench_size(  # type: ignore[type-arg]
    size_text: str,
    rounds: int,
    pool_size: int,
    modes: list[str],
    quiesce: bool,
    pythonpath: str | None = None,
) -> dict:
    parent = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-bench-", dir="/tmp"))
    parent.chmod(0o711)
    backups, data = parent / "backups", parent / "data"
    write_backup(backups, parse_size(size_text))
    gw, admin = free_port(), free_port()
    log = (parent / "broker.log").open("wb")
    argv = [sys.executable, "-m", "aldaas.broker", "serve"]
    for item in (
        f"local.data_dir={data}", f"directory.path={backups}", "directory.suffix=.sql.gz",
        f"pool.size={pool_size}", f"gateway.port={gw}", f"gateway.instance_token={TOKEN}",
        f"admin.port={admin}", f"admin.token={ADMIN}", "log.format=json", "log.level=warning",
    ):  # fmt: skip
        argv += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALDAAS_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    broker = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)
    results: dict[str, dict[str, float]] = {}
    try:
        t0 = time.monotonic()
        wait_warm(admin, pool_size)
        ready_after = time.monotonic() - t0
        status = api(admin, "/api/status")
        on_disk = sum(f.stat().st_size for f in (data / "snapshots").rglob("*") if f.is_file())
        print(
            f"[{size_text}] pool full after {ready_after:.1f} s; "
            f"snapshot on disk {on_disk / 2**20:.0f} MiB",
            flush=True,
        )
        url = f"ws://127.0.0.1:{gw}/tunnel"
        refills: list[float] = []
        for mode in modes:
            samples = []
            before: tuple[float, float] | None = None
            for i in range(rounds + 1):  # round 0 warms up imports and libpq, not counted
                wait_warm(admin, pool_size, quiesce=quiesce)
                now = provisioned(admin)
                if before is not None and now[1] > before[1]:
                    refills.append((now[0] - before[0]) / (now[1] - before[1]))
                before = now
                if mode == "library":
                    seconds = trio.run(library_round, url)
                elif mode == "direct":
                    seconds = direct_round(data)
                else:
                    seconds = cli_round(url, parent / "state")
                if i:
                    samples.append(seconds)
            results[mode] = summarize(samples)
            print(f"[{size_text}] {mode}: {json.dumps(results[mode])}", flush=True)
        if refills:
            results["refill"] = summarize(refills)
            print(f"[{size_text}] refill: {json.dumps(results['refill'])}", flush=True)
        return {"size": size_text, "ready_after_s": ready_after, "status": status, **results}
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(120)
        log.close()
        stop_postmasters(data)  # leases and warm clones outlive the broker by design
        shutil.rmtree(parent, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--sizes", nargs="+", default=["100M"])
    parser.add_argument("--pool-size", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["direct", "library", "cli"])
    parser.add_argument(
        "--quiesce",
        action="store_true",
        help="before each round also wait until no clone is being made or destroyed, then sync",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run against the aldaas installed in DIR (first on the broker's PYTHONPATH)",
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        flush=True,
    )
    rows = []
    variants: list[tuple[str, str | None]] = [("this", None)]
    if args.baseline:
        variants.insert(0, ("baseline", os.path.abspath(args.baseline)))
    for size in args.sizes:
        for label, pythonpath in variants:
            out = bench_size(
                size, args.rounds, args.pool_size, args.modes, args.quiesce, pythonpath
            )
            for mode in [*args.modes, "refill"]:
                if mode not in out:
                    continue
                r = out[mode]
                rows.append(
                    f"| {size} | {label} | {mode} | {r['n']:.0f} | {r['p50']:.1f} | "
                    f"{r['p90']:.1f} | {r['p99']:.1f} | {r['max']:.1f} |"
                )
    print("\n| snapshot | aldaas | path | rounds | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
