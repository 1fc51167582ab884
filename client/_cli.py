"""``aldaas connect | run | reset | release | status | snapshots``: the client side of aldaas.

``_program.py`` owns the ``aldaas`` program and its parser (kept free of trio
and the tunnel so that ``--help`` starts fast); :func:`run_command` runs the
chosen command, a coroutine function ``(args, environ, console) -> exit status``. The client
talks to the broker only through the tunnel (``tunnel.serve_client`` for a
session, ``tunnel.open_control`` for one-off requests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import trio

from aldaas import tunnel

from . import _state
from ._console import Console
from ._options import ClientError, Options, resolve
from ._render import (
    database_environ,
    dsn,
    legacy_url,
    progress_text,
    size,
    snapshots_text,
    status_text,
)

Command = Callable[[argparse.Namespace, Mapping[str, str], Console], Awaitable[int]]


def _options(
    args: argparse.Namespace, environ: Mapping[str, str], *, default_port: int = 5432
) -> Options:
    return resolve(
        environ=environ,
        state_dir=_state.state_dir(environ),
        server=args.server,
        token=args.token,
        port=getattr(args, "port", None),
        ttl=getattr(args, "ttl", None),
        name=args.name,
        protocol=args.protocol,
        ca_file=args.ca_file,
        listen=args.listen,
        timeout=getattr(args, "timeout", None),
        default_port=default_port,
    )


def _reachable(address: tuple[str, int]) -> tuple[str, int]:
    """Where a local program connects: a wildcard listener is reached on loopback."""
    host, port = address[0], address[1]
    wildcard = host in ("0.0.0.0", "", "::")  # noqa: S104 - recognising it, not binding it
    return ("127.0.0.1" if wildcard else host), port


def _need_token(opts: Options) -> str:
    if not opts.token:
        raise ClientError("No token is set; pass --token or set ALDAAS_TOKEN.", exit_code=2)
    return opts.token


def _settings(opts: Options, *, port: int, listen: bool = True) -> tunnel.ClientSettings:
    try:
        relay = tunnel.resolve_relay("auto", {tunnel.RELAY_ENV: opts.relay})
    except ValueError as exc:
        raise ClientError(f"{exc}.", exit_code=2) from None
    return tunnel.ClientSettings(
        url=opts.url,
        listen_host=opts.listen,
        listen_port=port,
        listen=listen,
        ca_file=opts.ca_file,
        relay=relay,
    )


def _params(opts: Options) -> dict[str, tunnel.JSONValue]:
    params: dict[str, tunnel.JSONValue] = {"name": opts.name}
    if opts.ttl is not None:
        params["ttl"] = opts.ttl
    return params


def _lease_args(cached: _state.CachedLease) -> dict[str, tunnel.JSONValue]:
    return {"lease": cached.lease_id, "secret": cached.secret}


def _refused(exc: BaseException, opts: Options) -> ClientError:
    """The server's one-sentence refusal, as the client's error."""
    text = str(exc).strip() or f"The broker at {opts.server} refused the request"
    return ClientError(text[0].upper() + text[1:].rstrip(".") + ".")


def _broken(exc: BaseException, opts: Options) -> ClientError:
    """A tunnel failure that is nobody's configuration mistake (a protocol error, a bug)."""
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return ClientError(
        f"The tunnel to {opts.server} failed ({text}); retry, and report it if it persists."
    )


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one interesting error of a nursery's group (tunnel errors first)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, tunnel.TunnelError | ClientError | OSError):
            return leaf
    return leaves[0]


@contextlib.asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure surfaces as its one meaningful error, not an exception group."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise _single(group) from None


