"""The portable tunnel end to end: the real client and broker on the relay that runs
where Linux's epoll does not (macOS, Windows), with real PostgreSQL (slow).

The broker's gateway runs ``gateway.relay=portable``. One client runs as on macOS:
``select.epoll``, every ``EPOLL*`` and ``socket.SOCK_NONBLOCK`` are absent from the
process (tests/client/no_epoll/sitecustomize.py), so ``auto`` must pick the portable
relay. The epoll path of the same commands is tests/client/test_client_e2e.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
from collections.abc import Iterator

import psycopg
import pytest
from aldaas_e2e import (
    ROOT,
    ROWS,
    BrokerProcess,
    Clients,
    one_sentence,
    psql_path,
    running_broker,
)

pytestmark = pytest.mark.slow

NO_EPOLL = pathlib.Path(__file__).resolve().parent / "no_epoll"


@pytest.fixture(scope="module")
def broker(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    overrides = ["pool.size=1", "lease.ttl=300", "gateway.relay=portable"]
    with running_broker(module_data_dir, tmp_path_factory.mktemp("portable"), overrides) as b:
        yield b


@pytest.fixture
def clients(broker: BrokerProcess, tmp_path: pathlib.Path) -> Clients:
    broker.wait_until("a warm clone", lambda: broker.warm() >= 1)
    return Clients(broker=broker, state_home=tmp_path / "state")


def test_if_epoll_is_absent_then_run_reaches_the_database_and_releases(
    clients: Clients, broker: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If the client process has no select.epoll and no EPOLL* (as on macOS), then aldaas
    run still picks a relay, carries psql's queries and releases the lease."""
    before = broker.lease_ids()
    report = tmp_path / "relay.json"
    done = clients.run(
        "run",
        "--",
        psql_path(),
        "-X",
        "-A",
        "-t",
        "-c",
        "SELECT count(*) FROM items",
        "-c",
        "SELECT sum(length(repeat(label, 200))) FROM items, generate_series(1, 20)",
        PYTHONPATH=os.pathsep.join((str(NO_EPOLL), str(ROOT))),
        ALDAAS_TEST_RELAY_REPORT=str(report),
    )
    assert done.returncode == 0, done.stderr
    expected_bytes = 20 * 200 * sum(len(f"item {i}") for i in range(1, ROWS + 1))
    assert done.stdout.split() == [str(ROWS), str(expected_bytes)]
    assert json.loads(report.read_text()) == {"epoll_seen_by_aldaas": False, "auto": "portable"}
    assert broker.lease_ids() == before


def test_if_both_ends_are_portable_then_connect_carries_bulk_data_and_resumes(
    clients: Clients,
) -> None:
    """If gateway and client both run the portable relay, then psycopg moves megabytes
    both ways through aldaas connect (flow control), Ctrl-C ends it with 0, and a new
    client process resumes the same database."""
    with clients.connect("--port", "0", ALDAAS_TUNNEL_RELAY="portable") as first:
        dsn = first.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE blobs (id int, body text)")
            body = "y" * 1_000_000
            with conn.cursor() as cur:
                for i in range(4):  # 4 MB up: several stream windows
                    cur.execute("INSERT INTO blobs VALUES (%s, %s)", (i, body))
                cur.execute("SELECT body FROM blobs ORDER BY id")  # 4 MB down
                assert [row[0] == body for row in cur.fetchall()] == [True] * 4
        assert first.stop(signal.SIGINT) == 0
    with clients.connect("--port", "0", ALDAAS_TUNNEL_RELAY="portable") as second:
        with psycopg.connect(second.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT count(*), sum(length(body)) FROM blobs").fetchone()
        assert row == (4, 4_000_000)
        assert second.stop() == 0
    assert "resumed lease" in second.stderr
    released = clients.run("release")
    assert released.returncode == 0, released.stderr


def test_if_the_relay_variable_is_wrong_then_the_client_says_so_in_one_sentence(
    clients: Clients,
) -> None:
    """If ALDAAS_TUNNEL_RELAY names no relay, or asks for epoll in a process without it,
    then aldaas run exits 2 with one sentence naming the variable and the value."""
    unknown = clients.run("run", "--", "true", ALDAAS_TUNNEL_RELAY="kqueue")
    assert unknown.returncode == 2, unknown.stderr
    assert one_sentence(unknown.stderr) == (
        "ALDAAS_TUNNEL_RELAY must be auto, epoll or portable, got 'kqueue'; pick one of them."
    )
    absent = clients.run(
        "run",
        "--",
        "true",
        ALDAAS_TUNNEL_RELAY="epoll",
        PYTHONPATH=os.pathsep.join((str(NO_EPOLL), str(ROOT))),
    )
    assert absent.returncode == 2, absent.stderr
    assert "ALDAAS_TUNNEL_RELAY asks for the epoll relay, which needs Linux's select.epoll" in (
        one_sentence(absent.stderr)
    )
