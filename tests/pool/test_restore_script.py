"""The pure parts of the built-in restore: compression, layout, archive headers, the script filter."""

from __future__ import annotations

import gzip

import lz4.frame
import pytest
import zstandard

from aldaas.pool import ProviderError
from aldaas.pool.sources._formats import (
    Compression,
    Decompressor,
    Layout,
    archive_compression,
    archive_versions,
    compression_of,
    layout_of,
)
from aldaas.pool.sources._script import Connect, ScriptFilter, choose_database

TEXT = b"".join(b"INSERT INTO t VALUES (%d);\n" % i for i in range(20000))


def squeeze(how: Compression, data: bytes) -> bytes:
    if how is Compression.GZIP:
        return gzip.compress(data[:1000]) + gzip.compress(data[1000:])
    if how is Compression.ZSTD:
        c = zstandard.ZstdCompressor()
        return c.compress(data[:1000]) + c.compress(data[1000:])
    if how is Compression.LZ4:
        return lz4.frame.compress(data[:1000]) + lz4.frame.compress(data[1000:])
    return data


@pytest.mark.parametrize("how", list(Compression))
@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_if_a_stream_has_several_frames_then_every_chunking_gives_the_original(
    how: Compression, chunk: int
) -> None:
    """If gzip/zstd/lz4 data of two frames arrives in any chunking, then the output is the input."""
    data = squeeze(how, TEXT)
    if chunk == 1 and how is not Compression.NONE:
        data = data[:3000]  # byte by byte is slow; the first frame and a bit suffice
    assert compression_of(data) is how
    decompressor = Decompressor("k", how)
    out = b"".join(
        p for i in range(0, len(data), chunk) for p in decompressor.feed(data[i : i + chunk])
    )
    if chunk != 1 or how is Compression.NONE:
        decompressor.finish()
        assert out == TEXT
    else:
        assert TEXT.startswith(out)


@pytest.mark.parametrize("how", [Compression.GZIP, Compression.ZSTD, Compression.LZ4])
def test_if_a_compressed_stream_is_cut_short_then_finish_says_truncated(how: Compression) -> None:
    """If compressed data ends inside a frame, then finish() raises naming the compression."""
    data = squeeze(how, TEXT)[:-10]
    decompressor = Decompressor("k.sql", how)
    for _ in decompressor.feed(data):
        pass
    with pytest.raises(ProviderError, match=f"truncated {how.value} data"):
        decompressor.finish()


def test_if_the_first_bytes_are_unknown_then_the_error_names_them() -> None:
    """If decompressed bytes are no script, archive or tar, then one sentence shows them."""
    with pytest.raises(ProviderError, match=r"no format aldaas knows \(it starts with b'\\x7fELF"):
        layout_of("x", b"\x7fELF\x00\x00\x00")
    assert layout_of("x", b"PGDMP\x01\x10") is Layout.CUSTOM
    assert layout_of("x", b"--\nSET x = 1;\n") is Layout.SCRIPT


def test_if_an_archive_header_is_read_then_both_versions_come_out() -> None:
    """If a custom-format header (archive 1.16, 4-byte ints) is parsed, then its versions show."""

    def i(v: int) -> bytes:
        return b"\x00" + v.to_bytes(4, "little")

    def s(t: str) -> bytes:
        return i(len(t)) + t.encode()

    head = b"PGDMP\x01\x10\x00\x04\x08\x01" + b"\x00" + b"".join(i(1) for _ in range(7))
    head += s("app") + s("15.8") + s("18.1")
    assert archive_versions(head) == ("15.8", "18.1")
    assert archive_versions(b"not an archive") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"PGDMP\x01\x10\x00\x04\x08\x01\x03", "zstd"),
        (b"PGDMP\x01\x10\x00\x04\x08\x01\x02", "lz4"),
        (b"PGDMP\x01\x0f\x00\x04\x08\x01\x01", "gzip"),
        (b"PGDMP\x01\x10\x00\x04\x08\x01\x00", None),
        (b"PGDMP\x01\x0e\x00\x04\x08\x01\x01\x01\x00\x00\x00", "gzip"),  # level -1 (default)
        (b"PGDMP\x01\x0e\x00\x04\x08\x01\x00\x00\x00\x00\x00", None),  # level 0
    ],
)
def test_if_an_archive_header_names_a_compression_then_it_is_read(
    header: bytes, expected: str | None
) -> None:
    """If an archive header (1.15+: an algorithm byte; older: a gzip level) is read, then the
    compression of its data comes out."""
    assert archive_compression(header + b"\x00" * 40) == expected