class _Connected:
    """The live part of ``connect`` and ``run``: status line, and why the last attempt failed."""

    def __init__(self, console: Console, opts: Options) -> None:
        self.console = console
        self.opts = opts
        self.phase = [f"connecting to {opts.server}"]
        self.connected = False
        self.was_connected = False
        self.last_failure: str | None = None
        """Why the last attempt to reach the gateway failed (``None``: none failed yet)."""
        self.waiting: tunnel.JSONObject | None = None
        """The broker's last PROGRESS while it made us wait (queue position, ...)."""

    def on_event(self, event: tunnel.ClientEvent) -> None:
        if isinstance(event, tunnel.Waiting):
            self.waiting = event.params
            self.phase[0] = progress_text(event.params)
        elif isinstance(event, tunnel.Connecting):
            if event.attempt > 1:
                self.phase[0] = f"reconnecting (attempt {event.attempt})"
        elif isinstance(event, tunnel.Disconnected):
            self.connected = False
            self.waiting = None
            self.last_failure = _failure_text(event.reason, self.opts)
            if self.was_connected:
                self.console.note(
                    f"disconnected ({self.last_failure}); retrying in {event.retry_in:.1f}s"
                )
            else:
                self.console.note(
                    f"cannot reach the gateway at {self.opts.url} ({self.last_failure}); "
                    f"retrying in {event.retry_in:.1f}s"
                )
            self.phase[0] = "reconnecting"
        elif isinstance(event, tunnel.Connected):
            if self.was_connected:
                resumed = "the session resumed" if event.resumed else "open connections were reset"
                self.console.note(f"reconnected; {resumed}")
            self.connected = self.was_connected = True

    def gave_up(self) -> ClientError:
        """Why ``aldaas run`` had no database after its bounded wait, in one sentence."""
        waited = f"{self.opts.timeout:g} s"
        fix = "raise --timeout or ALDAAS_TIMEOUT"
        if self.waiting is not None and self.waiting.get("queue_position") is not None:
            return ClientError(
                f"No database was free within {waited}: still {progress_text(self.waiting)} "
                f"at {self.opts.server}; {fix}, or ask for a bigger pool."
            )
        if self.waiting is not None:
            return ClientError(
                f"No database within {waited}: {progress_text(self.waiting)} at "
                f"{self.opts.server}; {fix}."
            )
        if self.last_failure is not None:
            return ClientError(
                f"The gateway at {self.opts.url} was unreachable for {waited} "
                f"({self.last_failure}); check --server or ALDAAS_SERVER and the network."
            )
        return ClientError(
            f"The gateway at {self.opts.url} did not answer within {waited}; "
            f"check --server or ALDAAS_SERVER, or {fix}."
        )


def _failure_text(reason: str, opts: Options) -> str:
    """The tunnel's reason for a failed attempt, with the hint for the classic mistake: a
    ``host:port`` server defaults to wss, and a plain-ws gateway answers TLS with HTTP."""
    text = reason.rstrip(".") or "no reason given"
    if opts.url.startswith("wss://") and _looks_like_tls_mismatch(text):
        plain = "ws://" + opts.url.removeprefix("wss://")
        return (
            f"{text}; the gateway may serve plain ws: pass --protocol ws or write the server "
            f"as {plain}"
        )
    return text


def _looks_like_tls_mismatch(reason: str) -> bool:
    lowered = reason.lower()
    return any(
        sign in lowered
        for sign in ("wrong version number", "wrong_version_number", "record layer failure")
    ) or ("ssl" in lowered and "certificate" not in lowered)


