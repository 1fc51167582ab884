"""``aldaas restore-backup`` run as a real process against real PostgreSQL and real dumps.

The dumps come from one throwaway source cluster per module (tests/pool/pool_dumps.py, the
same files the local provider's restore tests use); each case restores into a fresh volume of
the local provider, as its admin, through the PG* variables the Kubernetes restore Job sets.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import resource
import sys
from collections.abc import AsyncIterator, Iterator, Sequence

import attrs
import pytest
import trio
from pg_query import aquery
from pool_dumps import CRAFTED, Dumps, laced, source_dumps

from aldaas.broker._restore_backup import TERMINATION_LOG_BYTES, outcome_json
from aldaas.pool import (
    Endpoint,
    Kind,
    LocalProvider,
    LocalSettings,
    RestoreOutcome,
    describe_restore,
)
from aldaas.pool.sources._formats import Compression, Layout

PROGRESS = re.compile(r"progress (\d+) (\d+)")


@attrs.frozen
class Finished:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def dumps(module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Dumps:
    return source_dumps(module_data_dir, tmp_path_factory.mktemp("dumps"))


@pytest.fixture(scope="module")
def target(module_data_dir: pathlib.Path) -> LocalSettings:
    return LocalSettings(data_dir=module_data_dir / "target")


@pytest.fixture(scope="module")
def untouched(target: LocalSettings) -> Iterator[Endpoint]:
    """One volume for the cases that fail before the backup changes anything, made once."""
    provider = LocalProvider(target)
    endpoint = trio.run(provider.create_volume, "untouched", {})
    yield endpoint
    trio.run(provider.destroy, Kind.VOLUME, "untouched")


@pytest.fixture
async def volume(target: LocalSettings, request: pytest.FixtureRequest) -> AsyncIterator[Endpoint]:
    """A fresh volume of the local provider; its admin endpoint (PGDATABASE: the empty one)."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:].strip("-")
    provider = LocalProvider(target)
    endpoint = await provider.create_volume(name, {})
    try:
        yield endpoint
    finally:
        await provider.destroy(Kind.VOLUME, name)


async def restore_backup(
    endpoint: Endpoint | None,
    file: pathlib.Path,
    *args: str,
    key: str = "nightly/backup",
    fsize_limit: int | None = None,
) -> Finished:
    """Run ``python -m aldaas.broker restore-backup`` with the PG* variables of ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if endpoint is not None:
        env.update(endpoint.environ())

    def limit_file_size() -> None:
        assert fsize_limit is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    argv: Sequence[str] = [
        sys.executable,
        "-m",
        "aldaas.broker",
        "restore-backup",
        "--file",
        str(file),
        "--key",
        key,
        *args,
    ]
    done = await trio.run_process(
        argv,
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        preexec_fn=limit_file_size if fsize_limit is not None else None,
    )
    finished = Finished(done.returncode, done.stdout.decode(), done.stderr.decode())
    if endpoint is not None and endpoint.password:
        assert endpoint.password not in finished.stdout + finished.stderr
    return finished


def assert_progress(stdout: str, size: int) -> None:
    """Stdout is only ``progress DONE TOTAL`` lines, never going back, ending at the file's size."""
    lines = stdout.splitlines()
    assert lines
    done = [PROGRESS.fullmatch(line) for line in lines]
    assert all(done), lines
    values = [(int(m.group(1)), int(m.group(2))) for m in done if m]
    assert [d for d, _ in values] == sorted(d for d, _ in values)
    assert {t for _, t in values} == {size}
    assert values[-1] == (size, size)


def assert_failed(finished: Finished, outcome: pathlib.Path, *needles: str) -> None:
    """Exit 1, stderr one ``aldaas: error:`` sentence holding every needle, no outcome file."""
    assert finished.returncode == 1, finished
    assert finished.stderr.startswith("aldaas: error: "), finished.stderr
    assert finished.stderr.count("\n") == 1, finished.stderr
    for needle in needles:
        assert needle in finished.stderr
    assert not outcome.exists()


