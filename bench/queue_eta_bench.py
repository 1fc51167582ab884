#!/usr/bin/env python3
"""Queue ETA error: 8 ``aldaas run`` clients queued behind a pool of 1 (real broker, real clones).

Starts ``aldaas serve`` (local provider, a generated backup, ``pool.size=1``), leases the
pool's one clone with ``aldaas connect``, then starts 8 ``aldaas run -- true`` at once. Each
client prints its queue progress off a terminal (``queued 1 of 5, eta 12s``); the bench
stamps every line as it arrives and reports, for each client that was told an ETA at the
head of the queue, the ETA against the time it actually waited from then until its lease
(``lease ... on`` line). The client shows ETAs in whole seconds, so short waits carry up to
0.5 s of rounding; read the absolute error beside the relative one. Run as root or the PostgreSQL user, from the repository:

    python bench/queue_eta_bench.py [--clients 8] [--rows 200000]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "broker"))
sys.path.insert(0, str(ROOT / "tests"))

from aldaas_e2e import BrokerProcess, Clients, write_backup  # noqa: E402
from conftest import traversable_data_dir  # noqa: E402

_HEAD = re.compile(r"queued 1 of \d+, eta (?:(\d+)m)?(\d+)s")


def stamp_lines(proc: subprocess.Popen[bytes], out: list[tuple[float, str]]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        out.append((time.monotonic(), raw.decode(errors="replace").strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the backup's table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, traversable_data_dir() as data:
        work = pathlib.Path(tmp)
        write_backup(work / "backups", rows=args.rows)
        broker = BrokerProcess(
            data_dir=data,
            backups=work / "backups",
            log_path=work / "broker.log",
            overrides=["pool.size=1", "lease.queue_timeout=900"],
        )
        with broker.running(warm=1):
            clients = Clients(broker=broker, state_home=work / "state")
            with clients.connect("--port", "0") as holder:
                holder.dsn(limit=300)
                procs = []
                lines: list[list[tuple[float, str]]] = []
                for _ in range(args.clients):
                    argv = ["run", "--timeout", "900", "--", "true"]
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "aldaas.client", *argv],
                        cwd=ROOT,
                        env=clients.environ(),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    out: list[tuple[float, str]] = []
                    threading.Thread(target=stamp_lines, args=(proc, out), daemon=True).start()
                    procs.append(proc)
                    lines.append(out)
                for proc in procs:
                    proc.wait(timeout=900)
                time.sleep(0.5)
    errors = []
    print("| client | ETA at the head | actual wait | error | abs. error |")
    print("|---|---|---|---|---|")
    for i, out in enumerate(lines):
        head = next(((t, m) for t, line in out if (m := _HEAD.search(line))), None)
        leased = next((t for t, line in out if line.startswith("lease ")), None)
        if head is None or leased is None:
            continue
        when, match = head
        eta = int(match.group(1) or 0) * 60 + int(match.group(2))
        actual = leased - when
        error = (eta - actual) / actual if actual > 0 else float("nan")
        errors.append(abs(error))
        print(f"| {i + 1} | {eta} s | {actual:.1f} s | {error:+.0%} | {abs(eta - actual):.1f} s |")
    if errors:
        print(f"\nmedian |error| {statistics.median(errors):.0%}, max {max(errors):.0%}")


if __name__ == "__main__":
    main()
