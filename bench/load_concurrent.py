"""Concurrent load through the product: N ``aldaas connect`` at once, each with a pgbench (issue 6).

What a team would do, on one machine and loopback only:

1. one real ``aldaas serve`` (``python -m aldaas.broker serve``: local provider, a
   generated backup of 1000 rows, warm pool of ``--size``), started the way
   the end-to-end tests start it (tests/broker/aldaas_e2e.py);
2. N real ``aldaas connect --port 0 --name loadNN --release-on-exit``
   processes, started ``--stagger`` seconds apart; the broker hands out its
   warm clones and queues the rest while it makes more, ``--max-provisioning``
   at a time. The time until every client printed its DSN is reported;
3. on every lease, one ``pgbench -c S -j 1 -T SECONDS`` (the embedded
   PostgreSQL's pgbench) through that client's local port, running an indexed
   ``SELECT`` and an ``UPDATE`` per transaction;
4. meanwhile the broker process is sampled every ``--interval`` seconds from
   /proc (RSS, CPU, open file descriptors) and from its ``/metrics`` (trio
   tasks, gateway sessions and streams), with the load average;
5. then every client gets SIGINT (Ctrl-C, so it releases its lease) and the
   script waits for the broker to settle, and checks what is left: no lease,
   only the warm clones (in the broker's view, in the data folder and as
   running PostgreSQL servers), file descriptors and trio tasks back to their
   values before the load.

    python bench/load_concurrent.py [--leases 50] [--streams 4] [--seconds 60]

Bounded: every wait has a limit; on an error or Ctrl-C every pgbench, client
and the broker are stopped and the data folder removed. Prints a small time
series, one JSON object, and exits non-zero when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "broker")]

import aldaas_e2e  # noqa: E402 - a test helper: the broker process, its admin API
from conftest import traversable_data_dir  # noqa: E402

PGBENCH = str(pathlib.Path(aldaas_e2e.psql_path()).with_name("pgbench"))
ROWS = 1000
SCRIPT = (
    f"\\set id random(1, {ROWS})\n"
    "SELECT label FROM items WHERE id = :id;\n"
    "UPDATE items SET hits = hits + 1 WHERE id = :id;\n"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def write_backup(folder: pathlib.Path) -> None:
    """A gzipped plain-SQL backup: ``items`` with an index to read and a counter to update."""
    folder.mkdir(parents=True, exist_ok=True)
    sql = "CREATE TABLE items (id integer PRIMARY KEY, label text NOT NULL, hits int DEFAULT 0);\n"
    sql += "COPY items (id, label) FROM stdin;\n"
    sql += "".join(f"{i}\titem {i}\n" for i in range(1, ROWS + 1)) + "\\.\n"
    (folder / "nightly.sql.gz").write_bytes(gzip.compress(sql.encode(), mtime=0))


# -- looking at the broker ---------------------------------------------------------------------


def metric(text: str, name: str) -> float | None:
    """The value of an unlabelled metric in a Prometheus exposition, if it is there."""
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / CLK_TCK  # utime + stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLK_TCK, sum(ticks) / CLK_TCK


def look(broker: aldaas_e2e.BrokerProcess) -> dict[str, float | None]:
    """One sample of the broker process: /proc for RSS, CPU and fds, /metrics for the rest."""
    assert broker.proc is not None
    pid = broker.proc.pid
    rss = re.search(r"VmRSS:\s+(\d+)", pathlib.Path(f"/proc/{pid}/status").read_text())
    _, exposition = broker.http("GET", "/metrics")
    text = exposition if isinstance(exposition, str) else ""
    return {
        "t": time.monotonic(),
        "rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "cpu_s": cpu_seconds(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "tasks": metric(text, "aldaas_trio_tasks"),
        "sessions": metric(text, "aldaas_gateway_sessions"),
        "streams": metric(text, "aldaas_gateway_streams"),
        "load1": os.getloadavg()[0],
    }


def steady(broker: aldaas_e2e.BrokerProcess) -> dict[str, float | None]:
    """A sample with the fewest fds and tasks seen over 3 s: a health check's connection or a
    scrape open at the moment of one sample is not a leak."""
    samples = []
    for _ in range(7):
        samples.append(look(broker))
        time.sleep(0.5)
    low = dict(samples[-1])
    for key in ("fds", "tasks"):
        values = [s[key] for s in samples if s[key] is not None]
        low[key] = min(values) if values else None
    return low


def settle(broker: aldaas_e2e.BrokerProcess, size: int, limit: float) -> bool:
    """Wait until the broker holds no lease and exactly ``size`` warm clones, making nothing."""

    def quiet() -> bool:
        status, body = broker.api("GET", "/api/status")
        if status != 200:
            return False
        clones = body["pool"]["clones"]
        busy = sum(n for state, n in clones.items() if state != "warm")
        return not body["leases"] and clones.get("warm", 0) == size and busy == 0

    try:
        broker.wait_until("the pool to settle", quiet, limit=limit)
    except AssertionError:
        return False
    time.sleep(1.0)  # let the last destroy's tasks and sockets go
    return quiet()


def on_disk(data_dir: pathlib.Path) -> dict[str, int]:
    """Clone folders, half-made or half-deleted folders, and running servers in the data folder."""
    clones = data_dir / "clones"
    folders = list(clones.iterdir()) if clones.is_dir() else []
    hidden = [p for sub in data_dir.iterdir() if sub.is_dir() for p in sub.glob(".*")]
    return {
        "clone_folders": sum(1 for p in folders if not p.name.startswith(".")),
        "hidden_folders": len(hidden),
        "postgres_running": sum(1 for _ in data_dir.glob("*/*/pgdata/postmaster.pid")),
    }


# -- the clients -------------------------------------------------------------------------------


class Client:
    """One ``aldaas connect`` process; a thread reads the DSN it prints."""

    def __init__(self, index: int, clients: aldaas_e2e.Clients, logs: pathlib.Path) -> None:
        self.name = f"load{index:02d}"
        self.log_path = logs / f"{self.name}.log"
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "connect",
                    "--port",
                    "0",
                    "--name",
                    self.name,
                    "--release-on-exit",
                ],
                cwd=ROOT,
                env=clients.environ(),
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # Ctrl-C of the script reaches us, we stop it in order
            )
        self.dsn: str | None = None
        self.served_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("postgresql://") and self.dsn is None:
                self.served_at = time.monotonic()
                self.dsn = line

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, limit: float = 30) -> int:
        """Ctrl-C (the client releases its lease), then kill if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def pgbench_env(dsn: str) -> dict[str, str]:
    """libpq variables for a DSN (the password stays out of argv and out of the output)."""
    url = urllib.parse.urlsplit(dsn)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGHOST": url.hostname or "127.0.0.1",
        "PGPORT": str(url.port),
        "PGUSER": urllib.parse.unquote(url.username or ""),
        "PGPASSWORD": urllib.parse.unquote(url.password or ""),
        "PGDATABASE": url.path.lstrip("/"),
        "PGSSLMODE": "disable",
    }


