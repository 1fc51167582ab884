"""The client's text: DSN, PG* environment, durations, sizes, status and snapshot tables."""

from __future__ import annotations

import pytest

from aldaas.client._render import (
    database_environ,
    dsn,
    duration,
    progress_text,
    size,
    snapshots_text,
    status_text,
)


def test_if_the_lease_has_a_password_then_the_dsn_and_env_carry_it_quoted() -> None:
    """If user, password or database need quoting, then the DSN quotes them and PG* are raw."""
    info = {"user": "al daas", "password": "p@ss/w", "database": "shop"}
    assert (
        dsn(info, "127.0.0.1", 5432)
        == "postgresql://al%20daas:p%40ss%2Fw@127.0.0.1:5432/shop?sslmode=disable"
    )
    env = database_environ(info, "127.0.0.1", 6000)
    assert env["PGPASSWORD"] == "p@ss/w"
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"], env["PGDATABASE"]) == (
        "127.0.0.1",
        "6000",
        "al daas",
        "shop",
    )


def test_if_there_is_no_password_then_none_is_set() -> None:
    """If the lease has no password, then neither the DSN nor the environment carries one."""
    info = {"user": "aldaas", "database": "aldaas", "password": None}
    assert (
        dsn(info, "localhost", 5432) == "postgresql://aldaas@localhost:5432/aldaas?sslmode=disable"
    )
    assert "PGPASSWORD" not in database_environ(info, "localhost", 5432)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.4, "0s"), (59.6, "1m00s"), (303, "5m03s"), (7500, "2h05m"), (277200, "3d05h")],
)
def test_if_a_duration_is_shown_then_it_is_short(seconds: float | None, text: str) -> None:
    """If a duration is rendered, then it uses the largest two units."""
    assert duration(seconds) == text


def test_if_sizes_are_shown_then_they_use_binary_units() -> None:
    """If byte counts are rendered, then they use B, KiB, MiB with one decimal."""
    assert [size(512), size(3 * 1024 * 1024 + 100_000), size(None)] == ["512 B", "3.1 MiB", "-"]


def test_if_status_has_leases_then_the_table_marks_mine() -> None:
    """If the status lists leases, then each is a row and the caller's own is starred."""
    status = {
        "ready": True,
        "pool": {"size": 3, "clones": {"warm": 2, "leased": 2}, "queue_length": 0},
        "snapshots": [{"name": "s1", "status": "ready", "backup": "b.sql.gz", "age_seconds": 90}],
        "leases": [
            {
                "id": "L1",
                "state": "attached",
                "attached": 1,
                "snapshot": "s1",
                "ttl": 300,
                "idle_deadline": None,
                "expires_at": 1000 + 3600,
                "resets": 1,
            },
            {
                "id": "L2",
                "state": "idle",
                "attached": 0,
                "snapshot": "s1",
                "ttl": 300,
                "idle_deadline": 1000 + 42,
                "expires_at": 1000 + 86400,
                "resets": 0,
            },
        ],
        "you": "L2",
    }
    text = status_text(status, server="ws://h:1", now=1000)
    assert text.splitlines() == [
        "broker ws://h:1: ready; warm 2/3, leased 2, provisioning 0, queued 0",
        "newest snapshot s1 of b.sql.gz, age 1m30s",
        "",
        "LEASE  STATE     CLIENTS  SNAPSHOT  TTL    IDLE LEFT  ENDS IN  RESETS",
        "L1     attached  1        s1        5m00s  -          1h00m    1",
        "* L2   idle      0        s1        5m00s  42s        1d00h    0",
    ]


def test_if_nothing_is_ready_then_status_says_why_and_shows_the_restore() -> None:
    """If no snapshot is ready, then the reason and the restore's progress are shown."""
    status = {
        "ready": False,
        "reason": "No snapshot is ready yet.",
        "pool": {"size": 2},
        "restore": {
            "backup": "b.sql.gz",
            "done_bytes": 1024,
            "total_bytes": 4096,
            "eta_seconds": 3,
        },
    }
    assert status_text(status, server="s", now=0).splitlines() == [
        "broker s: not ready; warm 0/2, leased 0, provisioning 0, queued 0",
        "  No snapshot is ready yet.",
        "restoring b.sql.gz: 1.0 KiB of 4.0 KiB (25%), eta 3s",
        "no active leases",
    ]


def test_if_others_hold_leases_then_status_counts_them_without_ids() -> None:
    """If the broker counts active leases but lists none (none is the caller's), then status
    says how many there are and that none is yours."""
    status = {"ready": True, "pool": {"size": 2, "leases_active": 3}, "leases": []}
    assert status_text(status, server="s", now=0).splitlines()[-1] == (
        "3 active leases, none of them yours"
    )


@pytest.mark.parametrize(
    ("active", "line"),
    [
        (2, "active leases 2 of at most 3 (lease.max_active)"),
        (3, "active leases 3 of at most 3 (lease.max_active); new ones are refused until one ends"),
    ],
)
def test_if_the_broker_has_a_lease_limit_then_status_shows_the_count_against_it(
    active: int, line: str
) -> None:
    """If the broker reports lease.max_active, then status shows the active count against it,
    and says so when new leases are refused."""
    pool = {"size": 2, "leases_active": active, "leases_max_active": 3}
    status = {"ready": True, "pool": pool, "leases": []}
    assert status_text(status, server="s", now=0).splitlines()[1] == line


def test_if_snapshots_are_listed_then_failed_ones_show_their_reason() -> None:
    """If snapshots are listed, then each is a row and a failed one shows its reason."""
    text = snapshots_text(
        [
            {
                "name": "s2",
                "status": "failed",
                "backup": "b2",
                "age_seconds": 5,
                "reason": "bad gzip.",
            },
            {"name": "s1", "status": "ready", "backup": "b1", "age_seconds": 7200},
        ]
    )
    assert text.splitlines() == [
        "SNAPSHOT  STATUS  BACKUP  AGE    REASON",
        "s2        failed  b2      5s     bad gzip.",
        "s1        ready   b1      2h00m",
    ]
    assert snapshots_text([]) == "no snapshots yet"


def test_if_progress_arrives_then_it_reads_as_a_queue_position() -> None:
    """If a PROGRESS frame has a queue position, then it reads 'queued P of N, eta T'."""
    assert progress_text({"queue_position": 2, "queue_length": 3, "eta_seconds": 40}) == (
        "queued 2 of 3, eta 40s"
    )
    assert progress_text({}) == "waiting for a database"
