"""The gateway: one websocket port, many sessions, each stream relayed to a TCP address."""

from __future__ import annotations

import contextlib
import hmac
import math
import os
import socket
import ssl
import sys
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable

import attrs
import structlog
import trio
from wsproto import WSConnection
from wsproto.events import Request as WsRequest

from aldaas.tunnel._errors import (
    CloseCode,
    ControlError,
    ProtocolError,
    SessionClosed,
    SessionRefused,
)
from aldaas.tunnel._hooks import GatewayHooks, SessionGrant
from aldaas.tunnel._limits import (
    REPLAY_CHUNK,
    LoginPenalties,
    MemoryBudget,
    Ticket,
    Unauthenticated,
)
from aldaas.tunnel._mux import Mux, TunnelStream, error_frame
from aldaas.tunnel._protocol import (
    SUBPROTOCOL,
    Connection,
    Error,
    Hello,
    JSONObject,
    Ping,
    Pong,
    Progress,
    Request,
    ResetCode,
    Role,
    Welcome,
)
from aldaas.tunnel._relay import current_relay
from aldaas.tunnel._settings import GatewaySettings
from aldaas.tunnel._splice import Pipe, connect_socket, connect_tcp, finish_connect, start_connect
from aldaas.tunnel._ws import (
    WebSocket,
    accept,
    new_server_connection,
    read_request,
    refuse_early,
    reject,
)

log = structlog.get_logger("tunnel.gateway")


def _failure(event: str, **fields: object) -> None:
    """Log an unexpected exception as text without local variables: a renderer that shows
    a traceback's locals would print the Authorization header or a secret."""
    exc = sys.exc_info()[1]
    trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
    log.error(event, error=repr(exc), traceback=trace, **fields)


_HANDSHAKE_READ = 16 * 1024
_INSTANCE = ""
"""The credential key of the instance token in :class:`LoginPenalties` (sessions use their id)."""


def _peer_host(stream: trio.abc.Stream) -> str:
    """The remote IP of a (possibly TLS-wrapped) socket stream, for per-peer accounting."""
    inner: object = stream
    while not isinstance(inner, trio.SocketStream):
        inner = getattr(inner, "transport_stream", None)
        if inner is None:
            return "unknown"
    try:
        return str(inner.socket.getpeername()[0])
    except OSError:
        return "unknown"


_FRESH_ATTACH = (
    "a new client process attached the session without replay state; its old streams were reset"
)


@attrs.frozen(kw_only=True)
class GatewayStatistics:
    """Counters for metrics, read at scrape time."""

    sessions: int
    """Live sessions (attached or in their grace period)."""
    sessions_attached: int
    sessions_opened_total: int
    streams: int
    """Open streams across live sessions."""
    streams_opened_total: int
    bytes_up_total: int
    """Stream bytes from clients to servers."""
    bytes_down_total: int
    auth_failures_total: int
    """Upgrades refused for a missing or wrong token or secret (401/403)."""
    protocol_errors_total: int
    """Websockets closed for a protocol violation."""
    handshakes: int
    """Connections accepted whose credentials are not verified yet."""
    refused_total: int
    """Connections refused before authentication: too many handshakes, or a locked-out login."""
    memory_held_bytes: int
    """Bytes of the memory budget that sessions hold (replay chunks and stream windows)."""