def clone_ports(broker: aldaas_e2e.BrokerProcess, data_dir: pathlib.Path) -> dict[str, int]:
    """For ``--direct``: each client name's clone port, from the admin API and postmaster.pid."""
    ports = {}
    for lease in broker.leases():
        pid_file = data_dir / "clones" / lease["clone"] / "pgdata" / "postmaster.pid"
        ports[lease["labels"]["name"]] = int(pid_file.read_text().splitlines()[3])
    return ports


def pgbench_result(proc: subprocess.Popen[bytes], out: bytes, err: bytes) -> dict[str, Any]:
    text = out.decode(errors="replace")
    done = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    tps = re.search(r"tps = ([\d.]+)", text)
    return {
        "exit": proc.returncode,
        "transactions": int(done.group(1)) if done else 0,
        "failed": int(failed.group(1)) if failed else (0 if proc.returncode == 0 else -1),
        "tps": float(tps.group(1)) if tps else 0.0,
        "stderr": err.decode(errors="replace")[-300:] if proc.returncode else "",
    }


# -- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def sampling(
    broker: aldaas_e2e.BrokerProcess, interval: float
) -> Iterator[list[dict[str, float | None]]]:
    """Sample the broker every ``interval`` seconds in a thread while the block runs."""
    samples: list[dict[str, float | None]] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, ValueError):
                samples.append(look(broker))
            done.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(10)


