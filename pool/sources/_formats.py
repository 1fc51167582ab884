"""Backup formats: what a key's suffix promises, what its first bytes must be, the default commands.

Pure functions, no I/O: the provider peeks at a backup's first chunk and
calls :func:`check_header` before it runs a restore, so that a file that is
not what its name says fails with a clear sentence instead of a psql error
three screens later.
"""

from __future__ import annotations

import enum
import re
import zlib
from collections.abc import Iterator

import lz4.frame
import zstandard

from .._provider import Command, ProviderError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_MAGIC = b"\x04\x22\x4d\x18"
CUSTOM_MAGIC = b"PGDMP"
TAR_MAGIC_OFFSET = 257
"""``ustar`` sits at this offset of a tar header (POSIX and GNU tar alike)."""


class BackupFormat(enum.Enum):
    """How a backup is encoded, decided by its key's suffix."""

    SQL = "sql"
    """A plain SQL script (``pg_dump -Fp``)."""
    SQL_GZ = "sql.gz"
    """A gzip-compressed plain SQL script (the original's default)."""
    CUSTOM = "custom"
    """pg_dump's custom archive format (``pg_dump -Fc``), restored with pg_restore."""


_SUFFIXES: tuple[tuple[str, BackupFormat], ...] = (
    (".sql.gz", BackupFormat.SQL_GZ),
    (".gz", BackupFormat.SQL_GZ),
    (".sql", BackupFormat.SQL),
    (".dump", BackupFormat.CUSTOM),
    (".pgdump", BackupFormat.CUSTOM),
    (".custom", BackupFormat.CUSTOM),
    (".backup", BackupFormat.CUSTOM),
)


def format_of(key: str) -> BackupFormat | None:
    """The format a key's suffix promises, or ``None`` when the suffix says nothing we know."""
    lowered = key.lower()
    for suffix, fmt in _SUFFIXES:
        if lowered.endswith(suffix):
            return fmt
    return None


def check_header(key: str, head: bytes) -> None:
    """Raise :class:`ProviderError` unless ``head`` (first bytes) is what ``key``'s suffix says."""
    if not head:
        raise ProviderError(f"backup {key!r} is empty; replace it with a real dump")
    fmt = format_of(key)
    if fmt is BackupFormat.SQL_GZ and not head.startswith(GZIP_MAGIC):
        raise ProviderError(
            f"backup {key!r} is not gzip data (starts with {head[:8]!r}); "
            "compress it with gzip or rename it to match its format"
        )
    if fmt is BackupFormat.CUSTOM and not head.startswith(CUSTOM_MAGIC):
        raise ProviderError(
            f"backup {key!r} is not a pg_dump custom-format archive (starts with {head[:8]!r}); "
            "make it with pg_dump -Fc or rename it to match its format"
        )
    if fmt is BackupFormat.SQL and (
        head.startswith((GZIP_MAGIC, CUSTOM_MAGIC)) or b"\x00" in head[:4096]
    ):
        raise ProviderError(
            f"backup {key!r} is binary data, not a plain SQL script (starts with {head[:8]!r}); "
            "rename it to match its format (.sql.gz, .dump)"
        )


class GzipValidator:
    """Decompresses a gzip stream chunk by chunk, only to prove it is whole and uncorrupted.

    Output is bounded per call (no zip bomb can make it allocate), and thrown away.
    """

    _STEP = 1 << 20

    def __init__(self, key: str) -> None:
        self._key = key
        self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._offset = 0

    def feed(self, chunk: bytes) -> None:
        """Check the next chunk; raise :class:`ProviderError` at the first corrupt byte."""
        data = chunk
        try:
            while data:
                if self._inflate.eof:
                    # Concatenated gzip members are legal (gunzip reads them all).
                    data = self._inflate.unused_data + data
                    self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                self._inflate.decompress(data, self._STEP)
                data = self._inflate.unconsumed_tail
        except zlib.error as exc:
            raise ProviderError(
                f"backup {self._key!r} is corrupt gzip data near byte {self._offset} ({exc}); "
                "replace it with an intact backup"
            ) from None
        self._offset += len(chunk)

    def finish(self) -> None:
        """Raise :class:`ProviderError` if the stream ended in the middle of a gzip member."""
        if not self._inflate.eof:
            raise ProviderError(
                f"backup {self._key!r} is truncated gzip data ({self._offset} bytes); "
                "replace it with a complete backup"
            )


