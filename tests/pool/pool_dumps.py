"""Real dumps for the restore tests: a throwaway source cluster, dumped by real pg_dump/pg_dumpall.

Shared by tests/pool/test_restore_backups.py (the local provider's restore) and
tests/broker/test_broker_restore_backup.py (``aldaas restore-backup``), so both
restore the same files.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import subprocess
import tarfile
from collections.abc import Sequence

import attrs
import lz4.frame
import trio
import zstandard

from aldaas.pool import Endpoint, Kind, LocalProvider, LocalSettings

SOURCE_SQL = """
CREATE ROLE app_owner NOLOGIN;
CREATE ROLE app_reader LOGIN PASSWORD 'dump-password-never-handed-out';
CREATE ROLE app_group NOLOGIN;
GRANT app_group TO app_reader;
CREATE DATABASE app OWNER app_owner;
CREATE DATABASE other OWNER app_owner;
"""

APP_SQL = """
SET ROLE app_owner;
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, email text);
INSERT INTO items SELECT g, 'item ' || g, 'user' || g || '@example.com'
  FROM generate_series(1, 1000) g;
CREATE VIEW item_names AS SELECT name FROM items;
GRANT SELECT ON items TO app_reader;
GRANT SELECT ON item_names TO app_group;
CREATE TABLE customers (id int PRIMARY KEY, full_name text, email text, phone text, notes text);
INSERT INTO customers VALUES (1, 'Ada Lovelace', 'ada@real.example', '+44 20 7946 0000', 'VIP'),
  (2, 'Alan Turing', 'alan@real.example', '+44 161 496 0000', NULL);
RESET ROLE;
CREATE TABLE audit (id int);
INSERT INTO audit VALUES (1), (2);
"""

OTHER_SQL = "SET ROLE app_owner; CREATE TABLE elsewhere (id int); INSERT INTO elsewhere VALUES (7);"


def run(argv: Sequence[str], endpoint: Endpoint, database: str | None = None) -> bytes:
    env = {**os.environ, **endpoint.environ()}
    if database is not None:
        env["PGDATABASE"] = database
    done = subprocess.run(list(argv), env=env, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def tar_of(folder: pathlib.Path, mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        archive.add(folder, arcname="nightly")
    return buffer.getvalue()


@attrs.frozen
class Dumps:
    """Every dump of the source cluster, made once."""

    files: dict[str, bytes]
    bin_dir: pathlib.Path


def make_dumps(settings: LocalSettings, work: pathlib.Path, *, directory: bool = True) -> Dumps:
    """Start a source cluster (superuser ``postgres``), fill it, dump it every way."""
    files: dict[str, bytes] = {}

    async def build() -> pathlib.Path:
        provider = LocalProvider(settings)
        source = await provider.create_volume("source", {})
        bin_dir = await provider.bin_dir()
        psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        for statement in SOURCE_SQL.strip().splitlines():
            run([*psql, "-c", statement], source, "postgres")
        run([*psql, "-c", APP_SQL], source, "app")
        run([*psql, "-c", OTHER_SQL], source, "other")
        dump = [str(bin_dir / "pg_dump"), "-d", "app"]
        dumpall = [str(bin_dir / "pg_dumpall")]
        files["all.sql"] = run(dumpall, source)
        files["app-only-all.sql"] = run([*dumpall, "--exclude-database=other"], source)
        files["app.sql"] = run(dump, source)
        files["app-noowner.sql"] = run([*dump, "--no-owner", "--no-acl"], source)
        files["app.dump"] = run([*dump, "-Fc"], source)
        files["app-z0.dump"] = run([*dump, "-Fc", "-Z0"], source)
        files["app.tar"] = run([*dump, "-Ft"], source)
        if directory:  # pg_dump 15's -Fd needs no second look; 18's is the one packed in tar
            run([*dump, "-Fd", "-j", "2", "-f", str(work / "dir")], source)
            files["app-dir.tar"] = tar_of(work / "dir", "w")
            files["app-dir.tar.gz"] = tar_of(work / "dir", "w:gz")
        await provider.destroy(Kind.VOLUME, "source")
        return bin_dir

    bin_dir = trio.run(build)
    return Dumps(files=files, bin_dir=bin_dir)


def source_dumps(data_dir: pathlib.Path, work: pathlib.Path) -> Dumps:
    """Every dump of a source cluster kept under ``data_dir/source`` whose login is ``postgres``
    (as on most servers); a test module makes it once (module-scoped fixture)."""
    settings = LocalSettings(data_dir=data_dir / "source", user="postgres", database="postgres")
    return make_dumps(settings, work)


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, 1)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if how == "lz4":
        return lz4.frame.compress(data)
    return data


CRAFTED = {
    "shell": b"\\! touch {marker}\n",
    "mid-line shell": b"SELECT 1 \\! touch {marker}\n;\n",
    "output pipe": b"\\o |touch {marker}\nSELECT 1;\n",
    "copy program": b"\\copy (SELECT 1) to program 'touch {marker}'\n",
    "restrict lifted": b"\\unrestrict abc\n\\! touch {marker}\n",
    "server program": b"COPY audit FROM PROGRAM 'touch {marker}';\n",
}


def laced(dump: bytes, line: bytes, marker: pathlib.Path) -> bytes:
    """``dump`` (a plain pg_dump) with ``line`` (a :data:`CRAFTED` one) before its first SET."""
    cut = dump.index(b"SET statement_timeout")
    return dump[:cut] + line.replace(b"{marker}", str(marker).encode()) + dump[cut:]
