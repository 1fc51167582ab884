"""The role model on the local provider: admin, sealed dump roles, a lease login per clone.

One real cluster per module: a volume restored from a plain dump that creates
roles the way pg_dumpall does (a superuser with a password, a member of
pg_execute_server_program), objects owned by dump roles and by the admin
(what ``--no-owner`` restores give), and the trusted extension citext.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import stat
from collections.abc import AsyncIterator, Iterator, Sequence

import psycopg
import pytest
import trio
from pg_query import aquery

from aldaas.pool import (
    Backup,
    BackupFormat,
    Kind,
    LocalProvider,
    LocalSettings,
    RestoreProgress,
    default_restore_command,
)
from aldaas.pool._roles import ADMIN, hba_conf, quote_ident, quote_literal, scram_verifier

pytestmark = pytest.mark.slow

DUMP = b"""
CREATE ROLE app;
ALTER ROLE app WITH SUPERUSER LOGIN CREATEROLE REPLICATION BYPASSRLS PASSWORD 'dump-secret';
CREATE ROLE reader;
ALTER ROLE reader WITH NOLOGIN;
GRANT pg_execute_server_program TO reader;
GRANT pg_read_server_files TO app;
GRANT reader TO app;
CREATE SCHEMA billing;
ALTER SCHEMA billing OWNER TO app;
CREATE TABLE billing.invoices (id serial PRIMARY KEY, amount numeric NOT NULL);
ALTER TABLE billing.invoices OWNER TO app;
INSERT INTO billing.invoices (amount) VALUES (10), (20);
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items VALUES (1, 'one'), (2, 'two');
CREATE SEQUENCE tickets;
CREATE VIEW item_names AS SELECT name FROM items;
CREATE FUNCTION double(x int) RETURNS int LANGUAGE sql AS 'SELECT 2 * x';
CREATE TYPE mood AS ENUM ('ok', 'bad');
CREATE EXTENSION citext;
"""


class BytesSource:
    description = "memory"

    def __init__(self, key: str, data: bytes) -> None:
        self.backup = Backup(key=key, etag="e1", size=len(data), modified=0.0)
        self._data = data

    async def list_backups(self) -> Sequence[Backup]:
        return [self.backup]

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        yield self._data


def ignore(_: RestoreProgress) -> None:
    pass


@pytest.fixture(scope="module")
def settings(module_data_dir: pathlib.Path) -> Iterator[LocalSettings]:
    """A data folder with snapshot ``sealed``, restored from :data:`DUMP`."""
    settings = LocalSettings(data_dir=module_data_dir)
    source = BytesSource("roles.sql.gz", gzip.compress(DUMP))

    async def build() -> None:
        provider = LocalProvider(settings)
        await provider.create_volume("sealed", {})
        command = default_restore_command(BackupFormat.SQL_GZ)
        await provider.restore("sealed", source.backup, source, command, ignore)
        await provider.seal("sealed", "sealed", {"status": "ready"})

    async def tear_down() -> None:
        provider = LocalProvider(settings)
        for resource in await provider.list():
            await provider.destroy(resource.kind, resource.name)

    trio.run(build)
    yield settings
    trio.run(tear_down)


def test_if_a_password_is_turned_into_a_verifier_then_it_has_postgresqls_format() -> None:
    """If a password gets a SCRAM verifier with a known salt, then it matches RFC 7677's layout."""
    verifier = scram_verifier("pencil", salt=b"0123456789abcdef", iterations=4096)
    head, keys = verifier.rsplit("$", 1)
    assert head == "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg=="
    stored, server = keys.split(":")
    assert len(stored) == len(server) == 44  # 32 bytes in base64
    with pytest.raises(ValueError, match="printable ASCII"):
        scram_verifier("pässword")


def test_if_names_hold_quotes_then_they_are_quoted_safely() -> None:
    """If a name holds quotes, then the identifier and literal double them; NUL is refused."""
    assert quote_ident('we"ird') == '"we""ird"'
    assert quote_literal("it's") == "'it''s'"
    with pytest.raises(ValueError, match="NUL"):
        quote_ident("a\0b")
    assert b'host all "aldaas_admin" all reject' in hba_conf()