async def _connect(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    opts = _options(args, environ)
    path = _state.state_path(opts.state_dir, opts.server, opts.name)
    cached = None if args.new else _state.load(path)
    if args.new:
        _state.forget(path)
    while True:
        auth: tunnel.NewSession | tunnel.AttachSession
        if cached is not None:
            await _take_over(opts, cached)
            auth = tunnel.AttachSession(session_id=cached.lease_id, secret=cached.secret)
        else:
            auth = tunnel.NewSession(token=_need_token(opts), params=_params(opts))
        try:
            return await _connect_once(opts, auth, path, cached, args, console)
        except tunnel.SessionRefused as exc:
            console.clear()
            if cached is None:
                raise _refused(exc, opts) from None
            console.note(f"the cached lease {cached.lease_id} is gone ({exc}); getting a new one")
            _state.forget(path)
            cached = None


async def _take_over(opts: Options, cached: _state.CachedLease) -> None:
    """Ask the broker to drop a stale gateway session of our cached lease before attaching.

    A previous ``aldaas connect`` of this lease may have died seconds ago; its session then
    waits out the gateway's grace period with streams and byte counts this new process does
    not have. Ending it lets this process attach afresh (the lease and its data stay).
    Best effort: without a token, or if the broker says no, attaching decides.
    """
    if not opts.token:
        return
    with contextlib.suppress(ClientError):
        await _control(opts, "takeover", _lease_args(cached))


async def _connect_once(
    opts: Options,
    auth: tunnel.NewSession | tunnel.AttachSession,
    path: pathlib.Path,
    cached: _state.CachedLease | None,
    args: argparse.Namespace,
    console: Console,
) -> int:
    live = _Connected(console, opts)
    started = trio.current_time()
    stop = trio.Event()
    saved: _state.CachedLease | None = None
    try:
        async with _nursery() as nursery:
            spinner = trio.CancelScope()

            async def spin() -> None:
                with spinner:
                    await console.spin_while(live.phase)

            async def watch_signals(task_status: trio.TaskStatus[None]) -> None:
                # Installed before anything else so that Ctrl-C / SIGTERM at any moment ends
                # the command cleanly (while waiting: give up; once connected: leave or release).
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for _ in signals:
                        stop.set()
                        if not live.connected and not live.was_connected:
                            nursery.cancel_scope.cancel()

            await nursery.start(watch_signals)
            nursery.start_soon(spin)
            client: tunnel.TunnelClient = await nursery.start(
                partial(
                    tunnel.serve_client,
                    _settings(opts, port=opts.port),
                    auth,
                    on_event=live.on_event,
                )
            )
            spinner.cancel()
            console.clear()
            info: dict[str, Any] = dict(client.session.info)
            if not info and cached is not None:
                info = dict(cached.info)
            assert client.local_address is not None
            host, port = _reachable(client.local_address)
            # Where this listener is, so that `aldaas reset` can print the DSN with the new password.
            info.update(listen_host=host, listen_port=port)
            saved = _state.CachedLease(
                server=opts.server,
                name=opts.name,
                lease_id=client.session.session_id,
                secret=client.session.secret or (cached.secret if cached else ""),
                info={k: str(v) for k, v in info.items() if v is not None},
                saved_at=time.time(),
            )
            _state.save(path, saved)
            verb = "resumed" if cached is not None else "got"
            console.note(
                f"{verb} lease {client.session.session_id} in "
                f"{(trio.current_time() - started) * 1000:.0f} ms; "
                f"Ctrl-C leaves it to its idle TTL"
                + (" (released on exit)" if args.release_on_exit else "")
            )
            print(dsn(info, host, port), flush=True)
            if args.legacy_url:
                print(legacy_url(opts.url, opts.name, saved.secret, saved.lease_id), flush=True)
            nursery.start_soon(_status_line, client, live, console)
            await stop.wait()
            console.clear()
            if args.release_on_exit:
                with trio.move_on_after(10):
                    await client.request("release", {})
                _state.forget(path)
                console.note(f"released lease {client.session.session_id}")
            client.close()
            nursery.cancel_scope.cancel()
        if stop.is_set() and not live.was_connected:
            console.clear()
            console.note("interrupted while waiting for a database")
            return 130
        return 0
    except tunnel.SessionClosed as exc:
        console.clear()
        if saved is not None:
            # Not if another aldaas connect took the lease over and cached it anew meanwhile.
            _state.forget_if_unchanged(path, saved)
        raise ClientError(f"The lease ended: {exc}".rstrip(".") + ".") from None
    except tunnel.SessionRefused as exc:
        console.clear()
        if not live.was_connected:
            raise  # the cached lease is stale: _connect gets a new one
        # Refused on a reconnect (the broker restarted and no longer has the lease): the
        # database behind the printed DSN is gone; say so rather than swap in another one.
        if saved is not None:
            _state.forget_if_unchanged(path, saved)
        raise ClientError(f"The lease ended: {exc}".rstrip(".") + ".") from None
    except tunnel.TunnelError as exc:
        console.clear()
        raise _broken(exc, opts) from None
    except OSError as exc:
        console.clear()
        raise ClientError(
            f"Cannot listen on 127.0.0.1:{opts.port} ({exc}); pick another port with --port "
            "or ALDAAS_PORT."
            if exc.errno in (98, 13)
            else f"Cannot reach the broker at {opts.server} ({exc}); check --server and the network."
        ) from None


async def _status_line(client: tunnel.TunnelClient, live: _Connected, console: Console) -> None:
    if not console.live:
        return
    while True:
        stats = client.statistics()
        state = "connected" if live.connected else live.phase[0]
        console.show(
            f"{state} · lease {client.session.session_id} · {stats.streams} connections · "
            f"↑ {size(stats.bytes_up_total)} ↓ {size(stats.bytes_down_total)}"
        )
        await trio.sleep(1)


async def _run(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ClientError("No command given; write aldaas run -- CMD [ARGS...].", exit_code=2)
    opts = _options(args, environ, default_port=0)
    auth = tunnel.NewSession(token=_need_token(opts), params=_params(opts))
    live = _Connected(console, opts)
    status = 0
    try:
        async with _nursery() as nursery:
            spinner = trio.CancelScope()

            async def spin() -> None:
                with spinner:
                    await console.spin_while(live.phase)

            nursery.start_soon(spin)
            client: tunnel.TunnelClient | None = None
            with trio.move_on_after(opts.timeout):
                client = await nursery.start(
                    partial(
                        tunnel.serve_client,
                        _settings(opts, port=opts.port),
                        auth,
                        on_event=live.on_event,
                    )
                )
            spinner.cancel()
            console.clear()
            if client is None:
                raise live.gave_up()
            assert client.local_address is not None
            host, port = _reachable(client.local_address)
            env = {**environ, **database_environ(client.session.info, host, port)}
            console.note(f"lease {client.session.session_id} on {host}:{port}; running {cmd[0]}")
            try:
                done = await trio.run_process(cmd, env=env, check=False, stdin=None)
                status = done.returncode if done.returncode >= 0 else 128 - done.returncode
            except FileNotFoundError:
                console.note(
                    f"aldaas: error: command {cmd[0]!r} not found; check its name and PATH."
                )
                status = 127
            except PermissionError:
                console.note(f"aldaas: error: command {cmd[0]!r} is not executable; check it.")
                status = 126
            finally:
                with trio.move_on_after(10) as cs:
                    cs.shield = True
                    try:
                        await client.request("release", {})
                    except tunnel.TunnelError as exc:
                        console.note(f"could not release lease {client.session.session_id}: {exc}")
                client.close()
                nursery.cancel_scope.cancel()
    except tunnel.SessionRefused as exc:
        console.clear()
        raise _refused(exc, opts) from None
    except tunnel.SessionClosed as exc:
        console.clear()
        raise ClientError(f"The lease ended: {exc}".rstrip(".") + ".") from None
    except tunnel.TunnelError as exc:
        console.clear()
        raise _broken(exc, opts) from None
    except OSError as exc:
        console.clear()
        raise ClientError(
            f"Cannot reach the broker at {opts.server} ({exc}); check --server and the network."
        ) from None
    return status


async def _control(opts: Options, name: str, args: dict[str, tunnel.JSONValue]) -> Any:
    settings = _settings(opts, port=0, listen=False)
    try:
        try:
            async with tunnel.open_control(settings, _need_token(opts)) as channel:
                return await channel.request(name, args)
        except BaseExceptionGroup as group:
            raise _single(group) from None
    except tunnel.ControlError as exc:
        raise ClientError(str(exc)) from None
    except tunnel.SessionRefused as exc:
        raise _refused(exc, opts) from None
    except tunnel.TunnelError as exc:
        raise _broken(exc, opts) from None
    except OSError as exc:
        raise ClientError(
            f"Cannot reach the broker at {opts.server} ({exc}); check --server and the network."
        ) from None


def _cached_or_fail(opts: Options) -> tuple[pathlib.Path, _state.CachedLease]:
    path = _state.state_path(opts.state_dir, opts.server, opts.name)
    cached = _state.load(path)
    if cached is None:
        raise ClientError(
            f"There is no cached lease for {opts.server} named {opts.name!r}; "
            "run aldaas connect first (or pass the --name it used)."
        )
    return path, cached


async def _reset(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    opts = _options(args, environ)
    path, cached = _cached_or_fail(opts)
    answer = await _control(opts, "reset", _lease_args(cached))
    # Every clone has its own password: the pristine one has a new one.
    fresh = {k: str(answer[k]) for k in ("user", "database", "password") if answer.get(k)}
    info = {**cached.info, **fresh}
    _state.save(
        path,
        _state.CachedLease(
            server=cached.server,
            name=cached.name,
            lease_id=cached.lease_id,
            secret=cached.secret,
            info=info,
            saved_at=time.time(),
        ),
    )
    console.note(
        f"lease {cached.lease_id} reset: a pristine database now answers at the same port, "
        "with a new password"
    )
    if "listen_host" in info and "listen_port" in info:
        print(dsn(info, info["listen_host"], int(info["listen_port"])), flush=True)
    return 0


async def _release(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    opts = _options(args, environ)
    path, cached = _cached_or_fail(opts)
    await _control(opts, "release", _lease_args(cached))
    _state.forget(path)
    console.note(f"lease {cached.lease_id} released")
    return 0


async def _status(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    opts = _options(args, environ)
    cached = _state.load(_state.state_path(opts.state_dir, opts.server, opts.name))
    status_args = _lease_args(cached) if cached else {}
    admin_token = environ.get("ALDAAS_ADMIN_TOKEN", "").strip()
    if admin_token:
        status_args["admin_token"] = admin_token  # every lease, as the admin API shows them
    answer = await _control(opts, "status", status_args)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(status_text(answer if isinstance(answer, dict) else {}, server=opts.server))
    return 0


async def _snapshots(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> int:
    opts = _options(args, environ)
    answer = await _control(opts, "snapshots", {})
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(snapshots_text(answer if isinstance(answer, list) else []))
    return 0


COMMANDS: dict[str, Command] = {
    "connect": _connect,
    "run": _run,
    "reset": _reset,
    "release": _release,
    "status": _status,
    "snapshots": _snapshots,
}
"""The client's commands by name; their flags are in ``_program.add_commands``."""


def run_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run the client command chosen in ``args``; errors become one line and an exit status."""
    console = Console()
    func = COMMANDS[args.command]
    try:
        return trio.run(func, args, dict(os.environ if environ is None else environ), console)
    except ClientError as exc:
        console.clear()
        print(f"aldaas: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        console.clear()
        return 130


__all__ = ["COMMANDS", "run_command"]
