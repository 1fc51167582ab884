"""The pool's settings tree: defaults, and restore/check commands chosen by suffix."""

from __future__ import annotations

import attrs
import pytest

from aldaas.pool import Backup, CommandSettings, PoolSettings, WarmPoolSettings


def _backup(key: str) -> Backup:
    return Backup(key=key, etag="e", size=1, modified=0.0)


def test_if_nothing_is_configured_then_the_defaults_are_the_documented_ones() -> None:
    """If PoolSettings() is built, then pool.size=3, max_provisioning=2, ttl=300, keep=1."""
    s = PoolSettings()
    assert (s.pool.size, s.pool.max_provisioning) == (3, 2)
    assert s.lease.ttl == 300.0
    assert s.snapshots.keep == 1


@pytest.mark.parametrize(
    ("key", "program"),
    [
        ("nightly.sql", "psql"),
        ("dumps/nightly.SQL.GZ", "bash"),
        ("nightly.dump", "pg_restore"),
        ("nightly.pgdump", "pg_restore"),
    ],
)
def test_if_no_restore_argv_is_set_then_the_suffix_picks_the_command(
    key: str, program: str
) -> None:
    """If restore.argv is empty, then .sql → psql, .sql.gz → gunzip | psql, custom → pg_restore."""
    command = PoolSettings().restore_command(_backup(key))
    assert command is not None
    assert command.argv[0] == program
    if key.lower().endswith(".gz"):
        assert "gunzip -c | psql" in command.argv[-1]
    assert "ON_ERROR_STOP=1" in " ".join(command.argv) or program == "pg_restore"


def test_if_the_suffix_is_unknown_then_the_default_is_the_builtin_restore_without_argv() -> None:
    """If a backup's suffix is unknown and no argv is set, then the command is the built-in
    restore (the local provider reads the format from the bytes) with no argv to run."""
    command = PoolSettings().restore_command(_backup("nightly.tar"))
    assert (command.builtin, tuple(command.argv)) == (True, ())


def test_if_a_restore_argv_is_set_then_it_is_not_the_builtin_restore() -> None:
    """If restore.argv is set, then providers run exactly it (not their own restore)."""
    s = attrs.evolve(PoolSettings(), restore=CommandSettings(argv=("true",)))
    assert s.restore_command(_backup("a.sql.gz")).builtin is False


def test_if_a_restore_argv_is_set_then_it_wins_with_its_env_and_timeout() -> None:
    """If restore.argv/env/timeout are set, then the command carries exactly them."""
    s = attrs.evolve(
        PoolSettings(),
        restore=CommandSettings(argv=("sh", "-c", "cat >/dev/null"), env={"X": "1"}, timeout=5.0),
    )
    command = s.restore_command(_backup("nightly.tar"))
    assert command is not None
    assert (tuple(command.argv), dict(command.env), command.timeout_seconds) == (
        ("sh", "-c", "cat >/dev/null"),
        {"X": "1"},
        5.0,
    )


def test_if_no_check_argv_is_set_then_the_default_needs_a_user_table() -> None:
    """If check.argv is empty, then the check runs psql with a query that fails without user tables."""
    command = PoolSettings().check_command()
    assert command.argv[0] == "psql"
    assert "no user tables" in command.argv[-1]


def test_if_a_size_is_negative_then_settings_refuse_it() -> None:
    """If pool.size is -1, then building the settings raises ValueError."""
    with pytest.raises(ValueError, match="size"):
        WarmPoolSettings(size=-1)
