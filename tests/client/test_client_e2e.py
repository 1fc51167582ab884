"""End to end through the real client, gateway and pool, with real PostgreSQL (slow).

One broker serves the whole module (pool of 2, a 500-row backup); each test
uses its own client state folder so cached leases never leak between tests.
"""

from __future__ import annotations

import pathlib
import signal
import struct
from collections.abc import Iterator

import psycopg
import pytest
import websockets.exceptions
import websockets.sync.client
from aldaas_e2e import (
    INSTANCE_TOKEN,
    ROWS,
    BrokerProcess,
    Clients,
    one_sentence,
    psql,
    psql_path,
    write_backup,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    work = tmp_path_factory.mktemp("client-e2e")
    write_backup(work / "backups")
    with BrokerProcess(
        data_dir=module_data_dir,
        backups=work / "backups",
        log_path=work / "broker.log",
        overrides=["pool.size=2", "lease.ttl=300", "gateway.legacy_endpoint=true"],
    ).running(warm=2) as b:
        yield b


@pytest.fixture
def clients(broker: BrokerProcess, tmp_path: pathlib.Path) -> Clients:
    broker.wait_until("a warm clone", lambda: broker.warm() >= 1)
    return Clients(broker=broker, state_home=tmp_path / "state")


def test_if_connect_runs_then_psql_and_psycopg_reach_the_database(clients: Clients) -> None:
    """If aldaas connect runs, then psql and psycopg query the leased database through it."""
    with clients.connect("--port", "0") as c:
        dsn = c.dsn()
        assert psql(dsn, "SELECT count(*) FROM items").stdout.strip() == str(ROWS)
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT label FROM items WHERE id = 7").fetchone()
            assert row == ("item 7",)
            conn.execute("CREATE TABLE mine (x int)")
        assert psql(dsn, "SELECT count(*) FROM mine").stdout.strip() == "0"
        assert c.stop() == 0
    assert "Ctrl-C leaves it to its idle TTL" in c.stderr


def test_if_connect_prints_the_legacy_url_then_it_reaches_the_leased_database(
    clients: Clients,
) -> None:
    """If aldaas connect --legacy-url runs, then it prints /<name>/<lease secret>/<lease id>
    after the DSN, and a raw websocket to it (the original client's tcp-over-websocket)
    reaches PostgreSQL: an SSLRequest is answered 'N'."""
    with clients.connect("--port", "0", "--legacy-url", "--name", "legacy") as c:
        c.dsn()
        assert c.proc.stdout is not None
        url = c.proc.stdout.readline().decode().strip()
        assert url.startswith(f"{clients.broker.url}/legacy/")
        assert url.rsplit("/", 1)[1] in clients.broker.lease_ids()
        with websockets.sync.client.connect(url, open_timeout=30) as ws:
            ws.send(struct.pack("!II", 8, 80877103))  # SSLRequest
            assert ws.recv(timeout=30) == b"N"
        bare = url.replace(url.split("/")[-2], INSTANCE_TOKEN)
        with pytest.raises(websockets.exceptions.InvalidStatus, match="403"):
            websockets.sync.client.connect(bare, open_timeout=30)
        assert c.stop() == 0
    clients.run("release", "--name", "legacy")


def test_if_run_wraps_a_command_then_it_exits_with_its_status_and_releases(
    clients: Clients, broker: BrokerProcess
) -> None:
    """If aldaas run wraps psql, then PG* reach it, its exit status is kept, the lease ends."""
    before = {lease["id"] for lease in broker.leases()}
    ok = clients.run("run", "--", psql_path(), "-X", "-A", "-t", "-c", "SELECT count(*) FROM items")
    assert (ok.returncode, ok.stdout.strip()) == (0, str(ROWS))
    failed = clients.run(
        "run", "--", psql_path(), "-X", "-v", "ON_ERROR_STOP=1", "-c", "SELECT nope"
    )
    assert failed.returncode == 1
    assert 'column "nope" does not exist' in failed.stderr
    seven = clients.run("run", "--", "sh", "-c", 'test -n "$DATABASE_URL" && exit 7')
    assert seven.returncode == 7
    missing = clients.run("run", "--", "no-such-command-aldaas")
    assert missing.returncode == 127
    assert "command 'no-such-command-aldaas' not found" in missing.stderr
    assert {lease["id"] for lease in broker.leases()} == before


def test_if_the_lease_is_reset_then_pristine_data_answers_at_the_same_port(
    clients: Clients,
) -> None:
    """If the data is broken and aldaas reset runs, then the port it prints shows pristine data."""
    with clients.connect("--port", "0") as c:
        dsn = c.dsn()
        psql(dsn, "DELETE FROM items")
        assert psql(dsn, "SELECT count(*) FROM items").stdout.strip() == "0"
        reset = clients.run("reset")
        assert reset.returncode == 0, reset.stderr
        assert "reset" in reset.stderr
        # Same listener, but the pristine copy has its own password: reset prints the new DSN.
        (fresh,) = reset.stdout.split()
        assert fresh.split("@")[1] == dsn.split("@")[1]
        assert psql(fresh, "SELECT count(*) FROM items").stdout.strip() == str(ROWS)
        status = clients.run("status")
        assert status.returncode == 0, status.stderr
        assert "* " in status.stdout


def test_if_the_client_restarts_then_it_resumes_the_same_database(
    clients: Clients, broker: BrokerProcess
) -> None:
    """If aldaas connect stops and starts again, then it resumes the cached lease with its data."""
    with clients.connect("--port", "0") as first:
        dsn = first.dsn()
        psql(dsn, "CREATE TABLE survives (x int); INSERT INTO survives VALUES (42)")
        assert first.stop(signal.SIGTERM) == 0
    leases = {lease["id"] for lease in broker.leases()}
    with clients.connect("--port", "0") as second:
        dsn2 = second.dsn()
        assert psql(dsn2, "SELECT x FROM survives").stdout.strip() == "42"
        assert second.stop() == 0
    assert "resumed lease" in second.stderr
    assert {lease["id"] for lease in broker.leases()} == leases
    released = clients.run("release")
    assert released.returncode == 0, released.stderr
    assert len(broker.leases()) == len(leases) - 1


def test_if_the_cached_lease_expired_then_connect_says_it_expired_and_gets_a_new_one(
    clients: Clients, broker: BrokerProcess
) -> None:
    """If the cached lease expired after its idle TTL while no client ran, then the next
    connect says so (not "unknown session") and hands out a fresh database."""
    with clients.connect("--port", "0", "--ttl", "1") as first:
        first.dsn()
        assert first.stop(signal.SIGTERM) == 0
    mine = {lease["id"] for lease in broker.leases() if lease.get("ttl") == 1}
    assert len(mine) == 1, broker.leases()
    lease_id = mine.pop()
    broker.wait_until("the lease to expire", lambda: lease_id not in broker.lease_ids())
    with clients.connect("--port", "0") as second:
        second.dsn()
        assert second.stop() == 0
    assert f"your lease {lease_id} has ended: the lease expired after its idle TTL" in (
        second.stderr
    )
    assert "unknown" not in second.stderr
    assert clients.run("release").returncode == 0


def test_if_the_token_is_wrong_then_every_command_says_so_in_one_sentence(
    clients: Clients,
) -> None:
    """If the instance token is wrong, then connect, run and status fail with one sentence."""
    for args in (["connect", "--port", "0"], ["run", "--", "true"], ["status"]):
        done = clients.run(*args, ALDAAS_TOKEN="wrong-token")
        assert done.returncode == 1, (args, done.stderr)
        sentence = one_sentence(done.stderr)
        assert "token" in sentence.lower()
        assert "wrong-token" not in done.stderr


def test_if_there_is_no_cached_lease_then_reset_and_release_say_so(clients: Clients) -> None:
    """If nothing is cached, then reset and release explain how to get a lease, exit 1."""
    for command in ("reset", "release"):
        done = clients.run(command)
        assert done.returncode == 1
        assert "run aldaas connect first" in one_sentence(done.stderr)


def test_if_the_server_is_missing_then_the_usage_error_exits_2(clients: Clients) -> None:
    """If no server is configured, then the client exits 2 naming ALDAAS_SERVER."""
    done = clients.run("status", ALDAAS_SERVER="")
    assert done.returncode == 2
    assert "ALDAAS_SERVER" in one_sentence(done.stderr)
