"""A lease holder's attempts on the server and on other leases, each refused; and migrations pass.

One broker serves the module (pool of 2, a 500-row backup); every attempt is
made through ``aldaas connect``'s DSN or ``aldaas run``, as a lease holder
would. docs/security.md lists these tests and their results.
"""

from __future__ import annotations

import pathlib
import subprocess
import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
from aldaas_e2e import BrokerProcess, Clients, psql, psql_path, running_broker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    work = tmp_path_factory.mktemp("attacks")
    with running_broker(module_data_dir, work, ["pool.size=2"], warm=2) as b:
        yield b


@pytest.fixture
def clients(broker: BrokerProcess, tmp_path: pathlib.Path) -> Clients:
    broker.wait_until("a warm clone", lambda: broker.warm() >= 1)
    return Clients(broker=broker, state_home=tmp_path / "state")


def refusal(dsn: str, sql: str) -> str:
    """The error psql prints for ``sql``, which must fail."""
    result = psql(dsn, sql, check=False)
    assert result.returncode != 0, (sql, result.stdout)
    return result.stderr


def with_password(dsn: str, password: str) -> str:
    """``dsn`` with its password replaced."""
    url = urllib.parse.urlsplit(dsn)
    user = url.username or ""
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{url.hostname}:{url.port}"
    return urllib.parse.urlunsplit(url._replace(netloc=netloc))


def password_of(dsn: str) -> str:
    password = urllib.parse.urlsplit(dsn).password
    assert password, dsn
    return urllib.parse.unquote(password)


def test_if_run_asks_whether_the_login_is_a_superuser_then_psql_prints_f(
    clients: Clients,
) -> None:
    """If ``aldaas run -- psql -c 'select rolsuper ...'`` runs, then psql prints ``f``."""
    result = clients.run(
        "run",
        "--",
        psql_path(),
        "-X",
        "-A",
        "-t",
        "-c",
        "select rolsuper from pg_roles where rolname = current_user",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "f"


def test_if_a_lease_holder_tries_copy_to_program_then_it_is_refused(clients: Clients) -> None:
    """If a lease holder runs COPY ... TO PROGRAM, then PostgreSQL refuses it."""
    with clients.connect("--port", "0", "--release-on-exit") as c:
        error = refusal(c.dsn(), "COPY (SELECT 1) TO PROGRAM 'id > /tmp/aldaas-pwned'")
    assert "permission denied to COPY to or from an external program" in error
    assert not pathlib.Path("/tmp/aldaas-pwned").exists()


def test_if_a_lease_holder_reads_server_files_then_it_is_refused(clients: Clients) -> None:
    """If a lease holder calls pg_read_file or COPY FROM a file, then both are refused."""
    with clients.connect("--port", "0", "--release-on-exit") as c:
        dsn = c.dsn()
        assert "permission denied for function pg_read_file" in refusal(
            dsn, "SELECT pg_read_file('postgresql.auto.conf')"
        )
        assert "permission denied to COPY from a file" in refusal(
            dsn, "CREATE TEMP TABLE t (x text); COPY t FROM '/etc/passwd'"
        )


def test_if_a_lease_holder_alters_the_system_then_it_is_refused(clients: Clients) -> None:
    """If a lease holder runs ALTER SYSTEM, then it is refused."""
    with clients.connect("--port", "0", "--release-on-exit") as c:
        error = refusal(c.dsn(), "ALTER SYSTEM SET shared_preload_libraries = 'x'")
    assert 'permission denied to set parameter "shared_preload_libraries"' in error


def test_if_a_lease_holder_creates_a_superuser_then_it_is_refused(clients: Clients) -> None:
    """If a lease holder creates a superuser or makes itself one, then both are refused."""
    with clients.connect("--port", "0", "--release-on-exit") as c:
        dsn = c.dsn()
        assert "permission denied to create role" in refusal(
            dsn, "CREATE ROLE evil SUPERUSER LOGIN PASSWORD 'x'"
        )
        assert "permission denied to alter role" in refusal(
            dsn, "ALTER ROLE CURRENT_USER SUPERUSER"
        )
        assert "permission denied to set role" in refusal(dsn, "SET ROLE aldaas_admin")


def test_if_two_leases_share_a_snapshot_then_their_passwords_differ_and_do_not_cross(
    clients: Clients,
) -> None:
    """If two leases of one snapshot run, then each password opens its own database only."""
    with (
        clients.connect("--port", "0", "--release-on-exit", "--name", "one") as a,
        clients.connect("--port", "0", "--release-on-exit", "--name", "two") as b,
    ):
        first, second = a.dsn(), b.dsn()
        assert password_of(first) != password_of(second)
        # Lease one's login and password, tried on lease two's database.
        crossed = with_password(second, password_of(first))
        assert "password authentication failed" in refusal(crossed, "SELECT 1")
        assert psql(second, "SELECT 1").stdout.strip() == "1"


def test_if_an_earlier_leases_password_is_reused_then_it_is_refused(clients: Clients) -> None:
    """If a password of an ended lease (or from before a reset) is reused, then it is refused."""
    with clients.connect("--port", "0", "--release-on-exit", "--name", "early") as early:
        old = password_of(early.dsn())
    with clients.connect("--port", "0", "--release-on-exit", "--name", "late") as late:
        dsn = late.dsn()
        assert "password authentication failed" in refusal(with_password(dsn, old), "SELECT 1")
        before = password_of(dsn)
        reset = clients.run("reset", "--name", "late", timeout=120)
        assert reset.returncode == 0, reset.stderr
        (printed,) = reset.stdout.split()
        assert password_of(printed) != before
        assert "password authentication failed" in refusal(dsn, "SELECT 1")
        assert psql(printed, "SELECT count(*) FROM items").stdout.strip() == "500"


def test_if_a_lease_holder_tries_the_admin_then_it_is_refused(clients: Clients) -> None:
    """If a lease holder logs in as the admin with its own password, then it is refused."""
    with clients.connect("--port", "0", "--release-on-exit") as c:
        url = urllib.parse.urlsplit(c.dsn())
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                host=url.hostname,
                port=url.port,
                user="aldaas_admin",
                password=urllib.parse.unquote(url.password or ""),
                dbname="aldaas",
                sslmode="disable",
            ).close()


