"""Sequential load through the product: N ``aldaas run -- psql`` cycles, pool size 3 (issue 6).

What a CI job does for each test run, one after the other against one real
``aldaas serve`` (``python -m aldaas.broker serve``: local provider, a generated
backup of 1000 rows, loopback only):

    aldaas run -- sh -c 'date +%s.%N; exec psql -X -A -t -c "SELECT count(*) FROM items"'

``aldaas run`` gets a fresh database (acquire), runs the command against it
through its local port (query), and releases the lease when the command
ends (release). Three times are reported for every cycle:

- *hand-out*: the broker's own measure, from the acquire call to the lease
  being returned (``seconds`` of its ``lease.acquired`` log event, the value
  its ``aldaas_handout_seconds`` histogram observes), and whether it queued;
- *to the command*: from starting ``aldaas run`` to the command running on
  the database (Python start-up, websocket, hand-out, local listener);
- *whole cycle*: from starting ``aldaas run`` to its exit (and the release).

At the end the script waits for the broker to settle and checks that
nothing was left behind: no lease, exactly ``--size`` warm clones (in the
broker's view, as clone folders, as running PostgreSQL), no volume, no
half-made or half-deleted folder, broker file descriptors and trio tasks
back to their values before the cycles.

    python bench/load_cycles.py [--cycles 500] [--size 3] [--seconds 1800]

Bounded: stops after ``--cycles`` or ``--seconds``, whichever comes first;
the broker is stopped and the data folder removed on any error or Ctrl-C.
Prints one JSON object (times in ms) and exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "broker")]

import aldaas_e2e  # noqa: E402 - a test helper: the broker process, its admin API
from conftest import traversable_data_dir  # noqa: E402
from load_concurrent import (  # noqa: E402
    ROWS,
    on_disk,
    settle,
    steady,
    stop_on_sigterm,
    write_backup,
)

QUERY = 'date +%s.%N; exec "$0" -X -A -t -c "SELECT count(*) FROM items"'


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(pct(values, 0.5), 1),
        "p90": round(pct(values, 0.9), 1),
        "p99": round(pct(values, 0.99), 1),
        "max": round(max(values, default=0.0), 1),
    }


def handouts(log: pathlib.Path) -> list[dict[str, Any]]:
    """The broker's ``lease.acquired`` events (JSON log lines), in order."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if '"lease.acquired"' in line:
            event = json.loads(line)
            if event.get("event") == "lease.acquired":
                events.append(event)
    return events


def one_cycle(users: aldaas_e2e.Clients) -> tuple[bool, float, float, str]:
    """One ``aldaas run``: (served, ms to the command, ms for the whole cycle, error text)."""
    start_wall, start = time.time(), time.monotonic()
    try:
        done = users.run("run", "--", "sh", "-c", QUERY, aldaas_e2e.psql_path(), timeout=180)
    except subprocess.TimeoutExpired:
        return False, 0.0, (time.monotonic() - start) * 1000, "aldaas run took over 180 s"
    whole = (time.monotonic() - start) * 1000
    lines = done.stdout.split()
    ok = done.returncode == 0 and len(lines) == 2 and lines[1] == str(ROWS)
    to_command = (float(lines[0]) - start_wall) * 1000 if lines else 0.0
    error = "" if ok else f"exit {done.returncode}: {done.stdout[-100:]} {done.stderr[-300:]}"
    return ok, to_command, whole, error


def run(args: argparse.Namespace, data_dir: pathlib.Path, work: pathlib.Path) -> dict[str, Any]:
    write_backup(work / "backups")
    log = work / "broker.log"
    broker = aldaas_e2e.BrokerProcess(
        data_dir=data_dir,
        backups=work / "backups",
        log_path=log,
        overrides=[f"pool.size={args.size}", "pool.max_provisioning=2"],
    )
    broker.start()
    try:
        broker.wait_ready(warm=args.size)
        if not settle(broker, args.size, 120):
            raise RuntimeError("the broker did not settle before the cycles")
        before = steady(broker)
        already = len(handouts(log))
        users = aldaas_e2e.Clients(broker=broker, state_home=work / "state")
        to_command: list[float] = []
        whole: list[float] = []
        errors: list[str] = []
        load1: list[float] = []
        served = 0
        started = time.monotonic()
        for i in range(args.cycles):
            if time.monotonic() - started > args.seconds:
                break
            ok, ms_command, ms_whole, error = one_cycle(users)
            served += ok
            whole.append(ms_whole)
            load1.append(os.getloadavg()[0])
            if ok:
                to_command.append(ms_command)
            else:
                errors.append(error)
            if args.progress and (i + 1) % 50 == 0:
                print(f"{i + 1} cycles, {len(errors)} failed", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
        settled = settle(broker, args.size, 300)
        after = steady(broker)
        disk = on_disk(data_dir)
        volumes = [p.name for p in (data_dir / "volumes").glob("[!.]*")]
        events = handouts(log)[already:]
    finally:
        broker.stop(signal.SIGTERM)

    handout_ms = [float(e["seconds"]) * 1000 for e in events]
    queued = [float(e.get("queued_seconds", 0)) > 0 for e in events]
    cycles = len(whole)
    checks = {
        "every cycle served": served == cycles == args.cycles,
        "one hand-out per cycle": len(events) == cycles,
        "no lease left, exactly size warm clones": settled,
        "clone folders = warm clones": disk["clone_folders"] == args.size,
        "no volume": not volumes,
        "no half-made/half-deleted folder": disk["hidden_folders"] == 0,
        "postgres only for warm clones": disk["postgres_running"] == args.size,
        "fds back to start": (after["fds"] or 0) <= (before["fds"] or 0),
        "trio tasks back to start": (after["tasks"] or 0) <= (before["tasks"] or 0),
    }
    return {
        "cycles": cycles,
        "served": served,
        "failed": cycles - served,
        "errors": errors[:5],
        "seconds": round(elapsed, 1),
        "cycles_per_second": round(cycles / elapsed, 2) if elapsed else 0.0,
        "pool_size": args.size,
        "handout_ms_broker": spread(handout_ms),
        "handouts_that_queued": sum(queued),
        "handout_ms_broker_not_queued": spread(
            [h for h, q in zip(handout_ms, queued, strict=True) if not q]
        ),
        "start_to_command_ms": spread(to_command),
        "whole_cycle_ms": spread(whole),
        "load_average_1min": {
            "min": min(load1, default=0.0),
            "median": statistics.median(load1) if load1 else 0.0,
            "max": max(load1, default=0.0),
        },
        "broker_fds_before_after": [before["fds"], after["fds"]],
        "broker_trio_tasks_before_after": [before["tasks"], after["tasks"]],
        "broker_rss_mb_before_after": [before["rss_mb"], after["rss_mb"]],
        "left_on_disk": {**disk, "volumes": len(volumes)},
        "checks": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--size", type=int, default=3, help="warm pool size")
    parser.add_argument("--seconds", type=float, default=1800.0, help="stop starting cycles after")
    parser.add_argument("--progress", action="store_true", help="a line every 50 cycles")
    args = parser.parse_args()
    stop_on_sigterm()
    with traversable_data_dir() as data_dir, tempfile.TemporaryDirectory() as tmp:
        result = run(args, data_dir, pathlib.Path(tmp))
    print(json.dumps(result, indent=2))
    sys.exit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
