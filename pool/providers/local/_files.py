"""The local provider's files: atomic JSON records, sealing a tree read-only, deleting one, and
the data folder's lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import secrets
import shutil
import stat

from ..._provider import ProviderError
from . import _postgres as pg

LOCK_FILE = "broker.lock"
"""In the data folder: ``flock``-ed by the broker serving from it, and holding its pid."""


class DataFolderLock:
    """A broker's claim on a local data folder, held until :meth:`release` or the process
    dies (the kernel drops it then, so a broker killed with -9 never blocks the next one).

    A second broker on the same folder would sweep the first one's half-made folders away
    and adopt its leases; this makes it refuse to start instead.
    """

    def __init__(self, folder: pathlib.Path) -> None:
        folder = folder.absolute()
        path = folder / LOCK_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ProviderError(
                f"cannot create the lock file {path} ({exc.strerror}); fix the data folder's "
                "permissions or set local.data_dir to a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ProviderError(
                f"another aldaas broker (pid {holder}) is using the data folder {folder}; "
                "stop it first, or give this one its own local.data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_private(path: pathlib.Path, data: bytes, owner: pg.RunUser | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
    finally:
        os.close(fd)


def write_json(path: pathlib.Path, value: object, *, durable: bool = True) -> None:
    """Write ``value`` as JSON atomically: temp file (0600), rename over the old one.

    ``durable`` adds an fsync of the file and of the folder, so the write also
    survives a power cut (the rename alone survives a ``kill -9``).
    """
    data = json.dumps(value, sort_keys=True, indent=1).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_meta(folder: pathlib.Path, meta: dict[str, str], *, durable: bool = True) -> None:
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ProviderError(
                f"meta must map strings to strings, got {key!r}: {value!r}; "
                "convert the value to str"
            )
    record = {"meta": meta, "version": secrets.token_hex(8)}
    write_json(folder / "meta.json", record, durable=durable)


def read_json(path: pathlib.Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_meta(folder: pathlib.Path) -> tuple[dict[str, str], str]:
    raw = read_json(folder / "meta.json")
    meta = raw.get("meta")
    version = raw.get("version")
    if not isinstance(meta, dict):
        return {}, ""
    return {str(k): str(v) for k, v in meta.items()}, str(version or "")


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_files(pgdata: pathlib.Path) -> int:
    """Make the tree read-only (files 0400, folders 0500) and return its size."""
    size = 0
    for dirpath, _dirnames, filenames in os.walk(pgdata):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            st = os.lstat(path)
            size += st.st_size
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o400)
    for dirpath, _dirnames, _filenames in os.walk(pgdata, topdown=False):
        os.chmod(dirpath, 0o500)
    return size


def rmtree(path: pathlib.Path) -> None:
    """Delete a tree even where sealing made folders read-only (non-root needs write bits)."""

    def make_writable(_func: object, failed: str, _exc: object) -> None:
        parent = os.path.dirname(failed)
        os.chmod(parent, 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
            shutil.rmtree(failed, ignore_errors=True)
        else:
            os.unlink(failed)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=make_writable)


def os_error(what: str, exc: OSError, root: pathlib.Path) -> ProviderError:
    if pg.disk_full(exc):
        return ProviderError(
            f"{what} failed because the disk holding {root} is full ({exc.strerror}); "
            "free space or move local.data_dir"
        )
    return ProviderError(
        f"{what} failed: {exc.strerror} ({exc.filename}); check the data folder's permissions"
    )
