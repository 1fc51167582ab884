"""``aldaas fetch-backup``: stream one S3 object to a file, for the Kubernetes restore Job.

The Kubernetes provider runs this in an init container of the broker's own
image; the restore command then reads the file. Contract (docs/broker.md):
stdout carries only ``progress DONE TOTAL`` lines (integer bytes, at most one
per second and one at the end), the object is written to ``PATH.part``,
fsynced and renamed to ``PATH``; a failure is one sentence on stderr naming
the key and the cause, and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
from collections.abc import Callable
from typing import TextIO

import attrs
import trio

from aldaas import pool


class FetchError(Exception):
    """The backup could not be fetched; ``str()`` is one sentence."""


async def fetch_backup(
    settings: pool.S3Settings,
    key: str,
    to: pathlib.Path,
    *,
    out: TextIO,
    size: int | None = None,
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Stream ``key`` to ``to``; returns the bytes written. Raises :class:`FetchError`."""
    etag = ""
    try:
        if size is None:
            # Listing with the key itself as prefix finds just this object, not the whole bucket.
            exact = attrs.evolve(settings, prefix=key, suffix="")
            found = [b for b in await pool.S3Source(exact).list_backups() if b.key == key]
            if not found:
                raise FetchError(
                    f"The backup {key!r} is not in bucket {settings.bucket!r}; "
                    "check the key and s3.bucket."
                )
            size, etag = found[0].size, found[0].etag
        backup = pool.Backup(key=key, etag=etag, size=size, modified=0.0)
        part = to.with_name(to.name + ".part")
        done = 0
        last = clock()
        try:
            with part.open("wb") as f:
                async for chunk in pool.S3Source(settings).open(backup):
                    await trio.to_thread.run_sync(f.write, chunk)
                    done += len(chunk)
                    if clock() - last >= interval:
                        last = clock()
                        print(f"progress {done} {size}", file=out, flush=True)
                await trio.to_thread.run_sync(f.flush)
                await trio.to_thread.run_sync(os.fsync, f.fileno())
            part.replace(to)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
    except pool.ProviderError as exc:
        text = str(exc).rstrip(".")
        raise FetchError(f"Fetching backup {key!r} failed: {text}.") from None
    except OSError as exc:
        raise FetchError(
            f"Fetching backup {key!r} to {str(to)!r} failed ({exc.strerror or exc}); "
            "check the path and free space."
        ) from None
    print(f"progress {done} {size}", file=out, flush=True)
    return done