def flt(**kw: object) -> ScriptFilter:
    args: dict[str, object] = {
        "key": "b.sql",
        "admin": "aldaas",
        "roles": {"aldaas", "pg_read_all_data"},
        "databases": {"postgres", "template0", "template1", "aldaas"},
        "fresh_database": "aldaas",
        "server_major": 18,
    }
    args.update(kw)
    return ScriptFilter(**args)  # type: ignore[arg-type]


def test_if_a_script_names_missing_roles_then_they_are_created_nologin_before_use() -> None:
    """If OWNER TO/GRANT name roles nobody created, then CREATE ROLE ... NOLOGIN precedes them."""
    f = flt()
    out = f.feed(
        b"ALTER TABLE public.t OWNER TO postgres;\n"
        b'GRANT SELECT ON TABLE public.t TO "Reader", PUBLIC;\n'
        b"ALTER TABLE public.u OWNER TO postgres;\n"
    )
    assert out == [
        b'CREATE ROLE "postgres" NOLOGIN;\nALTER TABLE public.t OWNER TO postgres;\n'
        b'CREATE ROLE "Reader" NOLOGIN;\nGRANT SELECT ON TABLE public.t TO "Reader", PUBLIC;\n'
        b"ALTER TABLE public.u OWNER TO postgres;\n"
    ]
    assert f.created_roles == ["postgres", "Reader"]


def test_if_copy_data_looks_like_commands_then_it_passes_untouched() -> None:
    """If COPY data lines start with a backslash or SQL words, then they are data, not commands."""
    data = (
        b"COPY public.t (a) FROM stdin;\n\\\\! not a command\nALTER ROLE x OWNER TO y;\n\\.\n"
        b"\\connect app\n"
    )
    f = flt()
    out = [p for i in range(len(data)) for p in f.feed(data[i : i + 1])]
    assert b"".join(p for p in out if isinstance(p, bytes)) == data[: data.index(b"\\connect")]
    assert out[-1] == Connect("app")


COPY_BLOCK = (
    b"SET x = 1;\nCOPY public.t (a) FROM stdin;\n"
    + b"a\\\\.b\n\\\\.\nc\\.\n\\N\n\\\\\\\\\n" * 20  # escaped backslashes: no end marker
    + b"\\.\nCOPY public.u (a) FROM stdin;\n\\.\nSELECT 1;\n\\connect app\nSELECT 2;\n"
)


def test_if_copy_data_is_cut_anywhere_then_its_end_is_still_found() -> None:
    """If a script with COPY data full of backslashes arrives in two chunks cut at any byte,
    then what psql gets is the script up to the \\connect, the Connect and the rest."""
    before = COPY_BLOCK[: COPY_BLOCK.index(b"\\connect")]
    for cut in range(1, len(COPY_BLOCK)):
        f = flt()
        out = [*f.feed(COPY_BLOCK[:cut]), *f.feed(COPY_BLOCK[cut:]), *f.finish()]
        split = out.index(Connect("app"))
        assert b"".join(out[:split]) == before, cut  # type: ignore[arg-type]
        assert b"".join(out[split + 1 :]) == b"SELECT 2;\n", cut  # type: ignore[arg-type]


def test_if_a_chunk_is_all_copy_data_then_it_is_passed_on_without_a_copy() -> None:
    """If a whole chunk is COPY data, then psql gets that very chunk (no per-line work, no copy)."""
    f = flt()
    f.feed(b"COPY public.t (a) FROM stdin;\n")
    chunk = b"".join(b"%d\tsome text\n" % i for i in range(50000))
    assert f.feed(chunk)[0] is chunk
    assert f.feed(b"\\.\nSELECT 1;\n") == [b"\\.\nSELECT 1;\n"]


