"""What a backup's suffix promises, and the checks that hold it to that promise."""

from __future__ import annotations

import gzip

import pytest

from aldaas.pool import BackupFormat, ProviderError, default_restore_command, format_of
from aldaas.pool.sources._formats import GzipValidator, check_header


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("db/2024-01-01.sql.gz", BackupFormat.SQL_GZ),
        ("dump.SQL", BackupFormat.SQL),
        ("nightly.dump", BackupFormat.CUSTOM),
        ("notes.txt", None),
    ],
)
def test_if_a_key_has_a_known_suffix_then_its_format_follows(
    key: str, expected: BackupFormat | None
) -> None:
    """If a key ends with .sql.gz, .sql or .dump, then that decides its format; else None."""
    assert format_of(key) is expected


@pytest.mark.parametrize(
    ("key", "head", "complaint"),
    [
        ("a.sql.gz", b"CREATE TABLE", "is not gzip data"),
        ("a.dump", b"\x1f\x8b\x08\x00", "is not a pg_dump custom-format archive"),
        ("a.sql", b"PGDMP\x01\x0e", "is binary data, not a plain SQL script"),
        ("a.sql", b"", "is empty"),
    ],
)
def test_if_the_first_bytes_contradict_the_suffix_then_the_error_says_what_it_is(
    key: str, head: bytes, complaint: str
) -> None:
    """If a backup's first bytes are not what its suffix says, then one sentence says so."""
    with pytest.raises(ProviderError, match=complaint) as caught:
        check_header(key, head)
    assert repr(key) in str(caught.value)


@pytest.mark.parametrize(
    ("key", "head"),
    [("a.sql.gz", b"\x1f\x8b\x08"), ("a.dump", b"PGDMP\x01"), ("a.sql", b"--\n"), ("x", b"?")],
)
def test_if_the_first_bytes_match_the_suffix_then_the_check_passes(key: str, head: bytes) -> None:
    """If the first bytes match the suffix (or the suffix promises nothing), then no error."""
    check_header(key, head)


def test_if_a_gzip_stream_is_whole_then_the_validator_accepts_it_in_any_chunking() -> None:
    """If an intact (even multi-member) gzip arrives one byte at a time, then it validates."""
    data = gzip.compress(b"SELECT 1;\n" * 1000) + gzip.compress(b"SELECT 2;\n")
    validator = GzipValidator("a.sql.gz")
    for i in range(len(data)):
        validator.feed(data[i : i + 1])
    validator.finish()


def test_if_a_gzip_stream_is_cut_short_then_finish_says_truncated() -> None:
    """If a gzip stream ends mid-member, then finish() raises 'truncated'."""
    data = gzip.compress(b"SELECT 1;\n" * 1000)
    validator = GzipValidator("a.sql.gz")
    validator.feed(data[: len(data) - 10])
    with pytest.raises(ProviderError, match="is truncated gzip data"):
        validator.finish()


def test_if_gzip_bytes_are_damaged_then_feed_says_corrupt() -> None:
    """If bytes inside the deflate stream are garbage, then feed() raises 'corrupt'."""
    data = bytearray(gzip.compress(bytes(range(256)) * 400))
    data[20:60] = b"\xff" * 40
    validator = GzipValidator("a.sql.gz")
    with pytest.raises(ProviderError, match="is corrupt gzip data"):
        validator.feed(bytes(data))


def test_if_a_tiny_gzip_inflates_hugely_then_it_still_validates() -> None:
    """If 16 KiB inflate to 16 MiB, then it validates (output is produced in bounded steps)."""
    bomb = gzip.compress(b"\0" * (16 << 20))
    validator = GzipValidator("bomb.sql.gz")
    validator.feed(bomb)
    validator.finish()


def test_if_the_format_is_gzip_then_the_default_restore_fails_on_any_pipe_stage() -> None:
    """If no restore command is configured for .sql.gz, then it is gunzip | psql under pipefail."""
    argv = tuple(default_restore_command(BackupFormat.SQL_GZ).argv)
    assert argv[:3] == ("bash", "-o", "pipefail")
    assert "ON_ERROR_STOP=1" in argv[-1]
