"""Helpers shared by the reliability tests that run real PostgreSQL (imported as a module)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence

import attrs
import pytest
import trio

from aldaas.pool import (
    DirectorySettings,
    DirectorySource,
    LocalProvider,
    LocalSettings,
    Observer,
    Pool,
    PoolSettings,
    SourceSettings,
    WarmPoolSettings,
)


def rows_sql(rows: int, table: str = "items") -> bytes:
    """A plain SQL dump: one table of ``rows`` rows of pseudo-random text (~45 bytes a row)."""
    rng = random.Random(7)
    lines = [f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL);\n".encode()]
    lines.append(f"COPY {table} (id, name) FROM stdin;\n".encode())
    lines.extend(b"%d\t%032x\n" % (i, rng.getrandbits(128)) for i in range(rows))
    lines.append(b"\\.\n")
    return b"".join(lines)


def local_pool(
    data_dir: pathlib.Path,
    backups: pathlib.Path,
    warm: WarmPoolSettings,
    observers: Sequence[Observer] = (),
) -> tuple[Pool, LocalProvider]:
    """A pool on the local provider in ``data_dir`` over the ``.sql`` backups in ``backups``
    (not polled again during a test), and that provider."""
    local = LocalSettings(data_dir=data_dir)
    settings = attrs.evolve(
        PoolSettings(), pool=warm, source=SourceSettings(poll_interval=3600.0), local=local
    )
    provider = LocalProvider(local)
    source = DirectorySource(DirectorySettings(path=backups, suffix=".sql"))
    return Pool(settings, provider, source, observers=observers), provider


async def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Poll real processes' state every 50 ms; fail naming ``what`` after ``seconds``."""
    with trio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling real processes' state
            await trio.sleep(0.05)
        return
    raise AssertionError(f"gave up after {seconds} s waiting for {what}")


def kill_postmasters(root: pathlib.Path) -> None:
    """Kill every PostgreSQL serving a data directory under ``root`` (test leftovers)."""
    for pidfile in root.glob("**/pgdata/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            if os.readlink(f"/proc/{pid}/cwd") == str(pidfile.parent.resolve()):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def free_bytes(path: pathlib.Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def used_bytes(path: pathlib.Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


@contextlib.contextmanager
def small_disk(megabytes: int) -> Iterator[pathlib.Path]:
    """A fresh tmpfs of ``megabytes`` (0711, reachable by PostgreSQL's run user), unmounted after.

    Skips the test, saying why, when the tests do not run as root or the
    kernel refuses the mount (containers without CAP_SYS_ADMIN).
    """
    if os.geteuid() != 0:
        pytest.skip("a small disk needs root to mount a tmpfs; run the tests as root")
    mount = shutil.which("mount") or "/bin/mount"
    point = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-small-disk-", dir="/tmp"))
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={megabytes}M,mode=0711", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        point.rmdir()
        pytest.skip(f"cannot mount a {megabytes} MB tmpfs here: {result.stderr.strip()}")
    try:
        yield point
    finally:
        kill_postmasters(point)
        subprocess.run(["umount", "-l", str(point)], check=False)
        with contextlib.suppress(OSError):
            point.rmdir()


def fill(path: pathlib.Path, leave_free: int) -> pathlib.Path:
    """Take the disk's free space down to about ``leave_free`` bytes with one filler file."""
    filler = path / "filler"
    with contextlib.suppress(FileNotFoundError):
        filler.unlink()
    size = free_bytes(path) - leave_free
    with open(filler, "wb") as f:
        if size > 0:
            os.posix_fallocate(f.fileno(), 0, size)
    return filler
