"""Backups from a local folder: every file under it whose name ends with the suffix."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
from collections.abc import AsyncIterator, Sequence

import trio

from .._provider import Backup, ProviderError, Source, TemporaryProviderError
from ._settings import DirectorySettings

CHUNK_BYTES = 1024 * 1024


def _etag(size: int, mtime_ns: int) -> str:
    """Changes whenever a file is rewritten (size or modification time), without reading it."""
    return hashlib.sha256(f"{size}:{mtime_ns}".encode()).hexdigest()[:20]


class DirectorySource:
    """A :class:`~pool.Source` over ``settings.path`` (recursive; keys are relative paths)."""

    def __init__(self, settings: DirectorySettings) -> None:
        self._root = settings.path.absolute()
        self._suffix = settings.suffix

    def __repr__(self) -> str:
        return f"DirectorySource(path={str(self._root)!r}, suffix={self._suffix!r})"

    @property
    def description(self) -> str:
        return f"{self._root}/*{self._suffix}"

    async def list_backups(self) -> Sequence[Backup]:
        return await trio.to_thread.run_sync(self._scan)

    def _scan(self) -> list[Backup]:
        if not self._root.is_dir():
            raise ProviderError(
                f"the backup folder {self._root} does not exist; create it or fix "
                "the directory source's path"
            )
        found: list[Backup] = []

        def walk_error(exc: OSError) -> None:
            raise ProviderError(
                f"cannot read the backup folder {exc.filename} ({exc.strerror}); "
                "give the broker read access to it"
            )

        for dirpath, dirnames, filenames in os.walk(self._root, onerror=walk_error):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.endswith(self._suffix):
                    continue
                path = pathlib.Path(dirpath, filename)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # deleted while we looked
                if not path.is_file():
                    continue
                found.append(
                    Backup(
                        key=path.relative_to(self._root).as_posix(),
                        etag=_etag(st.st_size, st.st_mtime_ns),
                        size=st.st_size,
                        modified=st.st_mtime,
                    )
                )
        return found

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        """Stream the file in 1 MiB reads; fail if it is gone, unreadable or changed.

        A changed file fails rather than mixing two versions of a backup.
        """
        key = backup.key
        pure = pathlib.PurePosixPath(key)
        # Keys are untrusted: an absolute key would make ``root / key`` that path itself.
        if not key or "\x00" in key or pure.is_absolute() or ".." in pure.parts:
            raise ProviderError(
                f"backup key {_shown(key)!r} leaves the backup folder (absolute, '..' or NUL); refusing it"
            )
        path = self._root / pure
        try:
            f = await trio.open_file(path, "rb")
        except OSError as exc:
            raise _read_error(backup.key, path, exc) from None
        async with f:
            st = os.fstat(f.fileno())
            if _etag(st.st_size, st.st_mtime_ns) != backup.etag:
                raise TemporaryProviderError(
                    f"backup {backup.key!r} changed after it was listed; "
                    "it will be picked up again at the next poll"
                )
            while True:
                try:
                    chunk = await f.read(CHUNK_BYTES)
                except OSError as exc:
                    raise _read_error(backup.key, path, exc) from None
                if not chunk:
                    return
                yield chunk


def _shown(text: str) -> str:
    """A key or path for a message: untrusted, so at most 120 characters of it."""
    return text if len(text) <= 120 else text[:120] + "…"


def _read_error(key: str, path: pathlib.Path, exc: OSError) -> ProviderError:
    if exc.errno == errno.ENOENT:
        return TemporaryProviderError(
            f"backup {_shown(key)!r} disappeared from {_shown(str(path.parent))}; "
            "it will be skipped"
        )
    return ProviderError(
        f"cannot read backup {_shown(key)!r} at {_shown(str(path))} ({exc.strerror}); "
        "give the broker read access to it"
    )


def _implements_source(source: DirectorySource) -> Source:
    return source  # mypy proves DirectorySource satisfies the Source protocol