def test_if_a_pg_dumpall_has_tablespaces_then_they_are_dropped_and_listed() -> None:
    """If a script creates a tablespace, grants on it, creates a database in it and sets it as
    default_tablespace, then all of that goes and the tolerated list names the tablespace."""
    f = flt()
    out = f.feed(
        b"CREATE TABLESPACE fast OWNER postgres LOCATION '/mnt/fast';\n"
        b"GRANT CREATE ON TABLESPACE fast TO app;\n"
        b"COMMENT ON TABLESPACE \"Slow Disk\" IS 'x';\n"
        b"CREATE DATABASE app WITH TEMPLATE = template0 ENCODING = 'UTF8' TABLESPACE = fast;\n"
        b"SET default_tablespace = '';\n"
        b"SET default_tablespace = fast;\n"
        b"CREATE TABLE t (a int);\n"
    )
    assert out == [
        b"CREATE DATABASE app WITH TEMPLATE = template0 ENCODING = 'UTF8';\n"
        b"SET default_tablespace = '';\nSET default_tablespace = '';\nCREATE TABLE t (a int);\n"
    ]
    assert f.tablespaces == ["fast", "Slow Disk"]
    assert [t.split(" (")[0] for t in f.tolerated] == ["tablespace fast", "tablespace Slow Disk"]


def test_if_a_pg_dumpall_runs_on_a_fresh_cluster_then_what_exists_is_tolerated() -> None:
    """If a pg_dumpall creates the admin, alters it and creates existing databases, then those
    are dropped (listed as tolerated), the fresh target is replaced and passwords are gone."""
    f = flt()
    out = f.feed(
        b"CREATE ROLE aldaas;\n"
        b"ALTER ROLE aldaas WITH SUPERUSER PASSWORD 'x';\n"
        b"CREATE ROLE app;\n"
        b"ALTER ROLE app WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:abc';\n"
        b"CREATE DATABASE postgres;\n"
        b"CREATE DATABASE aldaas WITH TEMPLATE = template0;\n"
    )
    assert out == [
        b"CREATE ROLE app;\nALTER ROLE app WITH LOGIN;\n"
        b'DROP DATABASE IF EXISTS "aldaas";\nCREATE DATABASE aldaas WITH TEMPLATE = template0;\n'
    ]
    assert len(f.tolerated) == 4


def test_if_a_dump_comes_from_a_newer_server_then_the_header_line_stops_it() -> None:
    """If the script's header says a newer major than the server, then the error names both."""
    with pytest.raises(ProviderError, match=r"PostgreSQL 18, newer than the PostgreSQL 15"):
        flt(server_major=15).feed(b"-- Dumped from database version 18.1\n")


@pytest.mark.parametrize(
    ("named", "listed", "expected"),
    [
        (None, [], "aldaas"),
        ("mine", [], "mine"),
        (None, ["template1", "app", "postgres"], "app"),
        ("b", ["a", "b"], "b"),
        (None, ["template1", "postgres"], "postgres"),
    ],
)
def test_if_a_dump_names_databases_then_the_lease_database_follows_the_rules(
    named: str | None, listed: list[str], expected: str
) -> None:
    """If settings name one, it wins; else the single non-system database; else the default."""
    assert choose_database("k", named, listed, "aldaas") == expected


@pytest.mark.parametrize(
    ("named", "listed", "message"),
    [
        (None, ["a", "b"], r"several databases \(a, b\); set local.database"),
        ("c", ["a", "b"], r"has no database 'c' \(it holds a, b\)"),
    ],
)
def test_if_the_database_cannot_be_chosen_then_the_error_names_the_candidates(
    named: str | None, listed: list[str], message: str
) -> None:
    """If several candidates and none named, or the named one is missing, then the error lists
    the dump's databases and the setting."""
    with pytest.raises(ProviderError, match=message):
        choose_database("k", named, listed, "aldaas")
