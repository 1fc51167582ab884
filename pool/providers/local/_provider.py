"""The local provider: a folder of PostgreSQL data directories, one postgres per database.

This module implements the :class:`Provider` protocol over them; :mod:`._files`
writes and reads their files and :mod:`._servers` runs their servers.

Layout (see docs/local-provider.md)::

    <data_dir>/volumes/<name>/    a database being restored (running)
    <data_dir>/snapshots/<name>/  a sealed, read-only copy (never running)
    <data_dir>/clones/<name>/     a running copy of a snapshot

Each of those folders holds ``meta.json`` (the pool's flat metadata and its
version, written atomically), ``state.json`` (the provider's own facts:
credentials, clone method, size), ``postgres.log`` and ``pgdata/``. Folders
being made are named ``.partial-<name>`` and folders being deleted
``.trash-<name>-<random>``; both are swept away when the provider starts, so
a crash never leaves something that ``list()`` reports.

Servers run in their own session, detached from the broker: a broker that
dies (even ``kill -9``) leaves them serving, and the next broker finds them
through ``postmaster.pid`` and adopts them.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import structlog
import trio

from ... import _roles as roles
from ..._provider import (
    Backup,
    Command,
    ConflictError,
    Endpoint,
    Kind,
    Liveness,
    NotFoundError,
    ProgressCallback,
    Provider,
    ProviderError,
    Resource,
    RestoreProgress,
    Source,
)
from ...sources._formats import BackupFormat, GzipValidator, check_header, format_of
from . import _files
from . import _postgres as pg
from ._restore import LocalRestore
from ._restore import describe as describe_restore
from ._servers import KIND_DIRS, CloneMethod, Servers, Setup, failure
from ._settings import LocalSettings

logger = structlog.get_logger()

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_HEADER_BYTES = 16


class LocalProvider:
    """Volumes, snapshots and clones as folders under ``settings.data_dir`` (see the module doc)."""

    def __init__(self, settings: LocalSettings, *, lease_superuser: bool = False) -> None:
        """``lease_superuser`` (setting ``lease.superuser``) makes every clone's login a superuser."""
        self._settings = settings
        self._root = settings.data_dir.absolute()
        self._servers = Servers(settings, self._root, lease_superuser=lease_superuser)
        self._setup_lock = trio.Lock()
        self._setup: Setup | None = None
        self._reflink: bool | None = None
        self._locks: dict[pathlib.Path, trio.Lock] = {}
        self._postmasters: dict[str, tuple[int, bytes]] = {}
        """Clone name → (pid, start time) of the postmaster :meth:`alive` last found running."""

    def __repr__(self) -> str:
        return f"LocalProvider(data_dir={str(self._root)!r})"

    @property
    def name(self) -> str:
        return "local"

    @property
    def data_dir(self) -> pathlib.Path:
        return self._root

    async def bin_dir(self) -> pathlib.Path:
        """The PostgreSQL bin folder in use (embedded, configured, or the run user's private copy)."""
        return (await self._ready()).bin_dir

    # ------------------------------------------------------------------ setup

    async def _ready(self) -> Setup:
        if self._setup is not None:
            return self._setup
        async with self._setup_lock:
            if self._setup is None:
                self._setup = await self._servers.prepare()
        return self._setup

    # ------------------------------------------------------------- helpers

    def _dir(self, kind: Kind, name: str) -> pathlib.Path:
        if not _NAME.fullmatch(name):
            raise ProviderError(
                f"{kind.value} name {name!r} is not allowed; use letters, digits, '.', '_' "
                "and '-', starting with a letter or digit"
            )
        return self._root / KIND_DIRS[kind] / name

    def _lock(self, path: pathlib.Path) -> trio.Lock:
        return self._locks.setdefault(path, trio.Lock())

    # ------------------------------------------------------------ Provider

    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        """initdb a fresh data directory (the admin, TCP only) and start it for a restore.

        The cluster's bootstrap superuser is the admin (:data:`pool._roles.ADMIN`)
        with a random password (or ``local.password``); the lease login is made by
        the seal step after the restore. The returned endpoint is the admin's.
        """
        setup = await self._ready()
        folder = self._dir(Kind.VOLUME, name)
        async with self._lock(folder):
            if folder.is_dir():
                endpoint = self._servers.endpoint(folder, admin=True)
                if endpoint is None:
                    await self._servers.start(setup, folder, f"volume {name!r}", durable=False)
                    endpoint = self._servers.require_endpoint(Kind.VOLUME, name, folder, admin=True)
                return endpoint
            partial = folder.with_name(".partial-" + name)
            password = self._settings.password or roles.new_password()
            try:
                self._servers.make_folder(partial, setup)
                pwfile = partial / "pwfile"
                _files.write_private(pwfile, password.encode(), setup.run_user)
                await self._servers.run(
                    setup,
                    [
                        str(setup.bin_dir / "initdb"),
                        "--pgdata",
                        str(partial / "pgdata"),
                        "--username",
                        roles.ADMIN,
                        "--pwfile",
                        str(pwfile),
                        "--auth",
                        "scram-sha-256",
                        "--encoding",
                        "UTF8",
                        "--locale",
                        "C",
                        "--no-sync",
                        # 1 MB WAL segments instead of 16: a fresh snapshot is 15 MB smaller
                        # and every plain-copy clone copies that much less.
                        "--wal-segsize",
                        "1",
                    ],
                    f"initdb for volume {name!r}",
                    partial,
                )
                pwfile.unlink()
                # No Unix socket is opened, so TCP with a password is the only way in,
                # and the admin's only from loopback.
                _files.write_private(
                    partial / "pgdata" / "pg_hba.conf", roles.hba_conf(), setup.run_user
                )
                _files.write_json(
                    partial / "state.json",
                    {
                        "admin_user": roles.ADMIN,
                        "admin_password": password,
                        "user": self._settings.user,
                        "database": self._settings.restore_database,
                        "major": setup.major,
                    },
                )
                _files.write_meta(partial, dict(meta))
                os.rename(partial, folder)
                _files.fsync_dir(folder.parent)
            except OSError as exc:
                _files.rmtree(partial)
                raise _files.os_error(f"creating volume {name!r}", exc, self._root) from None
            except BaseException:
                _files.rmtree(partial)
                raise
            try:
                await self._servers.start(setup, folder, f"volume {name!r}", durable=False)
                endpoint = self._servers.require_endpoint(Kind.VOLUME, name, folder, admin=True)
                if endpoint.database != "postgres":
                    await self._servers.create_database(setup, endpoint, folder)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._servers.stop(folder)
                    await trio.to_thread.run_sync(_files.rmtree, folder)
                raise
            logger.info("volume created", volume=name, port=endpoint.port)
            return endpoint

    async def restore(
        self,
        name: str,
        backup: Backup,
        source: Source,
        command: Command,
        progress: ProgressCallback,
    ) -> Mapping[str, str]:
        """Restore ``backup`` into volume ``name`` as the admin, then run the role seal step.

        The built-in restore (``command.builtin``) reads the format from the
        backup's bytes; otherwise ``command`` gets the backup on stdin. Returns
        the snapshot meta the restore adds (format, database, what it tolerated).
        """
        setup = await self._ready()
        folder = self._dir(Kind.VOLUME, name)
        endpoint = self._servers.require_endpoint(Kind.VOLUME, name, folder, admin=True)
        started = time.monotonic()

        def report(done: int) -> None:
            progress(
                RestoreProgress(
                    done_bytes=done,
                    total_bytes=backup.size,
                    elapsed_seconds=time.monotonic() - started,
                )
            )

        extra: dict[str, str] = {}
        if command.builtin:
            restorer = LocalRestore(
                key=backup.key,
                endpoint=endpoint,
                named_database=self._settings.database,
                bin_dir=setup.bin_dir,
                run_user=setup.run_user,
                server_major=setup.major,
                folder=folder,
                timeout_seconds=command.timeout_seconds,
                on_bytes=report,
            )
            async with _closing(source.open(backup)) as iterator:
                outcome = await restorer.run(iterator)
            state = _files.read_json(folder / "state.json")
            state["database"] = outcome.database
            _files.write_json(folder / "state.json", state)
            extra = describe_restore(outcome)
        else:
            await self._restore_with(setup, folder, endpoint, backup, source, command, report)
        await self._servers.seal_roles(setup, folder, endpoint, what=f"volume {name!r}")
        logger.info(
            "restore finished",
            volume=name,
            backup=backup.key,
            bytes=backup.size,
            seconds=round(time.monotonic() - started, 3),
            **extra,
        )
        return extra

    async def _restore_with(
        self,
        setup: Setup,
        folder: pathlib.Path,
        endpoint: Endpoint,
        backup: Backup,
        source: Source,
        command: Command,
        report: Callable[[int], None],
    ) -> None:
        """Stream ``backup`` into a configured command's stdin once its first bytes match."""
        gzipped = format_of(backup.key) is BackupFormat.SQL_GZ
        validator = GzipValidator(backup.key) if gzipped else None
        async with _closing(source.open(backup)) as iterator:
            head = b""
            while len(head) < _HEADER_BYTES:
                try:
                    head += await anext(iterator)
                except StopAsyncIteration:
                    break
            check_header(backup.key, head)

            async def feed(stdin: trio.abc.SendStream) -> None:
                done = 0
                pending = head
                while True:
                    if pending:
                        if validator is not None:
                            await trio.to_thread.run_sync(validator.feed, pending)
                        await stdin.send_all(pending)
                        done += len(pending)
                        report(done)
                    try:
                        pending = await anext(iterator)
                    except StopAsyncIteration:
                        break
                if validator is not None:
                    validator.finish()

            env = {**command.env, **endpoint.environ()}
            what = f"restore of {backup.key!r} into volume {folder.name!r}"
            result = await pg.run_command(
                command.argv,
                env=pg.command_env(setup.bin_dir, env),
                run_user=setup.run_user,
                timeout_seconds=command.timeout_seconds,
                what=what,
                cwd=folder,
                feed=feed,
            )
        if result.returncode != 0:
            raise ProviderError(failure(what, result, self._root))

    async def seal(self, volume: str, snapshot: str, meta: Mapping[str, str]) -> Resource:
        """Fast-shutdown the volume's server, sync, make it read-only, move it into snapshots."""
        setup = await self._ready()
        folder = self._dir(Kind.VOLUME, volume)
        target = self._dir(Kind.SNAPSHOT, snapshot)
        async with self._lock(folder):
            if not folder.is_dir():
                if target.is_dir():
                    return self._resource(Kind.SNAPSHOT, snapshot, target)
                raise NotFoundError(f"volume {volume!r} does not exist in {self._root}")
            if target.exists():
                raise ConflictError(
                    f"snapshot {snapshot!r} already exists in {self._root}; seal under another name"
                )
            if not await self._servers.stop(folder):
                raise ProviderError(
                    f"the database of volume {volume!r} did not shut down within "
                    f"{self._settings.stop_timeout_seconds:g} s and was killed, so it was not "
                    "sealed "
                    f"(log: {pg.log_tail(folder / 'postgres.log')}); restore it again"
                )
            state_line = await self._servers.cluster_state(setup, folder)
            if state_line != "shut down":
                raise ProviderError(
                    f"the database of volume {volume!r} was not shut down cleanly (cluster state "
                    f"{state_line!r}), so it was not sealed; restore it again"
                )
            try:
                # The volume ran without fsync; a snapshot must survive a power cut.
                # syncfs (sync -f) flushes only the data folder's file system.
                synced = await trio.run_process(
                    ["sync", "-f", str(folder / "pgdata")], capture_stderr=True, check=False
                )
                if synced.returncode != 0:
                    raise ProviderError(
                        f"could not flush volume {volume!r} to disk before sealing it "
                        f"({pg.tail_text(synced.stderr)}); check the disk of {self._root}"
                    )
                size = await trio.to_thread.run_sync(_files.seal_files, folder / "pgdata")
                state = _files.read_json(folder / "state.json")
                state["size_bytes"] = size
                _files.write_json(folder / "state.json", state)
                _files.write_meta(folder, dict(meta))
                os.rename(folder, target)
                _files.fsync_dir(target.parent)
                _files.fsync_dir(folder.parent)
            except OSError as exc:
                raise _files.os_error(f"sealing volume {volume!r}", exc, self._root) from None
        logger.info("volume sealed", volume=volume, snapshot=snapshot, size_bytes=size)
        return self._resource(Kind.SNAPSHOT, snapshot, target)

    async def record_failed_snapshot(self, name: str, meta: Mapping[str, str]) -> Resource:
        """Make snapshot ``name`` as a folder holding only ``meta.json``: a failure's record."""
        setup = await self._ready()
        folder = self._dir(Kind.SNAPSHOT, name)
        async with self._lock(folder):
            if folder.is_dir():
                if (folder / "pgdata").exists():
                    raise ConflictError(
                        f"snapshot {name!r} already exists with data in {self._root}; "
                        "destroy it before recording a failure under its name"
                    )
                _files.write_meta(folder, dict(meta))
                return self._resource(Kind.SNAPSHOT, name, folder)
            partial = folder.with_name(".partial-" + name)
            try:
                self._servers.make_folder(partial, setup)
                _files.write_json(partial / "state.json", {"record_only": True})
                _files.write_meta(partial, dict(meta))
                os.rename(partial, folder)
                _files.fsync_dir(folder.parent)
            except OSError as exc:
                _files.rmtree(partial)
                raise _files.os_error(
                    f"recording failed snapshot {name!r}", exc, self._root
                ) from None
            return self._resource(Kind.SNAPSHOT, name, folder)

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        """Copy the snapshot (reflink if possible), start a server on it, wait until it accepts."""
        setup = await self._ready()
        source = self._dir(Kind.SNAPSHOT, snapshot)
        folder = self._dir(Kind.CLONE, name)
        async with self._lock(folder):
            if folder.is_dir():
                endpoint = self._servers.endpoint(folder)
                if endpoint is None:
                    if pg.running_postmaster(folder / "pgdata") is None:
                        await self._start_clone(setup, folder, name)
                    if self._servers.endpoint(folder) is None:  # started, but no login yet
                        await self._servers.set_login(setup, folder, name)
                    endpoint = self._servers.require_endpoint(Kind.CLONE, name, folder)
                return endpoint
            if not source.is_dir():
                raise NotFoundError(f"snapshot {snapshot!r} does not exist in {self._root}")
            if not (source / "pgdata").is_dir():
                raise ProviderError(
                    f"snapshot {snapshot!r} holds no data (it records a failed restore); "
                    "clone a ready snapshot instead"
                )
            state = _files.read_json(source / "state.json")
            if state.get("major", setup.major) != setup.major:
                raise ProviderError(
                    f"snapshot {snapshot!r} was made by PostgreSQL {state['major']} but "
                    f"local.bin_dir runs {setup.major}; point local.bin_dir at version "
                    f"{state['major']} or restore the backup again"
                )
            method = await self._clone_method()
            partial = folder.with_name(".partial-" + name)
            try:
                self._servers.make_folder(partial, setup)
                await self._servers.copy(
                    setup, source / "pgdata", partial / "pgdata", method, snapshot
                )
                state.update(snapshot=snapshot, clone_method=method)
                _files.write_json(partial / "state.json", state, durable=False)
                _files.write_meta(partial, dict(meta), durable=False)
                os.rename(partial, folder)
            except OSError as exc:
                _files.rmtree(partial)
                raise _files.os_error(f"cloning snapshot {snapshot!r}", exc, self._root) from None
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_files.rmtree, partial)
                raise
            try:
                await self._start_clone(setup, folder, name)
                await self._servers.set_login(setup, folder, name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._servers.stop(folder)
                    await trio.to_thread.run_sync(_files.rmtree, folder)
                raise
            endpoint = self._servers.require_endpoint(Kind.CLONE, name, folder)
        logger.info(
            "clone started", clone=name, snapshot=snapshot, method=method, port=endpoint.port
        )
        return endpoint

    async def _start_clone(self, setup: Setup, folder: pathlib.Path, name: str) -> None:
        await self._servers.start(
            setup, folder, f"clone {name!r}", durable=self._settings.clone_fsync
        )
        self.alive(name)  # note the postmaster now, so a hand-out's check is one /proc read

    async def probe_clone_method(self) -> CloneMethod:
        """How new clones will be made here (probing reflink support once per data folder)."""
        await self._ready()
        return await self._clone_method()

    async def _clone_method(self) -> CloneMethod:
        wanted = self._settings.clone_method
        if wanted == "copy":
            return "copy"
        if self._reflink is None:
            self._reflink = await self._probe_reflink()
            logger.info("reflink probe", data_dir=str(self._root), supported=self._reflink)
        if self._reflink:
            return "reflink"
        if wanted == "reflink":
            raise ProviderError(
                f"local.clone_method is 'reflink' but the file system of {self._root} cannot "
                "reflink (XFS made with -m reflink=1 and btrfs can); move local.data_dir there "
                "or set local.clone_method to auto"
            )
        return "copy"

    async def _probe_reflink(self) -> bool:
        """Whether ``cp --reflink=always`` works inside the data folder (one tiny file, once)."""
        probe = self._root / f".probe-{secrets.token_hex(4)}"
        try:
            probe.mkdir(mode=0o700)
            (probe / "a").write_bytes(b"aldaas reflink probe\n" * 256)
            result = await trio.run_process(
                ["cp", "--reflink=always", str(probe / "a"), str(probe / "b")],
                capture_stderr=True,
                check=False,
            )
            return result.returncode == 0
        finally:
            _files.rmtree(probe)

    async def check(self, name: str, command: Command) -> None:
        """Run ``command`` with the clone's (or volume's) admin PG* variables; fail on non-zero exit."""
        setup = await self._ready()
        kind = Kind.CLONE
        folder = self._dir(Kind.CLONE, name)
        if not folder.is_dir() and self._dir(Kind.VOLUME, name).is_dir():
            kind, folder = Kind.VOLUME, self._dir(Kind.VOLUME, name)
        endpoint = self._servers.require_endpoint(kind, name, folder, admin=True)
        what = f"check of {kind.value} {name!r}"
        result = await pg.run_command(
            command.argv,
            env=pg.command_env(setup.bin_dir, {**command.env, **endpoint.environ()}),
            run_user=setup.run_user,
            timeout_seconds=command.timeout_seconds,
            what=what,
            cwd=folder,
        )
        if result.returncode != 0:
            raise ProviderError(failure(what, result, self._root))

    async def is_healthy(self, name: str) -> bool:
        """Whether clone ``name``'s server is alive and answers a startup packet."""
        await self._ready()
        folder = self._dir(Kind.CLONE, name)
        endpoint = self._servers.endpoint(folder)
        if endpoint is None:
            return False
        return await pg.accepts_connections(
            endpoint.host, endpoint.port, endpoint.user, endpoint.database
        )

    def alive(self, name: str) -> bool:
        """Whether clone ``name``'s postmaster runs: ``postmaster.pid`` and ``/proc``, no connection.

        The pool asks it at every hand-out (:class:`pool.Liveness`): once a
        postmaster was seen, one read of ``/proc/<pid>/stat`` (its pid and start
        time, which a reused pid cannot match) answers. A server that runs but
        does not answer is left to :meth:`is_healthy`.
        """
        known = self._postmasters.get(name)
        if known is not None and pg.process_identity(known[0]) == known[1]:
            return True  # the same process as last time still runs: one read of /proc
        self._postmasters.pop(name, None)
        try:
            folder = self._dir(Kind.CLONE, name)
        except ProviderError:
            return False
        info = pg.running_postmaster(folder / "pgdata")
        if info is None:
            return False
        identity = pg.process_identity(info.pid)
        if identity is not None:
            self._postmasters[name] = (info.pid, identity)
        return identity is not None

    async def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, expect_version: str | None = None
    ) -> Resource:
        """Replace ``meta.json`` atomically; with ``expect_version`` only if nobody changed it."""
        await self._ready()
        folder = self._dir(kind, name)
        async with self._lock(folder):
            if not folder.is_dir():
                raise NotFoundError(f"{kind.value} {name!r} does not exist in {self._root}")
            if expect_version is not None:
                _, version = _files.read_meta(folder)
                if version != expect_version:
                    raise ConflictError(
                        f"{kind.value} {name!r} changed since version {expect_version!r} "
                        f"(now {version!r}); read it again and retry"
                    )
            try:
                if kind is Kind.CLONE:
                    # A power cut ends every clone's server, so their meta needs no fsync;
                    # the atomic rename is enough for a broker crash, and claims stay fast.
                    _files.write_meta(folder, dict(meta), durable=False)
                else:
                    await trio.to_thread.run_sync(_files.write_meta, folder, dict(meta))
            except OSError as exc:
                raise _files.os_error(
                    f"writing meta of {kind.value} {name!r}", exc, self._root
                ) from None
            return self._resource(kind, name, folder)

    async def destroy(self, kind: Kind, name: str) -> None:
        """Stop the server (fast, then kill) and delete the folder; a missing one is fine."""
        await self._ready()
        folder = self._dir(kind, name)
        async with self._lock(folder):
            if not folder.is_dir():
                return
            if kind is not Kind.SNAPSHOT:
                await self._servers.stop(folder)
            trash = folder.with_name(f".trash-{name}-{secrets.token_hex(4)}")
            os.rename(folder, trash)
            await trio.to_thread.run_sync(_files.rmtree, trash)
        self._locks.pop(folder, None)
        self._postmasters.pop(name, None)
        logger.info("destroyed", kind=kind.value, name=name)

    async def list(self, kind: Kind | None = None) -> Sequence[Resource]:
        """Every volume/snapshot/clone folder with its meta, and endpoints of those running now."""
        await self._ready()
        kinds = [kind] if kind is not None else list(Kind)
        found: list[Resource] = []
        for each in kinds:
            parent = self._root / KIND_DIRS[each]
            for entry in sorted(parent.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                found.append(self._resource(each, entry.name, entry))
        return found

    def _resource(self, kind: Kind, name: str, folder: pathlib.Path) -> Resource:
        meta, version = _files.read_meta(folder)
        state = _files.read_json(folder / "state.json")
        size = state.get("size_bytes")
        return Resource(
            kind=kind,
            name=name,
            meta=meta,
            version=version,
            endpoint=None
            if kind is Kind.SNAPSHOT
            else self._servers.endpoint(folder, admin=kind is Kind.VOLUME),
            size_bytes=size if isinstance(size, int) else None,
        )

    def clone_method(self, name: str) -> CloneMethod:
        """How clone ``name`` was made: ``reflink`` (copy-on-write) or ``copy``."""
        state = _files.read_json(self._dir(Kind.CLONE, name) / "state.json")
        method = state.get("clone_method")
        if method not in ("reflink", "copy"):
            raise NotFoundError(f"clone {name!r} does not exist in {self._root}")
        return "reflink" if method == "reflink" else "copy"

    async def aclose(self) -> None:
        """Nothing to release: the databases keep running for the next broker to adopt."""


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Close a source's stream (file, HTTP body) however the restore ends, if it can be closed."""
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                await aclose()


def _implements_provider(provider: LocalProvider) -> Provider:
    return provider  # mypy proves LocalProvider satisfies the Provider protocol


def _implements_liveness(provider: LocalProvider) -> Liveness:
    return provider  # ... and the optional Liveness one
