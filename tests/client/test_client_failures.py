"""What the client says when it cannot get a database: CI jobs fail fast and say why (slow).

Each message comes from real processes: a real broker whose pool is empty on purpose
(``pool.size=0``: every request queues), whose newest backup is broken, or a port
nobody listens on.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import signal
import socket
from collections.abc import Iterator

import pytest
from aldaas_e2e import BrokerProcess, Clients, free_port, one_sentence, write_backup

pytestmark = pytest.mark.slow


def write_broken_backup(folder: pathlib.Path, name: str) -> None:
    """A backup whose SQL fails, made newer than every other file of ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(gzip.compress(b"CREATE TABLE broken (;\n", mtime=0))
    newest = max((p.stat().st_mtime for p in folder.iterdir()), default=0.0)
    os.utime(path, (newest + 60, newest + 60))


def snapshot_statuses(broker: BrokerProcess) -> dict[str, str]:
    status, body = broker.api("GET", "/api/status")
    assert status == 200, body
    return {s["backup"]: s["status"] for s in body["snapshots"]}


@pytest.fixture(scope="module")
def empty_pool(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """A broker with no warm clones (every request queues), a good older snapshot, and a
    newest backup whose restore failed. Its databases get a few ports, which the restores use
    and :func:`ports_taken` takes away, so that a clone made on demand cannot start."""
    work = tmp_path_factory.mktemp("client-failures")
    write_backup(work / "backups", "a-nightly.sql.gz")
    low = _free_port_range(_PORTS)
    with BrokerProcess(
        data_dir=module_data_dir,
        backups=work / "backups",
        log_path=work / "broker.log",
        overrides=[
            "pool.size=0",
            "lease.queue_timeout=600",
            f"local.port_min={low}",
            f"local.port_max={low + _PORTS - 1}",
        ],
    ).running(warm=0) as b:
        write_broken_backup(work / "backups", "b-nightly.sql.gz")
        b.api("POST", "/api/refresh")
        b.wait_until(
            "the broken backup's restore to fail",
            lambda: snapshot_statuses(b).get("b-nightly.sql.gz") == "failed",
        )
        yield b


_PORTS = 4


def _free_port_range(count: int) -> int:
    """The lowest of ``count`` consecutive ports that nothing listens on."""
    while True:
        low = free_port()
        if low + count <= 65536 and all(_can_bind(p) for p in range(low, low + count)):
            return low


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def ports_taken(empty_pool: BrokerProcess) -> Iterator[None]:
    """Every database port of the broker held by another listener: no clone can start."""
    flag = next(o for o in empty_pool.overrides if o.startswith("local.port_min="))
    low = int(flag.partition("=")[2])
    with contextlib.ExitStack() as stack:
        for port in range(low, low + _PORTS):
            holder = stack.enter_context(socket.socket())
            # Past connections to the port may linger in TIME_WAIT; they do not serve it.
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
        yield


def test_if_the_gateway_is_unreachable_then_run_gives_up_after_its_timeout_naming_it(
    tmp_path: pathlib.Path,
) -> None:
    """If nothing listens at the server's address, then ``aldaas run`` exits 1 after
    ``--timeout`` with one sentence naming the address and the network error."""
    nobody = BrokerProcess(data_dir=tmp_path, backups=tmp_path, log_path=tmp_path / "log")
    clients = Clients(broker=nobody, state_home=tmp_path / "state")
    done = clients.run("run", "--timeout", "1.5", "--", "true")
    assert done.returncode == 1, done.stderr
    sentence = one_sentence(done.stderr)
    assert sentence.startswith(f"The gateway at ws://127.0.0.1:{nobody.gateway_port}/tunnel ")
    assert "unreachable for 1.5 s" in sentence
    assert "refused" in sentence.lower()  # the network's own reason


def test_if_the_timeout_is_not_a_number_then_run_exits_2_naming_it(tmp_path: pathlib.Path) -> None:
    """If ``ALDAAS_TIMEOUT`` is not a positive number, then run exits 2 naming the value."""
    nobody = BrokerProcess(data_dir=tmp_path, backups=tmp_path, log_path=tmp_path / "log")
    done = Clients(broker=nobody, state_home=tmp_path).run(
        "run", "--", "true", ALDAAS_TIMEOUT="soon"
    )
    assert done.returncode == 2
    assert "'soon'" in one_sentence(done.stderr)


@pytest.mark.usefixtures("ports_taken")
def test_if_no_clone_frees_up_then_run_gives_up_with_its_queue_position(
    empty_pool: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If the request is still queued when ``--timeout`` ends, then run exits 1 saying it
    was queued, where, and what to raise; the queue is left."""
    clients = Clients(broker=empty_pool, state_home=tmp_path)
    done = clients.run("run", "--", "true", ALDAAS_TIMEOUT="2")
    assert done.returncode == 1, done.stderr
    sentence = one_sentence(done.stderr)
    assert sentence.startswith("No database was free within 2 s: still queued 1 of 1")
    assert "--timeout" in sentence
    empty_pool.wait_until(
        "the queue to empty",
        lambda: empty_pool.api("GET", "/api/status")[1]["pool"]["queue_length"] == 0,
    )


def test_if_the_newest_backup_failed_then_status_shows_it_beside_the_serving_snapshot(
    empty_pool: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If the newest backup failed to restore while an older snapshot serves, then
    ``aldaas status`` names the failed backup and the reason, and the older snapshot."""
    done = Clients(broker=empty_pool, state_home=tmp_path).run("status")
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "failed to restore" in line)
    assert line.startswith("the newest backup b-nightly.sql.gz failed to restore (")
    assert "still serves" in line
    assert "newest snapshot" in done.stdout  # the older one, still ready


def test_if_no_snapshot_is_ready_then_run_says_why_at_once(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If the only backup failed to restore, then run exits 1 at once naming the backup and
    the restore's error, and status says the same instead of "waiting for a backup"."""
    write_broken_backup(tmp_path / "backups", "nightly.sql.gz")
    broker = BrokerProcess(
        data_dir=data_dir, backups=tmp_path / "backups", log_path=tmp_path / "log"
    )
    broker.start()
    try:
        broker.wait_until(
            "the restore to fail",
            lambda: snapshot_statuses(broker).get("nightly.sql.gz") == "failed",
        )
        clients = Clients(broker=broker, state_home=tmp_path / "state")
        done = clients.run("run", "--", "true")
        assert done.returncode == 1, done.stderr
        sentence = one_sentence(done.stderr)
        assert "no snapshot is ready" in sentence.lower()
        assert "'nightly.sql.gz' failed" in sentence
        status = clients.run("status")
        assert "the last restore of nightly.sql.gz failed (" in status.stdout
    finally:
        broker.stop()


def test_if_connect_speaks_wss_to_a_ws_gateway_then_it_says_why_and_hints_ws(
    empty_pool: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If the server is given as host:port (wss by default) but the gateway serves plain ws,
    then connect keeps retrying and says after each failure why, with the ws hint."""
    clients = Clients(broker=empty_pool, state_home=tmp_path)
    bare = f"127.0.0.1:{empty_pool.gateway_port}"
    with clients.connect("--port", "0", ALDAAS_SERVER=bare) as connected:
        line = connected.wait_stderr("cannot reach the gateway")
        assert line.startswith(f"cannot reach the gateway at wss://{bare}/tunnel (")
        assert f"write the server as ws://{bare}/tunnel" in line
        assert "retrying in" in line
        connected.wait_stderr("cannot reach the gateway")  # and again: it keeps trying
        assert connected.stop(signal.SIGINT) == 130


def test_if_connect_cannot_reach_the_gateway_then_it_says_why_after_each_failure(
    tmp_path: pathlib.Path,
) -> None:
    """If nothing listens, then connect keeps retrying, naming the address and the error."""
    port = free_port()
    nobody = BrokerProcess(data_dir=tmp_path, backups=tmp_path, log_path=tmp_path / "log")
    clients = Clients(broker=nobody, state_home=tmp_path / "state")
    with clients.connect("--port", "0", ALDAAS_SERVER=f"ws://127.0.0.1:{port}") as connected:
        for _ in range(2):
            line = connected.wait_stderr("cannot reach the gateway")
            assert f"ws://127.0.0.1:{port}/tunnel (" in line
            assert "refused" in line.lower()