class Compression(enum.Enum):
    """How a backup's bytes are compressed, decided by its first bytes (never by its name)."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    LZ4 = "lz4"


class Layout(enum.Enum):
    """What a backup holds once decompressed, decided by its first bytes."""

    SCRIPT = "script"
    """A plain SQL script: ``pg_dump -Fp`` or ``pg_dumpall``, restored through psql."""
    CUSTOM = "custom"
    """``pg_dump -Fc``, restored with pg_restore."""
    TAR = "tar"
    """A tar archive: ``pg_dump -Ft``, or a directory-format dump (``-Fd``) packed with tar."""


def compression_of(head: bytes) -> Compression:
    """The compression a backup's first bytes announce (gzip, zstd and lz4 frames have magics)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    if head.startswith(LZ4_MAGIC):
        return Compression.LZ4
    return Compression.NONE


def layout_of(key: str, head: bytes) -> Layout:
    """What the decompressed first bytes are; raise one sentence naming them when unknown."""
    if not head:
        raise ProviderError(f"backup {key!r} is empty; replace it with a real dump")
    if head.startswith(CUSTOM_MAGIC):
        return Layout.CUSTOM
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar":
        return Layout.TAR
    if b"\x00" not in head[:4096]:
        return Layout.SCRIPT
    raise ProviderError(
        f"backup {key!r} is in no format aldaas knows (it starts with {head[:16]!r}); "
        "give it a pg_dump or pg_dumpall file: plain SQL, -Fc, -Ft or a tar of -Fd, "
        "uncompressed or gzip, zstd or lz4"
    )


class Decompressor:
    """Decompresses a gzip, zstd or lz4 stream chunk by chunk, several frames or members in a row.

    Output comes in pieces of at most about :attr:`STEP` bytes per input slice,
    so a small, highly compressed backup cannot make one call allocate gigabytes.
    """

    STEP = 4 << 20
    _ZSTD_SLICE = 16 << 10

    def __init__(self, key: str, compression: Compression) -> None:
        self._key = key
        self.compression = compression
        self._offset = 0
        self._ended = True
        self._gzip: zlib._Decompress | None = None
        self._zstd: zstandard.ZstdDecompressionObj | None = None
        self._lz4: lz4.frame.LZ4FrameDecompressor | None = None

    def _corrupt(self, exc: Exception) -> ProviderError:
        return ProviderError(
            f"backup {self._key!r} is corrupt {self.compression.value} data near byte "
            f"{self._offset} ({exc}); replace it with an intact backup"
        )

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Yield the decompressed bytes of ``chunk``; raise :class:`ProviderError` if corrupt."""
        try:
            if self.compression is Compression.NONE:
                if chunk:
                    yield chunk
            elif self.compression is Compression.GZIP:
                yield from self._feed_gzip(chunk)
            elif self.compression is Compression.ZSTD:
                yield from self._feed_zstd(chunk)
            else:
                yield from self._feed_lz4(chunk)
        except (zlib.error, zstandard.ZstdError, RuntimeError) as exc:
            raise self._corrupt(exc) from None
        self._offset += len(chunk)

    def _feed_gzip(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._gzip is None or self._gzip.eof:
                if self._gzip is not None:
                    data = self._gzip.unused_data + data
                    if not data:
                        return
                self._gzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            self._ended = False
            out = self._gzip.decompress(data, self.STEP)
            if out:
                yield out
            data = self._gzip.unconsumed_tail
            if self._gzip.eof:
                self._ended = True
                data = self._gzip.unused_data + data
                self._gzip = None

    def _feed_zstd(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        while view:
            piece, view = view[: self._ZSTD_SLICE], view[self._ZSTD_SLICE :]
            while piece:
                if self._zstd is None:
                    self._zstd = zstandard.ZstdDecompressor().decompressobj()
                self._ended = False
                out = self._zstd.decompress(bytes(piece))
                if out:
                    yield out
                if self._zstd.eof:
                    self._ended = True
                    piece = memoryview(self._zstd.unused_data)
                    self._zstd = None
                else:
                    piece = memoryview(b"")

    def _feed_lz4(self, data: bytes) -> Iterator[bytes]:
        pending = data
        while True:
            if self._lz4 is None:
                if not pending:
                    return
                self._lz4 = lz4.frame.LZ4FrameDecompressor()
            self._ended = False
            out = self._lz4.decompress(pending, max_length=self.STEP)
            pending = b""  # the decompressor keeps what it has not yet turned into output
            if out:
                yield out
            if self._lz4.eof:
                self._ended = True
                pending = self._lz4.unused_data
                self._lz4 = None
            elif self._lz4.needs_input:
                return

    def finish(self) -> None:
        """Raise :class:`ProviderError` if the stream ended inside a compressed frame or member."""
        if not self._ended:
            raise ProviderError(
                f"backup {self._key!r} is truncated {self.compression.value} data "
                f"({self._offset} bytes); replace it with a complete backup"
            )


_DUMPED_FROM = re.compile(rb"Dumped from database version:? (\d+)(?:\.(\d+))?")


def dumped_from_major(text: bytes) -> int | None:
    """The server major a dump was made from, from its header comment (``-- Dumped from ...``).

    PostgreSQL 9.6 and older spell it ``9.6``: the major is then 9.
    """
    match = _DUMPED_FROM.search(text)
    return int(match.group(1)) if match else None


def archive_versions(toc: bytes) -> tuple[str, str] | None:
    """``(server version, pg_dump version)`` from a pg_dump archive's header (custom ``-Fc`` file,
    or the ``toc.dat`` of ``-Ft``/``-Fd``); ``None`` when the header cannot be read.

    The header is: ``PGDMP``, archive version (3 bytes), int size, offset size,
    format, the compression (a byte from archive 1.15 on, an int before), the
    dump time (7 ints), then the database name, the server's version and
    pg_dump's version as length-prefixed strings. An int is a sign byte and
    ``int size`` little-endian bytes.
    """
    if not toc.startswith(CUSTOM_MAGIC) or len(toc) < 11:
        return None
    vmaj, vmin = toc[5], toc[6]
    int_size = toc[8]
    pos = 11
    if not 1 <= int_size <= 8:
        return None

    def read_int() -> int:
        nonlocal pos
        sign, raw = toc[pos], toc[pos + 1 : pos + 1 + int_size]
        pos += 1 + int_size
        value = int.from_bytes(raw, "little")
        return -value if sign else value

    def read_str() -> str:
        nonlocal pos
        length = read_int()
        if length < 0:
            return ""
        text = toc[pos : pos + length].decode("utf-8", "replace")
        pos += length
        return text

    try:
        if (vmaj, vmin) >= (1, 15):
            pos += 1
        else:
            read_int()
        for _ in range(7):
            read_int()
        read_str()  # the database's name
        return read_str(), read_str()
    except IndexError:
        return None


_ARCHIVE_COMPRESSIONS = {1: "gzip", 2: "lz4", 3: "zstd"}
"""pg_dump's ``pg_compress_algorithm`` values, as archive 1.15+ headers store them."""


