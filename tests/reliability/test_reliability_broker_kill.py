"""kill -9 of ``aldaas serve`` during a big COPY through the tunnel or a hand-out, then a restart.

A real broker process, a real ``aldaas connect`` and psql through its local
port (tests/broker/aldaas_e2e.py). The broker is killed with SIGKILL while a
1 GiB COPY streams through the tunnel, half of it sent (``ALDAAS_TEST_COPY_MB``
sets another size; the whole test takes ~10 s here); after the restart the lease
is adopted, the same ``aldaas connect`` reaches its database again through
the same DSN, what was committed before is there, and the interrupted COPY
left either all of its rows or none.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import threading
import time

# A plain import: if the helper is missing, collection fails instead of skipping the 1 GiB test.
import aldaas_e2e
import pytest

pytestmark = pytest.mark.slow

ROWS_PER_CHUNK = 20_000
CHUNK = b"".join(b"%08d\tsome text to copy through the tunnel\n" % i for i in range(ROWS_PER_CHUNK))
COPY_MB = int(os.environ.get("ALDAAS_TEST_COPY_MB", "1024"))
"""MiB the COPY streams: the issue's 1 GiB (rounded up to whole chunks); e.g. 64 for a quick run."""
CHUNKS = -(-COPY_MB * 2**20 // len(CHUNK))
KILL_AT = CHUNKS // 2
"""The broker is killed once half of the COPY was handed to psql."""


def copy_from_stdin(dsn: str, table: str) -> list[str]:
    """psql running ``COPY table FROM STDIN`` against ``dsn``, stopping at the first error."""
    return [
        aldaas_e2e.psql_path(),
        dsn,
        "-X",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        f"COPY {table} FROM STDIN",
    ]


def test_if_the_broker_is_killed_mid_copy_then_the_lease_is_reachable_again(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If kill -9 hits the broker mid-COPY, then after a restart the same DSN works and no row is half-copied."""
    aldaas_e2e.write_backup(tmp_path / "backups")
    broker = aldaas_e2e.BrokerProcess(
        data_dir=data_dir,
        backups=tmp_path / "backups",
        log_path=tmp_path / "broker.log",
        overrides=["pool.size=1"],
    )
    broker.start()
    try:
        broker.wait_ready(warm=1)
        clients = aldaas_e2e.Clients(broker=broker, state_home=tmp_path / "state")
        with clients.connect("--port", "0") as connected:
            dsn = connected.dsn()
            aldaas_e2e.psql(dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
            aldaas_e2e.psql(dsn, "CREATE TABLE big (id text, body text)")
            (lease,) = broker.lease_ids()
            copy = subprocess.Popen(
                copy_from_stdin(dsn, "big"),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            sent = threading.Event()
            started = time.monotonic()

            def feed() -> None:
                assert copy.stdin is not None
                try:
                    for i in range(CHUNKS):
                        copy.stdin.write(CHUNK)
                        if i == KILL_AT:
                            sent.set()
                    copy.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                finally:
                    sent.set()

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            assert sent.wait(600), "the COPY did not get going"
            killed_after = time.monotonic() - started
            broker.stop(signal.SIGKILL)  # mid-COPY
            # While no broker runs, the client holds its streams and keeps reconnecting.
            broker.start()
            broker.wait_until("/readyz", lambda: broker.http("GET", "/readyz")[0] == 200)
            copy_status = copy.wait(120)  # the new broker cannot resume the old stream
            feeder.join(30)
            for pipe in (copy.stdin, copy.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()  # type: ignore[union-attr]
            assert lease in broker.lease_ids()
            assert broker.wait_until(
                "a query through the same aldaas connect",
                lambda: (
                    aldaas_e2e.psql(dsn, "SELECT x FROM kept", check=False).stdout.strip() == "1"
                ),
            )
            restored = aldaas_e2e.psql(dsn, "SELECT count(*) FROM items").stdout.strip()
            assert restored == str(aldaas_e2e.ROWS), "the snapshot's own data changed"
            rows = int(aldaas_e2e.psql(dsn, "SELECT count(*) FROM big").stdout.strip())
            assert rows in (0, CHUNKS * ROWS_PER_CHUNK), f"a half-applied COPY: {rows} rows"
            assert (rows == 0) == (copy_status != 0)
            # The table is usable: a COPY after the restart lands whole.
            aldaas_e2e.psql(dsn, "CREATE TABLE after (id text, body text)")
            again = subprocess.run(
                copy_from_stdin(dsn, "after"),
                input=CHUNK,
                capture_output=True,
                check=False,
            )
            assert again.returncode == 0, again.stderr
            count = aldaas_e2e.psql(dsn, "SELECT count(*) FROM after").stdout.strip()
            assert count == str(ROWS_PER_CHUNK)
            assert connected.proc.poll() is None, "aldaas connect gave up"
            clones = [item["clone"] for item in broker.leases()]
            assert len(clones) == len(set(clones))
            print(
                f"COPY of {CHUNKS * len(CHUNK) / 2**20:.0f} MiB: broker killed after "
                f"{killed_after:.1f} s ({(KILL_AT + 1) * len(CHUNK) / 2**20:.0f} MiB handed to "
                f"psql); whole test {time.monotonic() - started:.1f} s from the COPY's start; "
                f"psql exit {copy_status}, {rows} rows"
            )
    finally:
        broker.stop(aldaas_e2e.signal.SIGTERM)


def test_if_the_broker_is_killed_during_a_second_hand_out_then_nothing_is_handed_twice(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If kill -9 hits as a second client is served (queued, or its replacement clone half-made), then no clone serves two leases.

    On the broker branch the kill landed right after the second hand-out,
    with the replacement clone still provisioning (the pool hands out in
    milliseconds, so catching it inside the queue would need a slowed clone).
    """
    aldaas_e2e.write_backup(tmp_path / "backups")
    broker = aldaas_e2e.BrokerProcess(
        data_dir=data_dir,
        backups=tmp_path / "backups",
        log_path=tmp_path / "broker.log",
        overrides=["pool.size=1"],
    )
    broker.start()
    try:
        broker.wait_ready(warm=1)
        first = aldaas_e2e.Clients(broker=broker, state_home=tmp_path / "one")
        second = aldaas_e2e.Clients(broker=broker, state_home=tmp_path / "two")
        with first.connect("--port", "0") as one:
            dsn = one.dsn()
            aldaas_e2e.psql(dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
            (lease,) = broker.lease_ids()
            with second.connect("--port", "0") as two:

                def queued_or_served() -> bool:
                    _, body = broker.api("GET", "/api/status")
                    return body["pool"]["queue_length"] >= 1 or len(body["leases"]) >= 2

                broker.wait_until("the second client in the queue", queued_or_served)
                broker.stop(signal.SIGKILL)  # mid hand-out
                broker.start()
                broker.wait_until("/readyz", lambda: broker.http("GET", "/readyz")[0] == 200)
                assert lease in broker.lease_ids()
                assert broker.wait_until(
                    "the first client's database again",
                    lambda: (
                        aldaas_e2e.psql(dsn, "SELECT x FROM kept", check=False).stdout.strip()
                        == "1"
                    ),
                )
                # The second client either got a database after the restart or said why not.
                if two.proc.poll() is None:
                    other = two.dsn()
                    assert broker.wait_until(
                        "the second client's database",
                        lambda: (
                            aldaas_e2e.psql(other, "SELECT count(*) FROM items", check=False)
                            .stdout.strip()
                            .isdigit()
                        ),
                    )
                else:
                    aldaas_e2e.one_sentence(two.stderr + two.proc.stderr.read().decode())  # type: ignore[union-attr]
                clones = [item["clone"] for item in broker.leases()]
                assert len(clones) == len(set(clones)), clones
    finally:
        broker.stop(aldaas_e2e.signal.SIGTERM)
