"""``aldaas serve`` as PID 1 (a container without tini): PostgreSQL servers that end are reaped."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
from aldaas_e2e import BrokerProcess, Clients, write_backup

from aldaas.broker._init import serve_as_init

pytestmark = pytest.mark.slow


def children(pid: int) -> set[int]:
    """Host pids of ``pid``'s children."""
    found: set[int] = set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def state(pid: int) -> str | None:
    """``pid``'s state letter (``Z`` for a zombie), or ``None`` once it is gone (reaped)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def postmasters(pids: set[int]) -> set[int]:
    return {p for p in pids if state(p) is not None and _comm(p) == "postgres"}


def _comm(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a new PID namespace needs root and util-linux's unshare",
)
def test_if_serve_is_pid_1_then_ended_postgres_servers_are_reaped(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If aldaas serve is PID 1 and clones come and go, then no ended server stays a zombie."""
    write_backup(tmp_path / "backups")
    broker = BrokerProcess(
        data_dir=data_dir,
        backups=tmp_path / "backups",
        log_path=tmp_path / "broker.log",
        overrides=["pool.size=1"],
        prefix=["unshare", "--pid", "--fork", "--mount-proc"],
    )
    broker.start()
    assert broker.proc is not None
    (init,) = broker.wait_until("PID 1 of the namespace", lambda: children(broker.proc.pid))
    try:
        broker.wait_ready(warm=1)
        clients = Clients(broker=broker, state_home=tmp_path / "state")
        ended: set[int] = set()
        for _ in range(3):
            # The warm clone's server (new each round), re-parented to PID 1 by its launcher's exit;
            # aldaas run leases that clone, and its release destroys it.
            seen = frozenset(ended)
            ended |= broker.wait_until(
                "a new warm server", lambda seen=seen: postmasters(children(init)) - seen
            )
            result = clients.run("run", "--", "true", timeout=120)
            assert result.returncode == 0, result.stderr
        left = broker.wait_until(
            "the three ended servers reaped (gone, not zombies)",
            lambda: all(state(p) is None for p in ended) or None,
            limit=60,
        )
        assert left is True
        assert len(ended) == 3
    finally:
        os.kill(init, signal.SIGTERM)  # unshare itself ignores SIGTERM; PID 1 forwards it
        assert broker.proc.wait(60) == 0, broker.log()[-2000:]


def test_if_not_pid_1_then_serve_runs_in_this_process() -> None:
    """If the process is not PID 1, then the run function is called here and its status returned."""
    assert serve_as_init(lambda: 7) == 7


_REAP = """
import os, signal, time
from aldaas.broker._init import reap_until
other = os.fork()
if other == 0:
    os._exit(0)
while open(f"/proc/{other}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
os.kill(child, signal.SIGKILL)
code = reap_until(child)
print(code, "reaped" if not os.path.exists(f"/proc/{other}") else "zombie")
"""


def test_if_the_broker_child_is_killed_then_pid_1_exits_128_plus_the_signal() -> None:
    """If the broker child dies of SIGKILL, then the reaper returns 137, other children reaped."""
    result = subprocess.run(
        [sys.executable, "-c", _REAP], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.split() == ["137", "reaped"]
