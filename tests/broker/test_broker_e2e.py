"""End to end: ``aldaas serve`` as a real process with real clients and PostgreSQL (slow)."""

from __future__ import annotations

import pathlib
import signal
import socket
from collections.abc import Iterator

import pytest
from aldaas_e2e import (
    ROWS,
    BrokerProcess,
    Clients,
    one_sentence,
    psql,
    running_broker,
    write_backup,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    work = tmp_path_factory.mktemp("broker-e2e")
    with running_broker(module_data_dir, work, ["pool.size=1"], warm=1) as b:
        yield b


@pytest.fixture
def clients(broker: BrokerProcess, tmp_path: pathlib.Path) -> Clients:
    broker.wait_until("a warm clone", lambda: broker.warm() >= 1)
    return Clients(broker=broker, state_home=tmp_path / "state")


def test_if_the_broker_is_sigtermed_and_restarted_then_leases_survive(
    clients: Clients, broker: BrokerProcess
) -> None:
    """If the broker gets SIGTERM and starts again, then it exits 0 and the client resumes."""
    before = broker.lease_ids()
    with clients.connect("--port", "0", "--release-on-exit") as c:
        dsn = c.dsn()
        psql(dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
        (lease,) = broker.lease_ids() - before
        assert broker.stop(signal.SIGTERM) == 0
        assert '"broker.stopped"' in broker.log()
        broker.start()
        broker.wait_until("/readyz", lambda: broker.http("GET", "/readyz")[0] == 200)
        assert lease in broker.lease_ids()
        result = broker.wait_until(
            "a query through the resumed client",
            lambda: psql(dsn, "SELECT x FROM kept", check=False).stdout.strip() == "1",
        )
        assert result is True
        assert c.proc.poll() is None
        assert c.stop() == 0
    assert lease not in broker.lease_ids()


def test_if_an_admin_kills_the_lease_then_the_client_exits_with_the_reason(
    clients: Clients, broker: BrokerProcess
) -> None:
    """If the admin API kills a lease, then its aldaas connect exits 1 saying so in one sentence."""
    with clients.connect("--port", "0") as c:
        c.dsn()
        (lease,) = broker.leases()
        status, body = broker.api("POST", f"/api/leases/{lease['id']}/kill")
        assert (status, body) == (200, {"killed": lease["id"]})
        assert c.wait() == 1
    assert one_sentence(c.stderr) == ("The lease ended: the lease was killed by an administrator.")
    assert broker.leases() == []
    _, metrics = broker.http("GET", "/metrics")
    assert "aldaas_handout_seconds_count" in metrics


def test_if_the_client_leaves_then_the_idle_ttl_expires_the_lease(
    clients: Clients, broker: BrokerProcess
) -> None:
    """If the last client detaches, then the idle TTL ends the lease; its cache gives one error."""
    before = broker.lease_ids()
    with clients.connect("--port", "0", "--ttl", "1") as c:
        c.dsn()
        (lease,) = broker.lease_ids() - before
        assert c.stop() == 0
    broker.wait_until("the lease to expire", lambda: lease not in broker.lease_ids())
    done = clients.run("reset")
    assert done.returncode == 1
    assert "is unknown, ended, or its secret does not match" in one_sentence(done.stderr)
    _, metrics = broker.http("GET", "/metrics")
    (expired,) = [
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("aldaas_lease_expirations_total ")
    ]
    assert expired >= 1
    with clients.connect("--port", "0") as again:
        assert psql(again.dsn(), "SELECT count(*) FROM items").stdout.strip() == str(ROWS)
    assert "is gone" in again.stderr


def test_if_no_snapshot_is_ready_or_the_pool_is_exhausted_then_one_sentence(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If nothing is restored yet, or no clone frees up in time, then the client exits 1 saying so."""
    b = BrokerProcess(
        data_dir=data_dir,
        backups=tmp_path / "backups",
        log_path=tmp_path / "broker.log",
        overrides=["pool.size=0", "lease.queue_timeout=0"],
    )
    (tmp_path / "backups").mkdir()
    b.start()
    try:
        b.wait_until("the admin listener", lambda: b.http("GET", "/healthz")[0] == 200)
        clients = Clients(broker=b, state_home=tmp_path / "state")
        b.wait_until("the gateway", lambda: clients.run("status").returncode == 0)
        done = clients.run("connect", "--port", "0")
        assert done.returncode == 1
        assert one_sentence(done.stderr).startswith("No snapshot is ready yet")

        write_backup(tmp_path / "backups")
        assert b.api("POST", "/api/refresh")[0] == 202
        b.wait_until("a ready snapshot", lambda: b.http("GET", "/readyz")[0] == 200)
        done = clients.run("run", "--", "true")
        assert done.returncode == 1
        assert one_sentence(done.stderr).startswith("No database became free within ")
    finally:
        assert b.stop() == 0


def test_if_the_gateway_port_is_taken_then_serve_exits_1_in_one_sentence(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If the gateway's port is in use, then aldaas serve exits 1 naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        b = BrokerProcess(
            data_dir=data_dir,
            backups=tmp_path,
            log_path=tmp_path / "broker.log",
            gateway_port=port,
        )
        b.start()
        assert b.proc is not None
        assert b.proc.wait(60) == 1
    assert one_sentence(b.log()) == (
        f"The gateway cannot listen on 127.0.0.1:{port} (Address already in use); "
        "set gateway.host/gateway.port to a free address."
    )


def test_if_a_second_broker_starts_on_the_same_data_folder_then_it_refuses_and_the_first_goes_on(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If another broker already serves from the data folder, then a second one exits 1 with
    one sentence naming the first one's pid, and starts once the first is gone."""
    (tmp_path / "backups").mkdir()

    def broker(name: str) -> BrokerProcess:
        return BrokerProcess(
            data_dir=data_dir,
            backups=tmp_path / "backups",
            log_path=tmp_path / f"{name}.log",
            overrides=["pool.size=0"],
        )

    first = broker("first")
    first.start()
    try:
        first.wait_until("the admin listener", lambda: first.http("GET", "/healthz")[0] == 200)
        second = broker("second")
        second.start()
        assert second.proc is not None
        assert second.proc.wait(60) == 1
        assert first.proc is not None
        assert one_sentence(second.log()) == (
            f"The broker could not start: another aldaas broker "
            f"(pid {first.proc.pid}) is using the data folder {data_dir}; stop it first, "
            "or give this one its own local.data_dir."
        )
        assert first.http("GET", "/healthz")[0] == 200
    finally:
        assert first.stop() == 0
    third = broker("third")
    third.start()
    try:
        third.wait_until("the admin listener", lambda: third.http("GET", "/healthz")[0] == 200)
    finally:
        assert third.stop() == 0