def archive_compression(toc: bytes) -> str | None:
    """How a pg_dump archive's data is compressed (``gzip``, ``lz4``, ``zstd``), from its header;
    ``None`` when uncompressed or unreadable. Before archive 1.15 only gzip existed (a level)."""
    if not toc.startswith(CUSTOM_MAGIC) or len(toc) < 17:
        return None
    if (toc[5], toc[6]) >= (1, 15):
        return _ARCHIVE_COMPRESSIONS.get(toc[11])
    int_size = toc[8]
    level = int.from_bytes(toc[12 : 12 + int_size], "little") if 1 <= int_size <= 8 else 0
    return "gzip" if level else None  # -1 (sign byte set) is zlib's default level


def check_major(
    key: str, dump_major: int, server_major: int, *, bin_dir_setting: str = "local.bin_dir"
) -> None:
    """Raise one sentence naming both versions when a dump comes from a newer server.

    ``bin_dir_setting`` is what the user sets to other binaries (``local.bin_dir``,
    or ``--bin-dir`` of ``aldaas restore-backup``).
    """
    if dump_major > server_major:
        raise ProviderError(
            f"backup {key!r} was dumped from PostgreSQL {dump_major}, newer than the "
            f"PostgreSQL {server_major} it would be restored into; set {bin_dir_setting} to "
            f"PostgreSQL {dump_major} or newer binaries (the embedded default is the newest)"
        )


_PSQL = ("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null")


def default_restore_command(fmt: BackupFormat | None) -> Command:
    """The restore step for a format: the backup on standard input, the database in PG* variables.

    ``.sql.gz`` keeps the original's ``gunzip -c | psql`` but with ``pipefail``
    and ``ON_ERROR_STOP`` so that a failure anywhere fails the restore.
    """
    if fmt is BackupFormat.CUSTOM:
        # "postgresql://" with nothing after it takes every part from the PG* variables.
        return Command(
            argv=(
                "pg_restore",
                "--no-owner",
                "--no-acl",
                "--exit-on-error",
                "--dbname",
                "postgresql://",
            )
        )
    if fmt is BackupFormat.SQL:
        return Command(argv=_PSQL)
    return Command(argv=("bash", "-o", "pipefail", "-c", "gunzip -c | " + " ".join(_PSQL)))


CHECK_SQL = (
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname NOT IN "
    "('pg_catalog', 'information_schema')) THEN RAISE EXCEPTION 'the restored database has no "
    "user tables'; END IF; END $$;"
)


def default_check_command() -> Command:
    """Fails unless the database answers and holds at least one user table."""
    return Command(argv=("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", CHECK_SQL))