def series_of(samples: list[dict[str, float | None]]) -> list[dict[str, float | None]]:
    """Time series from the samples: seconds since the first, CPU % over the last interval."""
    out: list[dict[str, float | None]] = []
    for prev, cur in itertools.pairwise(samples):
        dt = float(cur["t"] or 0) - float(prev["t"] or 0)
        cpu = 100 * (float(cur["cpu_s"] or 0) - float(prev["cpu_s"] or 0)) / max(dt, 1e-9)
        out.append(
            {
                "t": round(float(cur["t"] or 0) - float(samples[0]["t"] or 0), 1),
                "rss_mb": round(float(cur["rss_mb"] or 0), 1),
                "cpu_pct": round(cpu, 1),
                "fds": cur["fds"],
                "tasks": cur["tasks"],
                "streams": cur["streams"],
                "load1": round(float(cur["load1"] or 0), 2),
            }
        )
    return out


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": round(min(values), 1),
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
    }


def print_series(series: list[dict[str, float | None]]) -> None:
    print(
        f"{'t s':>6} {'RSS MB':>7} {'CPU %':>6} {'fds':>5} {'tasks':>6} {'streams':>7} {'load':>5}",
        file=sys.stderr,
    )
    for s in series:
        print(
            f"{s['t']:>6} {s['rss_mb']:>7} {s['cpu_pct']:>6} {s['fds']:>5} "
            f"{s['tasks'] if s['tasks'] is not None else '-':>6} "
            f"{s['streams'] if s['streams'] is not None else '-':>7} {s['load1']:>5}",
            file=sys.stderr,
        )