async def test_if_a_clone_is_handed_out_then_its_login_is_no_superuser_and_owns_it(
    settings: LocalSettings,
) -> None:
    """If a sealed snapshot is cloned, then its login is NOSUPERUSER CREATEDB and owns the data."""
    provider = LocalProvider(settings)
    endpoint = await provider.clone("sealed", "owned", {})
    try:
        assert (endpoint.user, endpoint.database) == ("aldaas", "aldaas")
        rows = await aquery(
            endpoint,
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = current_user",
        )
        assert rows == [(False, True, False, False, False)]
        owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        assert await aquery(endpoint, owner) == [("aldaas",)]
        # Owned by the admin after the restore: given to the login by the seal step.
        owners = await aquery(
            endpoint,
            "SELECT relname, pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relname IN ('items', 'tickets', 'item_names', 'invoices') ORDER BY 1",
        )
        assert owners == [
            ("invoices", "app"),
            ("item_names", "aldaas"),
            ("items", "aldaas"),
            ("tickets", "aldaas"),
        ]
        functions = "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = 'double'"
        assert await aquery(endpoint, functions) == [("aldaas",)]
        types = "SELECT pg_get_userbyid(typowner) FROM pg_type WHERE typname = 'mood'"
        assert await aquery(endpoint, types) == [("aldaas",)]
        # A member of the dump's roles: it may change what they own.
        await aquery(endpoint, "ALTER TABLE billing.invoices ADD COLUMN note text")
        await aquery(endpoint, "DROP TABLE billing.invoices")
    finally:
        await provider.destroy(Kind.CLONE, "owned")


async def test_if_a_dump_made_roles_powerful_then_the_seal_disarms_them(
    settings: LocalSettings,
) -> None:
    """If the dump made a superuser with a password, then it is neither, nor reaches programs."""
    provider = LocalProvider(settings)
    endpoint = await provider.clone("sealed", "disarmed", {})
    try:
        rows = await aquery(
            endpoint,
            "SELECT rolname, rolsuper, rolcreaterole, rolreplication, rolbypassrls FROM pg_roles "
            "WHERE rolname IN ('app', 'reader') ORDER BY 1",
        )
        assert rows == [("app", False, False, False, False), ("reader", False, False, False, False)]
        members = await aquery(
            endpoint,
            "SELECT r.rolname FROM pg_roles r WHERE "
            "pg_has_role('aldaas', r.oid, 'MEMBER') AND r.rolname LIKE 'pg_%server%' ",
        )
        assert members == []
        supers = "SELECT rolname FROM pg_roles WHERE rolsuper ORDER BY 1"
        assert await aquery(endpoint, supers) == [(ADMIN,)]
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await trio.to_thread.run_sync(
                lambda: psycopg.connect(
                    host=endpoint.host,
                    port=endpoint.port,
                    user="app",
                    password="dump-secret",
                    dbname=endpoint.database,
                ).close()
            )
    finally:
        await provider.destroy(Kind.CLONE, "disarmed")


async def test_if_two_clones_are_made_then_each_login_has_its_own_password(
    settings: LocalSettings,
) -> None:
    """If one snapshot is cloned twice, then the passwords differ and neither opens the other."""
    provider = LocalProvider(settings)
    first = await provider.clone("sealed", "pw-1", {})
    second = await provider.clone("sealed", "pw-2", {})
    try:
        assert first.password
        assert second.password
        assert first.password != second.password
        assert first.password not in repr(first)
        crossed = type(first)(
            host=second.host,
            port=second.port,
            user=second.user,
            database=second.database,
            password=first.password,
        )
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await aquery(crossed, "SELECT 1")
        state = settings.data_dir / "clones" / "pw-1" / "state.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert json.loads(state.read_text())["password"] == first.password
    finally:
        await provider.destroy(Kind.CLONE, "pw-1")
        await provider.destroy(Kind.CLONE, "pw-2")


async def test_if_lease_superuser_is_set_then_the_login_is_a_superuser(
    settings: LocalSettings,
) -> None:
    """If the provider is made with lease_superuser, then its clones' login is a superuser."""
    provider = LocalProvider(settings, lease_superuser=True)
    endpoint = await provider.clone("sealed", "super", {})
    try:
        sql = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        assert await aquery(endpoint, sql) == [(True,)]
    finally:
        await provider.destroy(Kind.CLONE, "super")


