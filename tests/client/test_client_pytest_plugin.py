"""The pytest plugin against a real broker: pytest runs in a subprocess, as a user's (slow).

The example module (examples/pytest/) runs as shipped; the other cases write small test
files of their own. After every run the broker must hold no lease of it: the session's
lease is released on success, on failure, on Ctrl-C, and per xdist worker.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from aldaas_e2e import INSTANCE_TOKEN, ROOT, BrokerProcess, write_backup

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "pytest" / "test_with_aldaas.py"


@pytest.fixture(scope="module")
def broker(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    work = tmp_path_factory.mktemp("pytest-plugin")
    write_backup(work / "backups")
    with BrokerProcess(
        data_dir=module_data_dir,
        backups=work / "backups",
        log_path=work / "broker.log",
        overrides=["pool.size=2"],
    ).running(warm=2) as b:
        yield b


def pytest_argv(*args: str) -> list[str]:
    # -p no:cacheprovider: nothing written beside the tests; -c: not this repository's config.
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull, *args]


def environ(broker: BrokerProcess, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALDAAS_")}
    env.pop("PYTHONPATH", None)
    env.update(ALDAAS_SERVER=broker.url, ALDAAS_TOKEN=INSTANCE_TOKEN, **extra)
    return env


def run_pytest(
    broker: BrokerProcess, folder: pathlib.Path, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pytest_argv(*args),
        cwd=folder,
        env=environ(broker, **extra),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def no_lease_left(broker: BrokerProcess) -> None:
    broker.wait_until("every lease of the run to be released", lambda: not broker.leases(), 30)


def test_if_the_example_module_runs_then_it_passes_and_releases_its_lease(
    broker: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If pytest runs the shipped example against a broker, then every test passes, each on
    its own copy, and the session's lease is released at the end."""
    done = run_pytest(broker, tmp_path, str(EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
    no_lease_left(broker)


def test_if_a_test_fails_then_the_lease_is_still_released(
    broker: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If a test fails, then pytest exits 1 and the lease is released all the same."""
    (tmp_path / "test_fails.py").write_text(
        "def test_fails(aldaas_url):\n    assert aldaas_url.startswith('postgresql://')\n"
        "    raise AssertionError('on purpose')\n"
    )
    done = run_pytest(broker, tmp_path, "test_fails.py", "--aldaas")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "on purpose" in done.stdout
    no_lease_left(broker)


def test_if_the_run_is_interrupted_then_the_lease_is_released(
    broker: BrokerProcess, tmp_path: pathlib.Path
) -> None:
    """If pytest gets Ctrl-C (SIGINT) while a test uses its database, then the run ends and
    the lease is released."""
    started = tmp_path / "started"
    (tmp_path / "test_waits.py").write_text(
        "import pathlib, time\n"
        "def test_waits(aldaas_database):\n"
        f"    pathlib.Path({str(started)!r}).write_text(aldaas_database.lease_id)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        pytest_argv("test_waits.py"),
        cwd=tmp_path,
        env=environ(broker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.communicate(timeout=30)[0]
        lease_id = started.read_text()
        assert lease_id in broker.lease_ids()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, output  # pytest's "interrupted"
    no_lease_left(broker)


@pytest.mark.parametrize("shared", [False, True], ids=["lease-per-worker", "shared-lease"])
def test_if_xdist_runs_the_example_then_it_passes_and_releases(
    broker: BrokerProcess, tmp_path: pathlib.Path, shared: bool
) -> None:
    """If pytest-xdist runs the example on two workers (a lease each, or one shared), then
    every test passes and no lease is left."""
    args = [str(EXAMPLE), "-n", "2", "-p", "xdist"] + (["--aldaas-shared"] if shared else [])
    done = run_pytest(broker, tmp_path, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
    no_lease_left(broker)


def test_if_no_broker_is_configured_then_the_fixture_says_how_in_one_sentence(
    tmp_path: pathlib.Path,
) -> None:
    """If neither --aldaas nor ALDAAS_SERVER is given, then a test using the fixture errors
    with one sentence naming both, and pytest runs no lease."""
    (tmp_path / "test_needs_db.py").write_text("def test_db(aldaas_url):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALDAAS_")}
    done = subprocess.run(
        pytest_argv("test_needs_db.py"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "aldaas: no broker is configured; pass --aldaas with ALDAAS_SERVER" in done.stdout
