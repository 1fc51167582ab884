"""Example: tests that each get a fresh copy of the leased production-like database.

Run against a broker (the demo's, or yours):

    export ALDAAS_SERVER=ws://127.0.0.1:8765 ALDAAS_TOKEN=demo-only-instance-token
    pytest examples/pytest            # one lease for the session, one database per test

Nothing here knows the schema: the tests work on any backup the broker serves. A test
that changes its database leaves the next test's copy untouched.
"""

from __future__ import annotations

import psycopg


def user_tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return {row[0] for row in rows}


def test_the_copy_holds_the_production_like_tables(aldaas_url: str) -> None:
    """The per-test database is a copy of the leased one: its tables are there."""
    assert user_tables(aldaas_url), "the backup restored no user table"


def test_a_test_may_change_its_database(aldaas_url: str) -> None:
    """Writes stay in this test's copy (the next test starts from the template again)."""
    with psycopg.connect(aldaas_url) as conn:
        conn.execute("CREATE TABLE scratch_from_a_test (x int)")
        conn.execute("INSERT INTO scratch_from_a_test VALUES (1)")
    assert "public.scratch_from_a_test" in user_tables(aldaas_url)


def test_the_next_test_gets_a_pristine_copy(aldaas_url: str) -> None:
    """Whatever the previous test did, this copy does not have it."""
    assert "public.scratch_from_a_test" not in user_tables(aldaas_url)


def test_the_libpq_keyword_dsn_works_too(aldaas_dsn: str) -> None:
    """``aldaas_dsn`` is the same database as ``host=... dbname=...`` for libpq-style drivers."""
    with psycopg.connect(aldaas_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
