"""A lease held from synchronous code: the tunnel runs in a thread of its own.

The pytest plugin holds one lease for a whole test session while pytest runs
synchronous tests; trio runs the tunnel client in a daemon thread, and
:meth:`LeaseThread.release` ends the lease from any thread. If the process dies
without releasing, the lease ends by itself after its idle TTL.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
import trio

from aldaas import tunnel

from ._options import ClientError, Options
from ._render import dsn


@attrs.frozen(kw_only=True)
class LeasedDatabase:
    """Where the leased database answers on this machine (through the tunnel)."""

    lease_id: str
    host: str
    port: int
    user: str
    password: str | None = attrs.field(repr=False)
    database: str

    @property
    def url(self) -> str:
        """``postgresql://user:password@host:port/database?sslmode=disable`` (psycopg, asyncpg,
        libpq and SQLAlchemy's ``postgresql+driver://`` all read it)."""
        info = {"user": self.user, "password": self.password, "database": self.database}
        return dsn(info, self.host, self.port)

    def with_database(self, name: str) -> LeasedDatabase:
        """The same server, another database of the lease (a per-test copy)."""
        return attrs.evolve(self, database=name)


class LeaseThread:
    """One lease, its tunnel served by trio in a daemon thread."""

    def __init__(self, opts: Options) -> None:
        self._opts = opts
        self._ready: queue.Queue[LeasedDatabase | BaseException] = queue.Queue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: tunnel.TunnelClient | None = None
        self._thread = threading.Thread(target=self._main, name="aldaas-lease", daemon=True)

    def start(self) -> LeasedDatabase:
        """Get a database (waiting at most ``opts.timeout``); raise :class:`ClientError`."""
        self._thread.start()
        got = self._ready.get()
        if isinstance(got, BaseException):
            self._thread.join()
            raise got
        return got

    def release(self) -> None:
        """End the lease now (its database and every copy inside it are destroyed)."""
        if self._token is None or not self._thread.is_alive():
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run(self._release, trio_token=self._token)
        self._thread.join(timeout=15)

    async def _release(self) -> None:
        client = self._client
        if client is None:
            return
        # If the broker cannot be told, the lease ends with its idle TTL instead.
        with trio.move_on_after(10), contextlib.suppress(tunnel.TunnelError):
            await client.request("release", {})
        client.close()

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._ready.put(_client_error(exc, self._opts))

    async def _serve(self) -> None:
        from ._cli import _Connected, _params, _settings  # the same wiring as `aldaas run`
        from ._console import Console

        opts = self._opts
        if not opts.token:
            raise ClientError("No token is set; set ALDAAS_TOKEN (or pass --aldaas-token).")
        self._token = trio.lowlevel.current_trio_token()
        live = _Connected(Console(live=False), opts)
        auth = tunnel.NewSession(token=opts.token, params=_params(opts))
        async with trio.open_nursery() as nursery:
            client: tunnel.TunnelClient | None = None
            with trio.move_on_after(opts.timeout):
                client = await nursery.start(
                    partial(
                        tunnel.serve_client, _settings(opts, port=0), auth, on_event=live.on_event
                    )
                )
            if client is None:
                raise live.gave_up()
            self._client = client
            assert client.local_address is not None
            self._ready.put(
                _database(client.session.session_id, client.session.info, client.local_address)
            )


def _database(lease_id: str, info: Mapping[str, Any], address: tuple[str, int]) -> LeasedDatabase:
    return LeasedDatabase(
        lease_id=lease_id,
        host=address[0],
        port=address[1],
        user=str(info.get("user") or "postgres"),
        password=str(info["password"]) if info.get("password") else None,
        database=str(info.get("database") or "postgres"),
    )


def _client_error(exc: BaseException, opts: Options) -> BaseException:
    from ._cli import _broken, _refused, _single

    if isinstance(exc, BaseExceptionGroup):
        exc = _single(exc)
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, tunnel.SessionRefused):
        return _refused(exc, opts)
    if isinstance(exc, tunnel.TunnelError):
        return _broken(exc, opts)
    if isinstance(exc, OSError):
        return ClientError(
            f"Cannot reach the broker at {opts.server} ({exc}); check ALDAAS_SERVER and the network."
        )
    return exc