@pytest.mark.slow
async def test_if_a_gzipped_pg_dumpall_is_restored_and_sealed_then_the_login_acts_as_its_roles(
    dumps: Dumps, volume: Endpoint, tmp_path: pathlib.Path
) -> None:
    """If a pg_dumpall | gzip with roles and one application database (owned by a NOLOGIN role)
    is restored with --seal-login aldaas, then the outcome names that database, its rows are
    owned by that role, the login is no superuser but a member of the dump's roles, and no
    password of the dump is left."""
    backup = tmp_path / "all.sql.gz"
    backup.write_bytes(gzip.compress(dumps.files["app-only-all.sql"]))
    outcome = tmp_path / "termination-log"
    finished = await restore_backup(
        volume, backup, "--seal-login", "aldaas", "--outcome", str(outcome)
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == ""
    assert_progress(finished.stdout, backup.stat().st_size)
    meta = json.loads(outcome.read_text())
    assert (meta["restore_format"], meta["restore_database"]) == ("script+gzip", "app")
    assert "GRANTED BY" in meta["restore_tolerated"]
    assert not (tmp_path / "aldaas-work").exists()
    app = attrs.evolve(volume, database="app")
    assert await aquery(app, "SELECT count(*) FROM items") == [(1000,)]
    owner = "SELECT tableowner FROM pg_tables WHERE tablename = 'items'"
    assert await aquery(app, owner) == [("app_owner",)]
    login = await aquery(
        app,
        "SELECT rolcanlogin, rolsuper, rolcreaterole, pg_has_role('aldaas', 'app_owner', 'MEMBER'),"
        " pg_has_role('aldaas', 'app_reader', 'MEMBER'), pg_has_role('aldaas', 'app_group', "
        "'MEMBER') FROM pg_roles WHERE rolname = 'aldaas'",
    )
    assert login == [(True, False, False, True, True, True)]
    assert await aquery(
        app, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
    ) == [("aldaas",)]
    passwords = await aquery(
        app,
        "SELECT count(*) FROM pg_authid WHERE rolname <> current_user AND rolpassword IS NOT NULL",
    )
    assert passwords == [(0,)]


@pytest.mark.slow
async def test_if_a_pg_dumpall_holds_two_databases_then_restore_database_must_name_one(
    dumps: Dumps, target: LocalSettings, tmp_path: pathlib.Path
) -> None:
    """If a pg_dumpall holds two application databases, then without --database the command
    fails with one sentence naming both and restore.database, and with --database other it
    hands out that one."""
    backup = tmp_path / "all.sql.gz"
    backup.write_bytes(gzip.compress(dumps.files["all.sql"]))
    outcome = tmp_path / "outcome.json"
    provider = LocalProvider(target)
    try:
        first = await provider.create_volume("two-dbs-unnamed", {})
        finished = await restore_backup(first, backup, "--outcome", str(outcome))
        assert_failed(finished, outcome, "several databases (app, other)", "set restore.database")
        second = await provider.create_volume("two-dbs-named", {})
        finished = await restore_backup(
            second, backup, "--database", "other", "--outcome", str(outcome)
        )
        assert finished.returncode == 0, finished.stderr
        assert json.loads(outcome.read_text())["restore_database"] == "other"
        other = attrs.evolve(second, database="other")
        assert await aquery(other, "SELECT id FROM elsewhere") == [(7,)]
    finally:
        for name in ("two-dbs-unnamed", "two-dbs-named"):
            await provider.destroy(Kind.VOLUME, name)


@pytest.mark.slow
async def test_if_the_backup_is_an_uncompressed_archive_then_it_is_read_in_place(
    dumps: Dumps, volume: Endpoint, tmp_path: pathlib.Path
) -> None:
    """If --file is an uncompressed pg_dump -Fc or -Ft and no file may grow to half its size (so
    no copy of it fits in the work folder), then it still restores, with well-formed progress;
    the same -Fc gzipped (which must be unpacked into the work folder) fails on that limit; a
    packed -Fd is unpacked straight from the file."""
    outcome = tmp_path / "outcome.json"
    custom = dumps.files["app-z0.dump"]
    packed = tmp_path / "app.dump.gz"
    packed.write_bytes(gzip.compress(custom))
    finished = await restore_backup(
        volume, packed, "--outcome", str(outcome), fsize_limit=len(custom) // 2
    )
    assert_failed(finished, outcome, "File too large")
    cases = [("app-z0.dump", "custom+none", True), ("app.tar", "tar+none", True)]
    for dump, detected, limited in [*cases, ("app-dir.tar", "tar+none", False)]:
        # One volume, a database each: every archive restores into an empty one.
        database = dump.replace(".", "_").replace("-", "_")
        await aquery(volume, f"CREATE DATABASE {database}")
        into = attrs.evolve(volume, database=database)
        data = dumps.files[dump]
        backup = tmp_path / dump
        backup.write_bytes(data)
        limit = len(data) // 2 if limited else None
        finished = await restore_backup(
            into, backup, "--jobs", "2", "--outcome", str(outcome), fsize_limit=limit
        )
        assert finished.returncode == 0, (dump, finished.stderr)
        assert_progress(finished.stdout, len(data))
        meta = json.loads(outcome.read_text())
        assert (meta["restore_format"], meta["restore_database"]) == (detected, database)
        assert await aquery(into, "SELECT count(*) FROM items") == [(1000,)], dump
        assert not (tmp_path / "aldaas-work").exists()
        outcome.unlink()


@pytest.mark.slow
async def test_if_a_backup_holds_psql_shell_commands_then_nothing_runs(
    dumps: Dumps, untouched: Endpoint, tmp_path: pathlib.Path
) -> None:
    """If a real pg_dump is laced with \\! at a line's start or in its middle (which only psql's
    restricted mode refuses), then the command fails with one sentence naming the backup and no
    program ran (tests/pool/test_restore_backups.py tries every crafted line)."""
    outcome = tmp_path / "outcome.json"
    for label in ("shell", "mid-line shell"):
        line = CRAFTED[label]
        marker = tmp_path / label.replace(" ", "-")
        backup = tmp_path / "crafted.sql.gz"
        backup.write_bytes(gzip.compress(laced(dumps.files["app.sql"], line, marker)))
        finished = await restore_backup(
            untouched, backup, "--outcome", str(outcome), key="nightly/crafted.sql.gz"
        )
        assert_failed(finished, outcome, "'nightly/crafted.sql.gz'")
        assert not marker.exists(), label


@pytest.mark.slow
async def test_if_the_file_is_no_dump_then_one_sentence_names_its_first_bytes(
    untouched: Endpoint, tmp_path: pathlib.Path
) -> None:
    """If --file is neither SQL nor a pg_dump archive, then the command exits 1 with one sentence
    naming its first bytes and writes no outcome."""
    backup = tmp_path / "junk.bin"
    backup.write_bytes(gzip.compress(b"\x00\x01ELF-not-a-dump" * 100))
    outcome = tmp_path / "outcome.json"
    finished = await restore_backup(untouched, backup, "--outcome", str(outcome), key="junk.bin")
    assert_failed(finished, outcome, "no format aldaas knows", r"b'\x00\x01ELF")


@pytest.mark.slow
async def test_if_a_libpq_variable_is_missing_then_it_is_a_usage_error_naming_it(
    tmp_path: pathlib.Path,
) -> None:
    """If PGHOST is not set, then the command exits 2 with one sentence naming PGHOST."""
    backup = tmp_path / "app.sql"
    backup.write_bytes(b"SELECT 1;\n")
    finished = await restore_backup(None, backup)
    assert finished.returncode == 2
    assert finished.stderr.startswith("aldaas: error: PGHOST is not set;"), finished.stderr
    assert finished.stdout == ""


@pytest.mark.slow
async def test_if_no_server_answers_then_one_sentence_names_the_variables_to_check(
    tmp_path: pathlib.Path,
) -> None:
    """If nothing listens at PGHOST:PGPORT, then the command exits 1 with one sentence naming the
    address and the variables to check, and never prints the password."""
    backup = tmp_path / "app.sql"
    backup.write_bytes(b"SELECT 1;\n")
    nowhere = Endpoint(
        host="127.0.0.1", port=1, user="aldaas_admin", database="aldaas", password="s3cret-pw"
    )
    outcome = tmp_path / "outcome.json"
    finished = await restore_backup(nowhere, backup, "--outcome", str(outcome))
    assert_failed(finished, outcome, "server at 127.0.0.1:1", "check PGHOST, PGPORT")


@pytest.mark.slow
async def test_if_the_bin_dir_has_no_psql_then_one_sentence_says_to_set_bin_dir(
    tmp_path: pathlib.Path,
) -> None:
    """If --bin-dir holds no PostgreSQL client tools, then the command exits 1 with one sentence
    naming the folder and --bin-dir."""
    backup = tmp_path / "app.sql"
    backup.write_bytes(b"SELECT 1;\n")
    nowhere = Endpoint(host="127.0.0.1", port=1, user="aldaas_admin", database="aldaas")
    outcome = tmp_path / "outcome.json"
    finished = await restore_backup(
        nowhere, backup, "--bin-dir", str(tmp_path), "--outcome", str(outcome)
    )
    assert_failed(finished, outcome, f"no psql in '{tmp_path}'", "set --bin-dir")


def outcome_of(tolerated: Sequence[str], created_roles: Sequence[str]) -> RestoreOutcome:
    return RestoreOutcome(
        database="app",
        tolerated=tuple(tolerated),
        created_roles=tuple(created_roles),
        layout=Layout.SCRIPT,
        compression=Compression.GZIP,
    )


def test_if_the_outcome_is_small_then_its_json_is_the_snapshot_meta_unchanged() -> None:
    """If the restore tolerated and created little, then the outcome is describe_restore's meta."""
    outcome = outcome_of(["CREATE ROLE postgres (the cluster already has it)"], ["app_owner"])
    assert json.loads(outcome_json(outcome)) == describe_restore(outcome)


def test_if_the_outcome_is_long_then_its_json_fits_the_termination_log_and_counts_the_rest() -> (
    None
):
    """If a restore created thousands of roles with long non-ASCII names and tolerated hundreds of
    statements, then the JSON stays valid UTF-8 within 4096 bytes, each list ends with
    "and N more", and shown plus N is the whole list."""
    roles = [f"rôle_{i:05d}_" + "é" * 20 for i in range(3000)]
    tolerated = [f"CREATE ROLE {r} (the cluster already has it)" for r in roles[:400]]
    data = outcome_json(outcome_of(tolerated, roles))
    assert len(data) <= TERMINATION_LOG_BYTES
    meta = json.loads(data.decode("utf-8"))
    assert meta["restore_database"] == "app"
    for key, full, sep in (
        ("restore_created_roles", roles, ", "),
        ("restore_tolerated", tolerated, "; "),
    ):
        *shown, rest = meta[key].split(sep)
        match = re.fullmatch(r"and (\d+) more", rest)
        assert match, rest
        assert shown == full[: len(shown)]
        assert len(shown) + int(match.group(1)) == len(full)


def test_if_a_dump_named_a_role_in_bytes_that_are_not_utf8_then_the_outcome_is_still_json() -> None:
    """If a role's name holds bytes that are not UTF-8 (kept as surrogates by the filter), then
    the outcome is valid UTF-8 JSON with U+FFFD in their place."""
    name = b"r\xff\xfe".decode("utf-8", "surrogateescape")
    meta = json.loads(outcome_json(outcome_of([], [name])).decode("utf-8"))
    assert meta["restore_created_roles"] == "r\ufffd\ufffd"
