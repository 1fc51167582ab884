"""Run one SQL statement against a database the tests got from a provider (psycopg, autocommit)."""

from __future__ import annotations

import psycopg
import trio

from aldaas.pool import Endpoint


def query(endpoint: Endpoint, sql: str) -> list[tuple[object, ...]]:
    """Rows of ``sql`` on ``endpoint`` (empty for statements that return none)."""
    with psycopg.connect(
        host=endpoint.host,
        port=endpoint.port,
        user=endpoint.user,
        dbname=endpoint.database,
        password=endpoint.password,
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        cur = conn.execute(sql)  # type: ignore[call-overload]
        return cur.fetchall() if cur.description else []


async def aquery(endpoint: Endpoint, sql: str) -> list[tuple[object, ...]]:
    """:func:`query` in a worker thread, so the trio loop keeps running."""
    return await trio.to_thread.run_sync(query, endpoint, sql)
