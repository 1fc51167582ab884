"""The directory backup source on a real folder."""

from __future__ import annotations

import os
import pathlib

import pytest

from aldaas.pool import (
    Backup,
    DirectorySettings,
    DirectorySource,
    ProviderError,
    TemporaryProviderError,
)


def _source(path: pathlib.Path, suffix: str = ".sql.gz") -> DirectorySource:
    return DirectorySource(DirectorySettings(path=path, suffix=suffix))


async def test_if_files_match_the_suffix_then_they_are_listed_with_relative_keys(
    tmp_path: pathlib.Path,
) -> None:
    """If backups sit in the folder and below it, then each is listed by relative key and size."""
    (tmp_path / "nested").mkdir()
    (tmp_path / "a.sql.gz").write_bytes(b"x" * 3)
    (tmp_path / "nested" / "b.sql.gz").write_bytes(b"y" * 5)
    (tmp_path / "notes.txt").write_bytes(b"z")
    (tmp_path / ".partial.sql.gz").write_bytes(b"uploading")
    backups = await _source(tmp_path).list_backups()
    assert sorted((b.key, b.size) for b in backups) == [("a.sql.gz", 3), ("nested/b.sql.gz", 5)]


async def test_if_a_file_is_rewritten_then_its_etag_changes(tmp_path: pathlib.Path) -> None:
    """If a backup's content (size or mtime) changes, then its ETag changes; untouched, it stays."""
    path = tmp_path / "a.sql.gz"
    path.write_bytes(b"one")
    source = _source(tmp_path)
    (first,) = await source.list_backups()
    (again,) = await source.list_backups()
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    (touched,) = await source.list_backups()
    assert first.etag == again.etag
    assert touched.etag != first.etag


async def test_if_the_folder_is_missing_then_the_error_names_it(tmp_path: pathlib.Path) -> None:
    """If the backup folder does not exist, then listing fails with its path and what to do."""
    missing = tmp_path / "nowhere"
    with pytest.raises(ProviderError, match=f"the backup folder {missing} does not exist"):
        await _source(missing).list_backups()


async def test_if_a_backup_is_opened_then_it_streams_in_chunks(tmp_path: pathlib.Path) -> None:
    """If a 2.5 MiB backup is opened, then it arrives whole in 1 MiB chunks."""
    data = os.urandom(5 << 19)
    (tmp_path / "big.sql.gz").write_bytes(data)
    source = _source(tmp_path)
    (backup,) = await source.list_backups()
    chunks = [chunk async for chunk in source.open(backup)]
    assert [len(c) for c in chunks] == [1 << 20, 1 << 20, 1 << 19]
    assert b"".join(chunks) == data


async def test_if_a_backup_changed_after_listing_then_opening_it_fails(
    tmp_path: pathlib.Path,
) -> None:
    """If a file is rewritten between list and open, then open refuses it as a temporary error."""
    path = tmp_path / "a.sql.gz"
    path.write_bytes(b"old")
    source = _source(tmp_path)
    (backup,) = await source.list_backups()
    path.write_bytes(b"newer")
    with pytest.raises(TemporaryProviderError, match="changed after it was listed"):
        async for _ in source.open(backup):
            pass


async def test_if_a_backup_cannot_be_read_then_the_error_names_the_file(
    tmp_path: pathlib.Path,
) -> None:
    """If the key is not a readable file (here a folder), then open names it and the fix."""
    (tmp_path / "odd.sql.gz").mkdir()
    backup = Backup(key="odd.sql.gz", etag="x", size=0, modified=0.0)
    with pytest.raises(ProviderError, match=r"cannot read backup 'odd.sql.gz' at .*odd.sql.gz"):
        async for _ in _source(tmp_path).open(backup):
            pass


async def test_if_a_key_climbs_out_of_the_folder_then_it_is_refused(tmp_path: pathlib.Path) -> None:
    """If a key contains '..', then open refuses it instead of reading outside the folder."""
    backup = Backup(key="../etc/passwd.sql.gz", etag="x", size=0, modified=0.0)
    with pytest.raises(ProviderError, match="leaves the backup folder"):
        async for _ in _source(tmp_path).open(backup):
            pass