async def test_if_the_admin_name_comes_over_the_network_then_it_is_refused(
    settings: LocalSettings,
) -> None:
    """If a lease holder tries the admin's name, then pg_hba refuses it for lack of a password."""
    provider = LocalProvider(settings)
    endpoint = await provider.clone("sealed", "admin-try", {})
    try:
        guess = type(endpoint)(
            host=endpoint.host,
            port=endpoint.port,
            user=ADMIN,
            database=endpoint.database,
            password=endpoint.password,
        )
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await aquery(guess, "SELECT 1")
    finally:
        await provider.destroy(Kind.CLONE, "admin-try")


async def test_if_a_snapshot_predates_the_role_model_then_it_is_retired_at_start(
    settings: LocalSettings,
) -> None:
    """If a snapshot's state has no admin (made before), then a starting provider deletes it."""
    legacy = settings.data_dir / "snapshots" / "legacy"
    await trio.to_thread.run_sync(
        lambda: shutil.copytree(settings.data_dir / "snapshots" / "sealed", legacy, symlinks=True)
    )
    state = json.loads((legacy / "state.json").read_text())
    old = {"user": state["user"], "database": state["database"], "password": "old"}
    (legacy / "state.json").write_text(json.dumps({**old, "major": state["major"]}))
    if os.geteuid() == 0:
        shutil.chown(legacy, "aldaas", "aldaas")
    names = [r.name for r in await LocalProvider(settings).list(Kind.SNAPSHOT)]
    assert names == ["sealed"]
    assert not legacy.exists()


PG15_BIN = pathlib.Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(
    not (PG15_BIN / "postgres").exists()
    or not pathlib.Path("/usr/share/postgresql/15/extension/pgcrypto.control").exists(),
    reason="Debian's postgresql-15 (with pgcrypto) is not installed; .ci/run installs it",
)
async def test_if_postgresql_15_serves_then_the_seal_works_and_the_login_adds_pgcrypto(
    data_dir: pathlib.Path,
) -> None:
    """If the dump is restored by PostgreSQL 15, then it is sealed alike and pgcrypto can be added."""
    provider = LocalProvider(LocalSettings(data_dir=data_dir, bin_dir=PG15_BIN))
    source = BytesSource("roles.sql.gz", gzip.compress(DUMP))
    await provider.create_volume("v15", {})
    command = default_restore_command(BackupFormat.SQL_GZ)
    await provider.restore("v15", source.backup, source, command, ignore)
    await provider.seal("v15", "v15", {})
    endpoint = await provider.clone("v15", "c15", {})
    try:
        sql = "SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN ('aldaas', 'app') ORDER BY 1"
        assert await aquery(endpoint, sql) == [("aldaas", False), ("app", False)]
        await aquery(endpoint, "CREATE EXTENSION pgcrypto")
        (row,) = await aquery(endpoint, "SELECT length(gen_random_bytes(16))")
        assert row == (16,)
        await aquery(endpoint, "DROP TABLE billing.invoices")
    finally:
        await provider.destroy(Kind.CLONE, "c15")
        await provider.destroy(Kind.SNAPSHOT, "v15")


async def test_if_a_clone_never_got_its_password_then_it_has_no_endpoint_until_made_again(
    settings: LocalSettings,
) -> None:
    """If a crash left a clone without its login's password, then it is unusable until cloned again."""
    provider = LocalProvider(settings)
    first = await provider.clone("sealed", "half", {})
    try:
        state_path = settings.data_dir / "clones" / "half" / "state.json"
        state = json.loads(state_path.read_text())
        del state["password"]
        state_path.write_text(json.dumps(state))
        (listed,) = [r for r in await provider.list(Kind.CLONE) if r.name == "half"]
        assert listed.endpoint is None
        assert await provider.is_healthy("half") is False
        again = await provider.clone("sealed", "half", {})
        assert again.port == first.port
        assert again.password not in (None, first.password)
        assert await aquery(again, "SELECT count(*) FROM items") == [(2,)]
    finally:
        await provider.destroy(Kind.CLONE, "half")