def wait_for(what: str, predicate: Callable[[], bool], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {limit:.0f} s waiting for {what}")
        time.sleep(0.1)


def run(args: argparse.Namespace, data_dir: pathlib.Path, work: pathlib.Path) -> dict[str, Any]:
    write_backup(work / "backups")
    script = work / "script.sql"
    script.write_text(SCRIPT)
    (work / "logs").mkdir()
    broker = aldaas_e2e.BrokerProcess(
        data_dir=data_dir,
        backups=work / "backups",
        log_path=work / "logs" / "broker.log",
        overrides=[
            f"pool.size={args.size}",
            f"pool.max_provisioning={args.max_provisioning}",
            f"lease.queue_timeout={args.serve_timeout}",
            "log.level=warning",
        ],
    )
    clients: list[Client] = []
    benches: list[subprocess.Popen[bytes]] = []
    broker.start()
    try:
        broker.wait_ready(warm=args.size)
        if not settle(broker, args.size, 120):
            raise RuntimeError("the broker did not settle before the load")
        before = steady(broker)
        users = aldaas_e2e.Clients(broker=broker, state_home=work / "state")
        with sampling(broker, args.interval) as samples:
            first = time.monotonic()
            for i in range(args.leases):
                clients.append(Client(i, users, work / "logs"))
                time.sleep(args.stagger)

            def all_served() -> bool:
                gone = [c.name for c in clients if c.proc.poll() is not None and c.dsn is None]
                if gone:
                    raise RuntimeError(f"aldaas connect exited before serving: {gone}")
                return all(c.dsn is not None for c in clients)

            wait_for(f"{args.leases} DSNs", all_served, args.serve_timeout + 60)
            served = [float(c.served_at or 0) - c.started for c in clients]
            all_seconds = max(float(c.served_at or 0) for c in clients) - first
            load_started = len(samples)
            clients_cpu = sum(cpu_seconds(c.proc.pid) for c in clients)
            busy0, total0 = machine_busy()
            t0 = time.monotonic()
            ports = clone_ports(broker, data_dir) if args.direct else {}
            for c in clients:
                assert c.dsn is not None
                env = pgbench_env(c.dsn)
                if args.direct:
                    env["PGPORT"] = str(ports[c.name])
                benches.append(
                    subprocess.Popen(
                        [
                            PGBENCH,
                            "-n",
                            "-f",
                            str(script),
                            "-c",
                            str(args.streams),
                            "-j",
                            "1",
                            "-T",
                            str(int(args.seconds)),
                        ],
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                    )
                )
            results = []
            for proc in benches:
                try:
                    out, err = proc.communicate(timeout=args.seconds + 120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                results.append(pgbench_result(proc, out, err))
            load_ended = len(samples)
            load_seconds = time.monotonic() - t0
            clients_cpu = sum(cpu_seconds(c.proc.pid) for c in clients) - clients_cpu
            busy1, total1 = machine_busy()
            alive_through_load = sum(1 for c in clients if c.proc.poll() is None)
            exits = [c.stop() for c in clients]
        settled = settle(broker, args.size, 300)
        after = steady(broker)
        disk = on_disk(data_dir)
    finally:
        for proc in benches:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for c in clients:
            c.stop(10)
        broker.stop(signal.SIGTERM)

    series = series_of(samples)
    during = series[max(0, load_started - 1) : max(0, load_ended - 1)]
    logs = [c.log() for c in clients]
    errors = [r for r in results if r["exit"] != 0 or r["failed"] != 0]
    client_errors = [text for text in logs if "aldaas: error" in text]
    checks = {
        "every client served": all(c.dsn for c in clients),
        "no pgbench error or failed transaction": not errors,
        "every client alive through the load": alive_through_load == args.leases,
        "every client exited 0 after Ctrl-C": all(code == 0 for code in exits),
        "no client error line": not client_errors,
        "no lease left, only warm clones": settled,
        "clone folders = warm clones": disk["clone_folders"] == args.size,
        "no half-made/half-deleted folder": disk["hidden_folders"] == 0,
        "postgres only for warm clones": disk["postgres_running"] == args.size,
        "fds back to start": (after["fds"] or 0) <= (before["fds"] or 0),
        "trio tasks back to start": before["tasks"] is None
        or (after["tasks"] or 0) <= (before["tasks"] or 0),
    }
    print_series(series)
    return {
        "leases": args.leases,
        "streams_per_lease": args.streams,
        "seconds": args.seconds,
        "pool_size": args.size,
        "max_provisioning": args.max_provisioning,
        "pgbench_to": "each clone directly (--direct)" if args.direct else "aldaas connect",
        "seconds_until_all_served": round(all_seconds, 1),
        "seconds_each_client_waited": spread(served),
        "transactions": sum(r["transactions"] for r in results),
        "tps_total": round(sum(r["tps"] for r in results), 1),
        "tps_per_lease": spread([r["tps"] for r in results]),
        "pgbench_runs_with_errors": len(errors),
        "first_errors": [r["stderr"] for r in errors[:3]],
        "client_reconnects": sum(text.count("reconnected") for text in logs),
        "first_client_errors": [text[-300:] for text in client_errors[:3]],
        "broker_during_load": {
            "rss_mb": spread([float(s["rss_mb"] or 0) for s in during]),
            "cpu_pct": spread([float(s["cpu_pct"] or 0) for s in during]),
            "fds": spread([float(s["fds"] or 0) for s in during]),
            "load1": spread([float(s["load1"] or 0) for s in during]),
        },
        "clients_cpu_pct_of_one_core": round(100 * clients_cpu / load_seconds, 1),
        "machine_cpu_busy_pct": round(100 * (busy1 - busy0) / max(total1 - total0, 1e-9), 1),
        "broker_rss_mb_before_after": [before["rss_mb"], after["rss_mb"]],
        "broker_fds_before_after": [before["fds"], after["fds"]],
        "broker_trio_tasks_before_after": [before["tasks"], after["tasks"]],
        "left_on_disk": disk,
        "checks": checks,
        "series": series,
    }


def stop_on_sigterm() -> None:
    """SIGTERM (or SIGINT, even when a shell started us in the background with it ignored)
    stops the run the way Ctrl-C does: every process it started is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=50, help="aldaas connect processes")
    parser.add_argument("--streams", type=int, default=4, help="pgbench -c per lease")
    parser.add_argument("--seconds", type=float, default=60.0, help="pgbench -T")
    parser.add_argument("--size", type=int, default=2, help="warm pool size")
    parser.add_argument("--max-provisioning", type=int, default=2, help="clones made at once")
    parser.add_argument("--stagger", type=float, default=0.2, help="seconds between clients")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="pgbench straight to each lease's clone, not through aldaas connect (a baseline)",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument(
        "--serve-timeout", type=float, default=600.0, help="queue limit for the last client"
    )
    args = parser.parse_args()
    stop_on_sigterm()
    with traversable_data_dir() as data_dir, tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        try:
            result = run(args, data_dir, work)
        except BaseException:
            log = work / "logs" / "broker.log"
            if log.exists():
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
    print(json.dumps(result, indent=2))
    sys.exit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