class _Session:
    def __init__(self, gateway: Gateway, session_id: str, conn: Connection) -> None:
        self.gateway = gateway
        self.id = session_id
        self.conn = conn
        settings = gateway.settings
        self.mux = Mux(
            conn,
            replay_limit=settings.replay_buffer_size,
            keepalive_interval=settings.keepalive_interval,
            keepalive_timeout=settings.keepalive_timeout,
            relay=settings.relay,
            on_stream=self._on_stream,
            on_request=self._on_request,
            on_protocol_error=gateway._count_protocol_error,
            budget=gateway.budget,
        )
        self.nursery: trio.Nursery | None = None
        self.scope: trio.CancelScope | None = None
        self.handler_done: trio.Event | None = None
        self.attach_changed = trio.Event()
        self.detached_at = trio.current_time()
        self.ended = False
        self.end_reason = ""
        self.end_code: int = CloseCode.SESSION_CLOSED
        self.replaced = False
        self._reported_up = 0
        self._reported_down = 0

    @property
    def attached(self) -> bool:
        return self.scope is not None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the session's streams and request tasks; end it after the grace period."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._report_traffic)
                task_status.started()
                while not self.ended:
                    if self.attached:
                        await self._wait_attach_change()
                        continue
                    deadline = self.detached_at + self.gateway.settings.grace_period
                    with trio.move_on_at(deadline):
                        await self._wait_attach_change()
                        continue
                    self.end("the client did not resume within the grace period")
                nursery.cancel_scope.cancel()
        finally:
            self.end("the gateway shut down")
            self._flush_traffic()

    async def _wait_attach_change(self) -> None:
        await self.attach_changed.wait()
        self.attach_changed = trio.Event()

    def _changed(self) -> None:
        self.attach_changed.set()

    async def _report_traffic(self) -> None:
        while True:
            await trio.sleep(self.gateway.settings.traffic_report_interval)
            self._flush_traffic()

    def _flush_traffic(self) -> None:
        up = self.mux.bytes_received - self._reported_up
        down = self.mux.bytes_sent - self._reported_down
        if up or down:
            self._reported_up += up
            self._reported_down += down
            self.gateway._call_hook("traffic", self.id, up, down)

    def end(self, reason: str, code: int = CloseCode.SESSION_CLOSED) -> None:
        """End the session for good; an attached client gets ERROR + close ``code``."""
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        self.end_code = code
        gateway = self.gateway
        if gateway._sessions.get(self.id) is self:
            del gateway._sessions[self.id]
        self.mux.finish(reason)
        gateway._closed_bytes_up += self.mux.bytes_received
        gateway._closed_bytes_down += self.mux.bytes_sent
        if self.scope is not None:
            self.scope.cancel()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
        self._changed()
        self._flush_traffic()
        log.info("tunnel session ended", session_id=self.id, reason=reason)
        gateway._call_hook("session_ended", self.id, reason)

    # -------------------------------------------------------------- streams and requests

    def _on_stream(self, stream: TunnelStream) -> None:
        limit = self.gateway.settings.max_streams_per_session
        if len(self.mux.streams) > limit or self.nursery is None:
            stream.reset(
                ResetCode.REFUSED,
                f"the session already has {limit} open streams, the gateway's limit; "
                "close some connections",
            )
            return
        self.gateway._streams_opened += 1
        # In the relay's callback: resolve, connect (on loopback the handshake is over when
        # connect returns) and pipe without a task; a host name or a connect still under
        # way continues in a task.
        try:
            host, port = self.gateway.hooks.resolve(self.id)
            started = start_connect(host, port)
        except (OSError, SessionRefused) as exc:
            self._connect_failed(stream, exc)
            return
        except Exception:
            self._route_failed(stream)
            return
        if started is not None and started[1]:
            Pipe(stream, started[0], self.mux.relay(), read_now=False)
        else:
            self.nursery.start_soon(self._connect, stream, host, port, started)

    async def _connect(
        self,
        stream: TunnelStream,
        host: str,
        port: int,
        started: tuple[socket.socket, bool] | None,
    ) -> None:
        try:
            with trio.fail_after(self.gateway.settings.connect_timeout):
                if started is None:
                    sock = await connect_socket(host, port)
                else:
                    sock = await finish_connect(started[0], host, port)
        except (OSError, trio.TooSlowError) as exc:
            self._connect_failed(stream, exc)
            return
        Pipe(stream, sock, self.mux.relay(), read_now=False)

    def _connect_failed(self, stream: TunnelStream, exc: Exception) -> None:
        stream.reset(ResetCode.CONNECT_FAILED, _connect_error(exc))
        log.warning("tunnel stream connect failed", session_id=self.id, error=str(exc))

    def _route_failed(self, stream: TunnelStream) -> None:
        stream.reset(ResetCode.INTERNAL_ERROR, "the gateway failed to route the stream")
        _failure(event="tunnel resolve hook failed", session_id=self.id)

    def _on_request(self, request: Request) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self.gateway._answer, self.mux, self.id, request)


