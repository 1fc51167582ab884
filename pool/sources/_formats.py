"""Backup formats: what a key's suffix promises, what its first bytes must be, the default commands.

Pure functions, no I/O: the provider peeks at a backup's first chunk and
calls :func:`check_header` before it runs a restore, so that a file that is
not what its name says fails with a clear sentence instead of a psql error
three screens later.
"""

from __future__ import annotations

import enum
import zlib

from .._provider import Command, ProviderError

GZIP_MAGIC = b"\x1f\x8b"
CUSTOM_MAGIC = b"PGDMP"


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