MIGRATION = """\
CREATE SCHEMA app;
CREATE TABLE app.orders (
    id bigserial PRIMARY KEY,
    item_id integer REFERENCES items (id),
    placed timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE items ADD COLUMN price numeric NOT NULL DEFAULT 0;
CREATE INDEX CONCURRENTLY items_label_idx ON items (label);
CREATE SEQUENCE app.invoice_numbers START 1000;
CREATE FUNCTION app.next_invoice() RETURNS bigint LANGUAGE sql
    AS $$ SELECT nextval('app.invoice_numbers') $$;
CREATE VIEW app.cheap AS SELECT id, label FROM items WHERE price < 10;
CREATE EXTENSION citext;
ALTER TABLE app.orders ADD COLUMN email citext;
INSERT INTO app.orders (item_id, email) VALUES (1, 'Someone@Example.com');
ALTER TABLE items RENAME COLUMN label TO name;
DROP INDEX CONCURRENTLY items_label_idx;
SELECT app.next_invoice(), (SELECT count(*) FROM app.cheap),
       (SELECT count(*) FROM app.orders WHERE email = 'someone@example.COM');
"""


def test_if_a_migration_suite_runs_as_the_login_then_every_step_succeeds(
    clients: Clients, tmp_path: pathlib.Path
) -> None:
    """If DDL, index concurrently, an extension, sequence, function, view run, then all succeed."""
    script = tmp_path / "migration.sql"
    script.write_text(MIGRATION)
    with clients.connect("--port", "0", "--release-on-exit") as c:
        dsn = c.dsn()
        result = subprocess.run(
            [psql_path(), dsn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["1000|500|1"]
        # What the pytest plugin does: a database per test, copied from the handed-out one.
        url = urllib.parse.urlsplit(dsn)
        other = urllib.parse.urlunsplit(url._replace(path="/postgres"))
        psql(other, "CREATE DATABASE per_test TEMPLATE aldaas")
        copied = urllib.parse.urlunsplit(url._replace(path="/per_test"))
        assert psql(copied, "SELECT count(*) FROM app.orders").stdout.strip() == "1"