class Gateway:
    """Handle on a running gateway (from ``nursery.start(serve_gateway, ...)``)."""

    def __init__(
        self, settings: GatewaySettings, hooks: GatewayHooks, nursery: trio.Nursery, port: int
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        self.port = port
        self._nursery = nursery
        self._sessions: dict[str, _Session] = {}
        self._sessions_opened = 0
        self._streams_opened = 0
        self._auth_failures = 0
        self._penalties = LoginPenalties()
        self._unauthenticated = Unauthenticated(
            settings.max_unauthenticated, settings.max_unauthenticated_per_peer
        )
        self._refused = 0
        self.budget = MemoryBudget(settings.memory_budget)
        self._protocol_errors = 0
        self._closed_bytes_up = 0
        self._closed_bytes_down = 0

    def _auth_failed(self, peer: str, credential: str, reason: str, **fields: object) -> None:
        """Count a failed authentication and lock (peer, credential) out for a while; the
        answer itself goes out at once (no socket waits out a penalty)."""
        self._auth_failures += 1
        failures, lockout = self._penalties.failed(peer, credential, trio.current_time())
        log.warning(
            "tunnel auth failed",
            reason=reason,
            peer=peer,
            failures=failures,
            lockout=lockout,
            **fields,
        )

    async def _locked_out(
        self, stream: trio.abc.Stream, ws_conn: WSConnection, peer: str, credential: str
    ) -> bool:
        """Refuse (HTTP 429) a login of a (peer, credential) pair that failed moments ago,
        before its credentials are read; False if it may try."""
        wait = self._penalties.locked_for(peer, credential, trio.current_time())
        if wait <= 0:
            return False
        self._refused += 1
        await reject(
            stream,
            ws_conn,
            429,
            f"a login with these credentials failed from this address {wait:.1f} s ago or less; "
            "check them and retry in a few seconds",
            retry_after=wait,
        )
        return True

    def _sessions_full(self) -> str | None:
        """Why a new session cannot be admitted now (one sentence), or None."""
        if len(self._sessions) >= self.settings.max_sessions:
            return (
                f"the gateway already holds {len(self._sessions)} sessions, its limit "
                "(max_sessions); try again later"
            )
        if not self.budget.fits(REPLAY_CHUNK + self.settings.stream_window):
            return "the gateway's memory budget (memory_budget) is in use; try again later"
        return None

    # -------------------------------------------------------------- public

    def close_session(self, session_id: str, reason: str) -> bool:
        """End a session from the server side (lease killed or expired); False if not live."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.end(reason)
        return True

    @property
    def session_ids(self) -> frozenset[str]:
        return frozenset(self._sessions)

    def statistics(self) -> GatewayStatistics:
        sessions = list(self._sessions.values())
        return GatewayStatistics(
            sessions=len(sessions),
            sessions_attached=sum(1 for s in sessions if s.attached),
            sessions_opened_total=self._sessions_opened,
            streams=sum(len(s.mux.streams) for s in sessions),
            streams_opened_total=self._streams_opened,
            bytes_up_total=self._closed_bytes_up + sum(s.mux.bytes_received for s in sessions),
            bytes_down_total=self._closed_bytes_down + sum(s.mux.bytes_sent for s in sessions),
            auth_failures_total=self._auth_failures,
            protocol_errors_total=self._protocol_errors,
            handshakes=self._unauthenticated.count,
            refused_total=self._refused,
            memory_held_bytes=self.budget.used,
        )

    # -------------------------------------------------------------- internals

    def _call_hook(self, name: str, *args: str | int) -> None:
        try:
            getattr(self.hooks, name)(*args)
        except Exception:
            _failure(event="tunnel hook failed", hook=name)

    def _count_protocol_error(self, exc: ProtocolError) -> None:
        self._protocol_errors += 1
        log.warning("tunnel protocol error", error=str(exc), close_code=int(exc.close_code))

    def _new_connection(self) -> Connection:
        return Connection(
            Role.SERVER,
            max_frame_size=self.settings.max_frame_size,
            window=self.settings.stream_window,
        )

    async def _answer(self, mux: Mux, session_id: str | None, request: Request) -> None:
        try:
            result = await self.hooks.control(session_id, request.name, request.args)
            mux.respond(request.request_id, result=result)
        except ControlError as exc:
            mux.respond(request.request_id, error=str(exc))
        except Exception:
            _failure(event="tunnel control hook failed", request=request.name)
            mux.respond(
                request.request_id,
                error=f"the server failed to answer {request.name!r}; its log says why",
            )

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        peer = _peer_host(stream)
        refusal = self._unauthenticated.enter(peer)
        if refusal is not None:
            self._refused += 1
            log.warning("tunnel handshakes over the limit", peer=peer, status=refusal)
            await refuse_early(stream, refusal, "too many connections are still in their handshake")
            return
        ticket = Ticket(self._unauthenticated, peer)
        try:
            await self._handle(stream, ticket)
        except Exception:
            _failure(event="tunnel connection failed")
        finally:
            ticket.release()
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.abc.Stream, ticket: Ticket) -> None:
        settings = self.settings
        ws_conn = new_server_connection()
        deadline = trio.current_time() + settings.handshake_timeout
        request = None
        with trio.move_on_at(deadline):
            request = await read_request(stream, ws_conn, _HANDSHAKE_READ)
        if request is None:
            return  # garbage, a slow peer or a hang-up before the upgrade: just drop it
        path = urllib.parse.urlsplit(request.target).path
        if path == settings.path:
            await self._tunnel(stream, ws_conn, request, deadline, ticket)
            return
        parts = path.strip("/").split("/")
        if settings.legacy_endpoint and len(parts) == 3 and all(parts):
            await self._legacy(stream, ws_conn, request, parts, deadline, ticket)
            return
        await reject(stream, ws_conn, 404, f"no tunnel endpoint here; use {settings.path}")

    async def _tunnel(
        self,
        stream: trio.abc.Stream,
        ws_conn: WSConnection,
        request: WsRequest,
        deadline: float,
        ticket: Ticket,
    ) -> None:
        settings = self.settings
        peer = ticket.peer
        if SUBPROTOCOL not in request.subprotocols:
            await reject(
                stream,
                ws_conn,
                400,
                f"the websocket must ask for subprotocol {SUBPROTOCOL}; upgrade the aldaas client",
            )
            return
        auth = ""
        for name, value in request.extra_headers:
            if name.lower() == b"authorization":
                auth = value.decode("latin-1").strip()
        scheme, _, credentials = auth.partition(" ")
        session_id: str | None = None
        if scheme.lower() == "bearer":
            if await self._locked_out(stream, ws_conn, peer, _INSTANCE):
                return
            token = credentials.strip().encode()
            expected = settings.instance_token.encode()
            if not expected or not hmac.compare_digest(token, expected):
                self._auth_failed(peer, _INSTANCE, "wrong instance token")
                await reject(
                    stream, ws_conn, 401, "the instance token is wrong; check ALDAAS_TOKEN"
                )
                return
            full = None if _wants_control(request) else self._sessions_full()
            if full is not None:
                self._refused += 1
                await reject(stream, ws_conn, 503, full, retry_after=5.0)
                return
        elif scheme.lower() == "aldaas-session":
            session_id, _, secret = credentials.strip().partition(":")
            if await self._locked_out(stream, ws_conn, peer, session_id):
                return
            refusal = await self._verify_session(session_id, secret, deadline)
            if refusal is not None:
                self._auth_failed(peer, session_id, "wrong session secret", session_id=session_id)
                await reject(stream, ws_conn, 403, refusal)
                return
        else:
            if await self._locked_out(stream, ws_conn, peer, _INSTANCE):
                return
            self._auth_failed(peer, _INSTANCE, "no credentials")
            await reject(
                stream,
                ws_conn,
                401,
                "no credentials: send 'Authorization: Bearer <instance token>' "
                "or 'Aldaas-Session <id>:<secret>'",
            )
            return
        ticket.release()
        ws = await accept(stream, ws_conn, settings.receive_buffer_size, SUBPROTOCOL)
        live = self._sessions.get(session_id) if session_id is not None else None
        if live is not None and live.attached:
            await self._take_over(live)
        conn = live.conn if live is not None else self._new_connection()
        hello: Hello | None = None
        try:
            with trio.move_on_at(deadline):
                hello = await self._read_hello(ws, conn)
        except ProtocolError as exc:
            await self._protocol_failure(ws, exc)
            return
        if hello is None:
            await ws.aclose(CloseCode.HANDSHAKE_TIMEOUT, "no HELLO in time")
            return
        expected_modes = ("new", "control") if session_id is None else ("attach",)
        if hello.mode not in expected_modes:
            message = f"HELLO mode {hello.mode!r} does not match the credentials sent"
            await ws.aclose(
                CloseCode.POLICY_VIOLATION,
                message,
                last=error_frame(CloseCode.POLICY_VIOLATION, message),
            )
            return
        if hello.mode == "control":
            await self._control(ws, conn)
        elif hello.mode == "new":
            await self._open_new(ws, conn, hello)
        else:
            assert session_id is not None
            if live is not None and not live.ended and hello.fresh:
                # A client without replay state (a new process with the cached secret) cannot
                # resume the old streams: reset them (their TCP connections close) and count
                # afresh. The owner hears session_ended, then attached, as after a grace period.
                log.info(
                    "tunnel session restarted by a fresh client",
                    session_id=session_id,
                    streams_reset=len(live.mux.streams),
                )
                live.end(_FRESH_ATTACH)
            if live is None or live.ended:
                # The owner still accepts the secret, but the streams are gone: start afresh.
                live = await self._register(session_id, conn)
                first = conn.send(Welcome(session_id=session_id, resumed=False))
            else:
                try:
                    first = conn.send(Welcome(session_id=session_id, resumed=True))
                except ProtocolError as exc:
                    await self._protocol_failure(ws, exc)
                    return
                first += conn.replay()
            await self._attach(live, ws, first)

    async def _verify_session(self, session_id: str, secret: str, deadline: float) -> str | None:
        """Ask the owner whether ``secret`` opens ``session_id``: ``None`` if it does, else the
        refusal to send (the hook's own when it raises SessionRefused: the session ended, and
        why; the generic one if it says no, fails or stalls)."""
        ok = False
        why = f"session {session_id!r} is unknown or its secret is wrong; open a new session"
        with trio.move_on_at(deadline):
            try:
                ok = bool(session_id) and await self.hooks.verify_session(session_id, secret)
            except SessionRefused as exc:
                why = str(exc)
            except Exception:
                _failure(event="tunnel verify hook failed", session_id=session_id)
        return None if ok else why

    async def _read_hello(self, ws: WebSocket, conn: Connection) -> Hello | None:
        while True:
            event = conn.next_event()
            if event is None:
                data = await ws.receive()
                if not data:
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, Hello):
                return event
            if isinstance(event, Ping):
                await ws.send(conn.send(Pong(payload=event.payload)))

    async def _protocol_failure(self, ws: WebSocket, exc: ProtocolError) -> None:
        self._protocol_errors += 1
        log.warning("tunnel protocol error", error=str(exc), close_code=int(exc.close_code))
        await ws.aclose(exc.close_code, str(exc), last=error_frame(exc.close_code, str(exc)))

    async def _take_over(self, session: _Session) -> None:
        session.replaced = True
        if session.scope is not None:
            session.scope.cancel()
        if session.handler_done is not None:
            await session.handler_done.wait()

    async def _register(self, session_id: str, conn: Connection) -> _Session:
        session = _Session(self, session_id, conn)
        old = self._sessions.get(session_id)
        if old is not None:
            old.end("the session was opened again")
        self._sessions[session_id] = session
        self._sessions_opened += 1
        await self._nursery.start(session.serve)
        return session

    async def _open_new(self, ws: WebSocket, conn: Connection, hello: Hello) -> None:
        message = self._sessions_full()
        if message is not None:
            # Reached here only by a client that asked for a control connection in its URL
            # and then sent a "new" HELLO, or when sessions filled up since its upgrade.
            await ws.aclose(
                CloseCode.POLICY_VIOLATION,
                message,
                last=conn.send(Error(code=CloseCode.POLICY_VIOLATION, message=message)),
            )
            return
        send, receive = trio.open_memory_channel[JSONObject](math.inf)
        grant: SessionGrant | None = None
        refusal: str | None = None
        broken = False
        failures: list[ProtocolError] = []

        def progress(params: JSONObject) -> None:
            send.send_nowait(params)

        drained = trio.Event()

        async def send_progress() -> None:
            async for params in receive:
                await ws.send(conn.send(Progress(params=params)))
            drained.set()

        async def watch_client(scope: trio.CancelScope) -> None:
            # While the owner makes the client wait, notice a hang-up and answer pings.
            while True:
                event = conn.next_event()
                if event is None:
                    data = await ws.receive()
                    if not data:
                        scope.cancel()
                        return
                    conn.receive_data(data)
                elif isinstance(event, Ping):
                    await ws.send(conn.send(Pong(payload=event.payload)))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_progress)
                nursery.start_soon(watch_client, nursery.cancel_scope)
                try:
                    grant = await self.hooks.open_session(hello.params, progress)
                except SessionRefused as exc:
                    refusal = str(exc)
                except Exception:
                    _failure(event="tunnel open_session hook failed")
                    refusal = "the server failed to open a session; its log says why"
                send.close()
                await drained.wait()  # progress sent before the verdict arrives first
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            broken = True
        except* ProtocolError as group:
            failures.extend(e for e in group.exceptions if isinstance(e, ProtocolError))
        if failures:
            await self._protocol_failure(ws, failures[0])
            return
        if broken:
            return
        if refusal is not None:
            log.info("tunnel session refused", reason=refusal)
            await ws.aclose(
                CloseCode.SESSION_REFUSED,
                refusal,
                last=conn.send(Error(code=CloseCode.SESSION_REFUSED, message=refusal)),
            )
            return
        if grant is None:
            return  # the client hung up while waiting
        session = await self._register(grant.session_id, conn)
        log.info("tunnel session opened", session_id=grant.session_id)
        first = conn.send(
            Welcome(session_id=grant.session_id, secret=grant.secret, info=grant.info)
        )
        await self._attach(session, ws, first)

    async def _attach(self, session: _Session, ws: WebSocket, first: bytes) -> None:
        session.replaced = False
        session.handler_done = done = trio.Event()
        session.scope = scope = trio.CancelScope()
        session._changed()
        self._call_hook("attached", session.id)
        log.info("tunnel session attached", session_id=session.id)
        code: int = CloseCode.GOING_AWAY
        reason = "the gateway is shutting down"
        try:
            with scope:
                await session.mux.run(ws, first)
        except ProtocolError as exc:
            session.end(f"protocol error: {exc}", exc.close_code)
            return
        except SessionClosed as exc:
            session.end(str(exc), exc.close_code)
            return
        finally:
            if session.scope is scope:
                session.scope = None
            session.detached_at = trio.current_time()
            session._changed()
            if not session.ended:
                self._call_hook("detached", session.id)
                log.info("tunnel session detached", session_id=session.id)
            if scope.cancelled_caught:
                if session.ended:
                    code, reason = session.end_code, session.end_reason
                    with trio.CancelScope(shield=True):
                        await ws.aclose(code, reason, last=error_frame(code, reason))
                elif session.replaced:
                    code, reason = CloseCode.REPLACED, "another connection attached this session"
                    with trio.CancelScope(shield=True):
                        await ws.aclose(code, reason)
            done.set()
        await ws.aclose(code, reason)

    async def _control(self, ws: WebSocket, conn: Connection) -> None:
        settings = self.settings
        async with trio.open_nursery() as nursery:

            def on_request(request: Request) -> None:
                nursery.start_soon(self._answer, mux, None, request)

            mux = Mux(
                conn,
                replay_limit=settings.replay_buffer_size,
                keepalive_interval=settings.keepalive_interval,
                keepalive_timeout=settings.keepalive_timeout,
                relay=settings.relay,
                on_request=on_request,
                on_protocol_error=self._count_protocol_error,
            )
            with contextlib.suppress(ProtocolError, SessionClosed):
                await mux.run(ws, conn.send(Welcome(session_id="")))
            mux.finish("the control connection ended")
            nursery.cancel_scope.cancel()
        await ws.aclose()

    async def _legacy(
        self,
        stream: trio.abc.Stream,
        ws_conn: WSConnection,
        request: WsRequest,
        parts: list[str],
        deadline: float,
        ticket: Ticket,
    ) -> None:
        # /{name}/{secret}/{lease}: the middle part, where the original client put the
        # instance token, carries the lease's own secret; a lease id alone opens nothing.
        name, secret, session = (urllib.parse.unquote(p) for p in parts)
        if await self._locked_out(stream, ws_conn, ticket.peer, session):
            return
        if await self._verify_session(session, secret, deadline) is not None:
            self._auth_failed(
                ticket.peer, session, "wrong lease secret", session_id=session, endpoint="legacy"
            )
            await reject(
                stream,
                ws_conn,
                403,
                f"lease {session!r} is unknown or the secret in the path is not its own; "
                "print the URL again with aldaas connect --legacy-url",
            )
            return
        ticket.release()
        try:
            route = await self.hooks.resolve_legacy(name, session)
            with trio.fail_after(self.settings.connect_timeout):
                tcp = await connect_tcp(route.host, route.port)
        except SessionRefused as exc:
            await reject(stream, ws_conn, 503, str(exc))
            return
        except (OSError, trio.TooSlowError) as exc:
            log.warning("tunnel legacy connect failed", session_id=session, error=str(exc))
            await reject(stream, ws_conn, 502, _connect_error(exc))
            return
        subprotocol = request.subprotocols[0] if request.subprotocols else None
        ws = await accept(stream, ws_conn, self.settings.receive_buffer_size, subprotocol)
        self._call_hook("attached", route.session_id)
        up = down = 0

        async def upstream() -> None:
            nonlocal up
            while True:
                data = await ws.receive()
                if not data:
                    return
                up += len(data)
                await tcp.send_all(data)

        async def downstream() -> None:
            nonlocal down
            while True:
                data = await tcp.receive_some(256 * 1024)
                if not data:
                    return
                down += len(data)
                await ws.send(data)

        try:
            async with trio.open_nursery() as nursery:

                async def run(fn: Callable[[], Awaitable[None]]) -> None:
                    try:
                        await fn()
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(run, upstream)
                nursery.start_soon(run, downstream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._closed_bytes_up += up
            self._closed_bytes_down += down
            self._call_hook("traffic", route.session_id, up, down)
            self._call_hook("detached", route.session_id)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(tcp)
                await ws.aclose()


def _connect_error(exc: Exception) -> str:
    """What a client hears when the gateway cannot reach a session's database: the cause
    without the address (clone host and port, pod IPs are the gateway's business)."""
    if isinstance(exc, trio.TooSlowError):
        cause = "the connection timed out"
    elif isinstance(exc, OSError) and exc.errno:
        # From the errno alone: the connect helpers put the address into strerror.
        text = os.strerror(exc.errno)
        cause = text[0].lower() + text[1:]
    else:
        cause = "the database is not reachable"
    return f"the gateway could not connect to the session's database ({cause}); try again"


def _wants_control(request: WsRequest) -> bool:
    """Whether the upgrade asks for a control-only connection (``?mode=control``), which
    the session limits do not refuse: ``aldaas status`` works on a full gateway."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.target).query)
    return query.get("mode") == ["control"]


async def serve_gateway(
    settings: GatewaySettings,
    hooks: GatewayHooks,
    *,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until cancelled; ``nursery.start`` returns its :class:`Gateway`."""
    # Started with the gateway (its task and epoll are there from the start); an epoll relay
    # asked for where there is none fails here, before anything listens.
    current_relay(settings.relay)
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    tcp_listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    port = tcp_listeners[0].socket.getsockname()[1]
    if settings.tls_certificate is not None:
        if settings.tls_private_key is None:
            raise ValueError("tls_certificate needs tls_private_key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
        listeners = [trio.SSLListener(lst, context, https_compatible=True) for lst in tcp_listeners]
    else:
        listeners = list(tcp_listeners)
    async with trio.open_nursery() as nursery:
        gateway = Gateway(settings, hooks, nursery, port)
        await nursery.start(trio.serve_listeners, gateway._serve_connection, listeners)
        log.info("tunnel gateway listening", host=settings.host, port=port)
        task_status.started(gateway)
