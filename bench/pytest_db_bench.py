#!/usr/bin/env python3
"""Per-test database creation of the pytest plugin: ``CREATE DATABASE ... TEMPLATE`` in a lease.

Leases one database from the broker in ``ALDAAS_SERVER`` / ``ALDAAS_TOKEN`` (as the plugin
does), then times what ``aldaas_database`` costs per test — create a copy of the leased
database, then drop it — for each copy method, interleaved round by round so load hits
them alike:

- ``clone``: ``STRATEGY FILE_COPY`` with PostgreSQL 18's ``file_copy_method = clone`` (the
  plugin's default; reflinks where the file system has them),
- ``file_copy``: ``STRATEGY FILE_COPY`` with the default ``file_copy_method = copy``,
- ``wal_log``: ``STRATEGY WAL_LOG`` (PostgreSQL's own default since 15).

Everything goes through the tunnel, as a test's would. Run against the demo's broker:

    aldaas serve --config examples/local.yaml &          # the shipped 3 MB sample backup
    ALDAAS_SERVER=ws://127.0.0.1:8765 ALDAAS_TOKEN=demo-only-instance-token \\
        python bench/pytest_db_bench.py --rounds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import psycopg
from psycopg import sql

from aldaas.client import _state
from aldaas.client._lease_thread import LeaseThread
from aldaas.client._options import resolve

METHODS = ("clone", "file_copy", "wal_log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="copies per method")
    args = parser.parse_args()
    environ = dict(os.environ)
    lease = LeaseThread(
        resolve(environ=environ, state_dir=_state.state_dir(environ), default_port=0)
    )
    database = lease.start()
    try:
        with psycopg.connect(database.with_database("postgres").url, autocommit=True) as conn:
            version = conn.info.server_version
            size = conn.execute("SELECT pg_database_size(%s)", (database.database,)).fetchone()
            print(f"PostgreSQL {version}, template {database.database}: {size[0] / 1e6:.1f} MB")
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            create_times: dict[str, list[float]] = {m: [] for m in METHODS}
            for n in range(args.rounds):
                for method in METHODS:
                    name = f"bench_{method}_{n}"
                    conn.execute(
                        "SET file_copy_method = clone"
                        if method == "clone"
                        else "RESET file_copy_method"
                    )
                    strategy = "WAL_LOG" if method == "wal_log" else "FILE_COPY"
                    started = time.perf_counter()
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY {}").format(
                            sql.Identifier(name),
                            sql.Identifier(database.database),
                            sql.SQL(strategy),
                        )
                    )
                    created = time.perf_counter()
                    conn.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                    )
                    done = time.perf_counter()
                    create_times[method].append(created - started)
                    times[method].append(done - started)
        print("| method | create, median (p90) | create + drop, median (p90) |")
        print("|---|---|---|")
        for method in METHODS:
            c, t = sorted(create_times[method]), sorted(times[method])
            p90 = int(len(t) * 0.9)
            print(
                f"| {method} | {statistics.median(c) * 1000:.1f} ms ({c[p90] * 1000:.1f} ms) "
                f"| {statistics.median(t) * 1000:.1f} ms ({t[p90] * 1000:.1f} ms) |"
            )
    finally:
        lease.release()


if __name__ == "__main__":
    main()
