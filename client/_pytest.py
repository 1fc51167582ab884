"""The pytest plugin (entry point ``pytest11``): a lease per test session, a database per test.

``pytest --aldaas`` (or ``ALDAAS_SERVER`` set in the environment) leases one database
from the broker for the session, the first time a test asks for it, and releases it
when the session ends, whether tests failed or the run was interrupted. Each test that
uses ``aldaas_database`` gets a fresh database inside that lease, made with
``CREATE DATABASE ... TEMPLATE`` from the leased one (a copy of production-like data in
milliseconds, PostgreSQL 18's ``file_copy_method = clone`` where the file system clones).

With pytest-xdist, every worker leases its own database by default; with
``--aldaas-shared`` the controller leases one and the workers make their copies in it.
See docs/pytest.md.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from ._options import ClientError

_COPIES = ("clone", "file_copy", "wal_log")
_SHARED_KEY = "aldaas_shared_lease"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aldaas", "aldaas: a leased production-like database per session")
    group.addoption(
        "--aldaas",
        action="store_true",
        help="lease a database from the broker in ALDAAS_SERVER (with ALDAAS_TOKEN) for this "
        "session; on by itself when ALDAAS_SERVER is set",
    )
    group.addoption(
        "--aldaas-shared",
        action="store_true",
        help="with pytest-xdist: one lease for all workers (default: one lease per worker)",
    )
    group.addoption(
        "--aldaas-copy",
        choices=_COPIES,
        default="clone",
        help="how each test's database is copied: clone (FILE_COPY with PostgreSQL 18's "
        "file_copy_method=clone, plain FILE_COPY before 18), file_copy, or wal_log "
        "(default: clone)",
    )


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("aldaas") or os.environ.get("ALDAAS_SERVER", "").strip())


def _options() -> Any:
    from . import _state
    from ._options import resolve

    environ = dict(os.environ)
    return resolve(environ=environ, state_dir=_state.state_dir(environ), default_port=0)


class _Lease:
    """The session's lease, held by this process (released at the end) or by the xdist
    controller (``--aldaas-shared``: only its address travels to the workers)."""

    def __init__(self) -> None:
        self._thread: Any = None
        self.database: Any = None
        self.error: str | None = None

    def get(self) -> Any:
        from ._lease_thread import LeaseThread

        if self.error is not None:
            pytest.fail(self.error, pytrace=False)
        if self.database is None:
            try:
                self._thread = LeaseThread(_options())
                self.database = self._thread.start()
            except ClientError as exc:
                self.error = f"aldaas: {exc}"
                pytest.fail(self.error, pytrace=False)
        return self.database

    def release(self) -> None:
        if self._thread is not None:
            self._thread.release()
            self._thread = None


_lease = _Lease()


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistController(), "aldaas-xdist")


class _XdistController:
    """``--aldaas-shared``: the controller leases and hands the address to its workers."""

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        config = node.config
        if not (_enabled(config) and config.getoption("aldaas_shared")):
            return
        database = _lease.get()
        node.workerinput[_SHARED_KEY] = {
            "lease_id": database.lease_id,
            "host": database.host,
            "port": database.port,
            "user": database.user,
            "password": database.password,
            "database": database.database,
        }


def pytest_unconfigure(config: pytest.Config) -> None:
    _lease.release()  # after xdist's workers have finished (controller) or the session


@pytest.fixture(scope="session")
def aldaas_lease(pytestconfig: pytest.Config) -> Iterator[Any]:
    """The session's leased database (:class:`aldaas.client.LeasedDatabase`): ``url``,
    ``host``, ``port``, ``user``, ``password``, ``database``. Prepare it (migrations) in a
    session fixture, then close those connections: the per-test copies are made from it."""
    if not _enabled(pytestconfig):
        pytest.fail(
            "aldaas: no broker is configured; pass --aldaas with ALDAAS_SERVER and ALDAAS_TOKEN "
            "set, or set ALDAAS_SERVER.",
            pytrace=False,
        )
    shared = getattr(pytestconfig, "workerinput", {}).get(_SHARED_KEY)
    if shared is not None:
        from ._lease_thread import LeasedDatabase

        yield LeasedDatabase(**shared)
        return
    try:
        yield _lease.get()
    finally:
        _lease.release()  # at the session's end, also after a failure or Ctrl-C


@pytest.fixture(scope="session")
def _aldaas_copier(aldaas_lease: Any, pytestconfig: pytest.Config) -> Iterator[_Copier]:
    copier = _Copier(aldaas_lease, pytestconfig.getoption("aldaas_copy"), _worker(pytestconfig))
    try:
        yield copier
    finally:
        copier.close()


@pytest.fixture
def aldaas_database(_aldaas_copier: _Copier) -> Iterator[Any]:
    """A fresh database for this test: a copy of the leased one, dropped after the test.
    ``.url`` is a ``postgresql://`` URL, ``.host``/``.port``/``.user``/``.password``/
    ``.database`` its parts."""
    name = _aldaas_copier.create()
    try:
        yield _aldaas_copier.lease.with_database(name)
    finally:
        _aldaas_copier.drop(name)


@pytest.fixture
def aldaas_url(aldaas_database: Any) -> str:
    """This test's database as a ``postgresql://`` URL (psycopg, asyncpg, libpq, SQLAlchemy)."""
    return str(aldaas_database.url)


@pytest.fixture
def aldaas_dsn(aldaas_database: Any) -> str:
    """This test's database as a libpq keyword string (``host=... port=... dbname=...``)."""
    db = aldaas_database
    parts = {
        "host": db.host,
        "port": db.port,
        "user": db.user,
        "password": db.password,
        "dbname": db.database,
        "sslmode": "disable",
    }
    return " ".join(f"{k}={_quote(str(v))}" for k, v in parts.items() if v is not None)


def _quote(value: str) -> str:
    if value and re.fullmatch(r"[^\s'\\]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _worker(config: pytest.Config) -> str:
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    return re.sub(r"[^a-z0-9]", "", str(worker).lower()) or "main"


class _Copier:
    """Makes and drops the per-test copies over one maintenance connection (database
    ``postgres``: a template must have no other sessions while it is copied)."""

    def __init__(self, lease: Any, copy: str, worker: str) -> None:
        try:
            import psycopg
        except ImportError:
            pytest.fail(
                "aldaas: the aldaas_database fixture needs psycopg; "
                "install it with pip install 'aldaas[pytest]'.",
                pytrace=False,
            )
        self.lease = lease
        self._sql = psycopg.sql
        self._conn = psycopg.connect(lease.with_database("postgres").url, autocommit=True)
        self._names = (f"aldaas_{worker}_{n}" for n in itertools.count(1))
        self._strategy = "WAL_LOG" if copy == "wal_log" else "FILE_COPY"
        if copy == "clone" and self._conn.info.server_version >= 180000:
            self._conn.execute("SET file_copy_method = clone")

    def create(self) -> str:
        sql = self._sql
        name = next(self._names)
        self._conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY {}").format(
                sql.Identifier(name),
                sql.Identifier(self.lease.database),
                sql.SQL(self._strategy),
            )
        )
        return name

    def drop(self, name: str) -> None:
        sql = self._sql
        self._conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def close(self) -> None:
        self._conn.close()
