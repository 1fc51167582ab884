"""The client side: a local TCP listener whose connections travel as streams of one session."""

from __future__ import annotations

import errno
import random
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import structlog
import trio

from aldaas.tunnel._errors import (
    CloseCode,
    ControlError,
    ProtocolError,
    RemoteProtocolError,
    SessionClosed,
    SessionRefused,
)
from aldaas.tunnel._mux import Mux, TunnelStream
from aldaas.tunnel._protocol import (
    Connection,
    Error,
    Hello,
    JSONObject,
    JSONValue,
    Mode,
    Ping,
    Pong,
    Progress,
    Role,
    Welcome,
)
from aldaas.tunnel._settings import ClientSettings
from aldaas.tunnel._splice import Pipe
from aldaas.tunnel._ws import HandshakeRejected, WebSocket, client_ssl_context, connect

log = structlog.get_logger("tunnel.client")


@attrs.frozen(kw_only=True)
class NewSession:
    """Open a new session with the instance token; ``params`` go to the server's hook."""

    token: str = attrs.field(repr=False)
    params: JSONObject = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class AttachSession:
    """Resume (or re-attach) a session whose id and secret were cached."""

    session_id: str
    secret: str = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class SessionInfo:
    """What the server said about the session; cache ``session_id`` and ``secret``."""

    session_id: str
    secret: str = attrs.field(repr=False)
    info: JSONObject = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Connecting:
    """An attempt to reach the gateway starts (attempt 1 is the first)."""

    attempt: int
    url: str


@attrs.frozen(kw_only=True)
class Waiting:
    """The server makes us wait (queue position, ETA, ...), as it sent it."""

    params: JSONObject


@attrs.frozen(kw_only=True)
class Connected:
    """The session is carried by a websocket; ``resumed`` if no stream was lost."""

    session: SessionInfo
    resumed: bool


@attrs.frozen(kw_only=True)
class Disconnected:
    """The websocket dropped; the next attempt starts in ``retry_in`` seconds."""

    reason: str
    retry_in: float


ClientEvent = Connecting | Waiting | Connected | Disconnected


@attrs.frozen(kw_only=True)
class ClientStatistics:
    streams: int
    streams_opened_total: int
    bytes_up_total: int
    bytes_down_total: int
    reconnects_total: int
    rtt_seconds: float | None


class TunnelClient:
    """Handle on a running client (from ``nursery.start(serve_client, ...)``)."""

    def __init__(self, mux: Mux, session: SessionInfo, scope: trio.CancelScope) -> None:
        self._mux = mux
        self.session = session
        self.local_address: tuple[str, int] | None = None
        self._scope = scope
        self.reconnects = 0

    async def request(self, name: str, args: JSONObject | None = None) -> JSONValue:
        """Ask the server ``name`` about our session; raise :class:`ControlError` if it fails."""
        response = await self._mux.request(name, args or {})
        if response.error is not None:
            raise ControlError(response.error)
        return response.result

    async def open_stream(self) -> TunnelStream:
        """A new stream to wherever the server routes the session."""
        await trio.lowlevel.checkpoint()
        return self._mux.open_stream()

    def close(self) -> None:
        """Stop: ``serve_client`` returns; the session stays on the server until its grace
        period ends (send a ``release`` request first to end it at once)."""
        self._scope.cancel()

    def statistics(self) -> ClientStatistics:
        mux = self._mux
        return ClientStatistics(
            streams=len(mux.streams),
            streams_opened_total=mux.streams_opened,
            bytes_up_total=mux.bytes_sent,
            bytes_down_total=mux.bytes_received,
            reconnects_total=self.reconnects,
            rtt_seconds=mux.rtt,
        )


def _authorization(auth: NewSession | AttachSession, session: SessionInfo | None) -> str:
    if session is not None:
        return f"Aldaas-Session {session.session_id}:{session.secret}"
    if isinstance(auth, AttachSession):
        return f"Aldaas-Session {auth.session_id}:{auth.secret}"
    return f"Bearer {auth.token}"


def _refusal(exc: HandshakeRejected, attaching: bool) -> SessionRefused | None:
    if exc.status == 401:
        return SessionRefused(f"the gateway refused the instance token (HTTP 401): {exc.message}")
    if exc.status == 403:
        what = "resuming the session" if attaching else "the request"
        return SessionRefused(f"the gateway refused {what} (HTTP 403): {exc.message}")
    if 400 <= exc.status < 500 and exc.status not in (408, 429):
        return SessionRefused(
            f"the gateway refused the connection (HTTP {exc.status}): {exc.message}"
        )
    return None


async def _handshake(
    ws: WebSocket, conn: Connection, hello: Hello, emit: Callable[[ClientEvent], None]
) -> Welcome:
    await ws.send(conn.send(hello))
    while True:
        event = conn.next_event()
        if event is None:
            data = await ws.receive()
            if not data:
                raise trio.BrokenResourceError(
                    f"the gateway closed the websocket during the handshake "
                    f"(code {ws.close_code}: {ws.close_reason or 'no reason'})"
                )
            conn.receive_data(data)
            continue
        if isinstance(event, Welcome):
            return event
        if isinstance(event, Progress):
            emit(Waiting(params=event.params))
        elif isinstance(event, Error):
            if event.code in (CloseCode.SESSION_CLOSED, CloseCode.REPLACED):
                raise SessionClosed(event.message, event.code)
            raise SessionRefused(event.message, event.code)
        elif isinstance(event, Ping):
            await ws.send(conn.send(Pong(payload=event.payload)))


def _certificate_error(exc: BaseException) -> bool:
    """Whether a connection failed because the server's certificate did not verify (retrying
    cannot help, unlike a network failure)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    """An error's text with its cause's: trio reports a failed TLS handshake as a bare
    ``BrokenResourceError`` whose cause (the ``SSLError``) says what went wrong, and a failed
    connect as "all attempts ... failed" whose cause is a group of the real errors."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


def _ssl_context(settings: ClientSettings) -> ssl.SSLContext | None:
    if not settings.url.startswith("wss://"):
        return None
    return client_ssl_context(str(settings.ca_file) if settings.ca_file else None)


async def serve_client(
    settings: ClientSettings,
    auth: NewSession | AttachSession,
    *,
    on_event: Callable[[ClientEvent], None] | None = None,
    task_status: trio.TaskStatus[TunnelClient] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the client side of a session until :meth:`TunnelClient.close` or a refusal.

    Raises :class:`SessionRefused` if the gateway refuses to open or attach the session and
    :class:`SessionClosed` if the server ends it; network failures are retried forever
    with exponential backoff and full jitter (bound the first connection with a timeout).
    """

    def emit(event: ClientEvent) -> None:
        if on_event is not None:
            on_event(event)

    conn = Connection(
        Role.CLIENT, max_frame_size=settings.max_frame_size, window=settings.stream_window
    )
    mux = Mux(
        conn,
        replay_limit=settings.replay_buffer_size,
        keepalive_interval=settings.keepalive_interval,
        keepalive_timeout=settings.keepalive_timeout,
        relay=settings.relay,
    )
    context = _ssl_context(settings)
    failure: Exception | None = None
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            try:
                await _connect_forever(
                    settings, auth, conn, mux, context, scope, nursery, emit, task_status
                )
            except (SessionRefused, SessionClosed, ProtocolError) as exc:
                failure = exc
            finally:
                mux.finish("the client stopped")  # also closes every spliced connection
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _connect_forever(
    settings: ClientSettings,
    auth: NewSession | AttachSession,
    conn: Connection,
    mux: Mux,
    context: ssl.SSLContext | None,
    scope: trio.CancelScope,
    nursery: trio.Nursery,
    emit: Callable[[ClientEvent], None],
    task_status: trio.TaskStatus[TunnelClient],
) -> None:
    client: TunnelClient | None = None
    session: SessionInfo | None = None
    attempt = 0
    while True:
        attempt += 1
        emit(Connecting(attempt=attempt, url=settings.url))
        attaching = session is not None or isinstance(auth, AttachSession)
        reason = ""
        ws: WebSocket | None = None
        try:
            with trio.fail_after(settings.connect_timeout):
                ws = await connect(
                    settings.url,
                    authorization=_authorization(auth, session),
                    receive_size=settings.receive_buffer_size,
                    ssl_context=context,
                )
            mode: Mode = "attach" if attaching else "new"
            params = auth.params if isinstance(auth, NewSession) else {}
            hello = Hello(mode=mode, params=params)
            if attaching:
                with trio.fail_after(settings.connect_timeout):
                    welcome = await _handshake(ws, conn, hello, emit)
            else:
                welcome = await _handshake(ws, conn, hello, emit)
            if session is None:
                secret = welcome.secret
                if secret is None and isinstance(auth, AttachSession):
                    secret = auth.secret
                session = SessionInfo(
                    session_id=welcome.session_id, secret=secret or "", info=welcome.info
                )
            elif welcome.info:
                session = attrs.evolve(session, info=welcome.info)
            if not welcome.resumed:
                mux.reset_streams(
                    "the gateway lost this connection's stream when the tunnel dropped"
                )
            if client is None:
                client = TunnelClient(mux, session, scope)
                if settings.listen:
                    listeners = await trio.open_tcp_listeners(
                        settings.listen_port, host=settings.listen_host
                    )
                    host, port = listeners[0].socket.getsockname()[:2]
                    client.local_address = (host, port)
                    nursery.start_soon(_accept_loop, mux, listeners)
                task_status.started(client)
            else:
                client.session = session
                client.reconnects += 1
            emit(Connected(session=session, resumed=welcome.resumed))
            log.info("tunnel connected", session_id=session.session_id)
            attempt = 0
            await mux.run(ws, conn.replay())
            reason = f"websocket closed (code {ws.close_code}: {ws.close_reason})"
            if ws.close_code in (CloseCode.SESSION_CLOSED, CloseCode.REPLACED):
                raise SessionClosed(ws.close_reason or "the server ended the session")
        except HandshakeRejected as exc:
            refused = _refusal(exc, attaching)
            if refused is not None:
                raise refused from None
            reason = f"HTTP {exc.status}: {exc.message}"
        except RemoteProtocolError:
            raise
        except ProtocolError as exc:
            if exc.close_code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
                reason = str(exc)
            else:
                raise
        except SessionClosed:
            mux.finish("the server ended the session")
            raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            if _certificate_error(exc):
                raise SessionRefused(
                    "the gateway's TLS certificate failed verification "
                    f"({exc.__cause__ or exc}); give the CA that signed it as ca_file"
                ) from None
            reason = _reason(exc)
        finally:
            if ws is not None:
                with trio.CancelScope(shield=True):
                    await ws.aclose()
        conn.connection_lost()
        ceiling = min(
            settings.reconnect_max_delay,
            settings.reconnect_initial_delay * 2 ** max(attempt - 1, 0),
        )
        delay = random.uniform(0, ceiling)  # noqa: S311 - jitter, not crypto
        emit(Disconnected(reason=reason, retry_in=delay))
        log.info("tunnel disconnected", reason=reason, retry_in=round(delay, 3))
        await trio.sleep(delay)


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE = 0.1
"""Seconds accepting pauses when the process is out of file descriptors or memory."""


async def _accept_loop(mux: Mux, listeners: list[trio.SocketListener]) -> None:
    """Accept local connections in the relay task, each joined to a new stream by a
    :class:`Pipe`: no task and no scheduler pass per connection."""
    relay = mux.relay()
    socks = [socket.socket(fileno=listener.socket.detach()) for listener in listeners]
    out_of_resources = trio.Event()

    def acceptor(listening: socket.socket) -> Callable[[int], None]:
        def on_readable(events: int) -> None:
            # One connection per call: the listener stays readable while more wait (the
            # relay calls again), and no failing accept() delays this one's first bytes.
            try:
                sock, _address = listening.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.warning("tunnel client cannot accept", error=str(exc))
                    out_of_resources.set()
                    for listening_sock in socks:
                        relay.remove(listening_sock.fileno(), handlers[listening_sock])
                return  # else (ECONNABORTED and the like) that client gave up
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                mux.hold()  # the OPEN frame and the first bytes go in one message
                try:
                    Pipe(mux.open_stream(), sock, relay, read_now=True)
                finally:
                    mux.release()
            except (OSError, trio.BrokenResourceError):
                sock.close()

        return on_readable

    handlers = {listening: acceptor(listening) for listening in socks}
    try:
        for listening in socks:
            listening.setblocking(False)
        while True:
            for listening, handler in handlers.items():
                relay.add(listening.fileno(), handler)
            await out_of_resources.wait()
            out_of_resources = trio.Event()
            await trio.sleep(_ACCEPT_PAUSE)
    finally:
        for listening, handler in handlers.items():
            relay.remove(listening.fileno(), handler)
            listening.close()


class ControlChannel:
    """A control-only connection (no session): ``await channel.request("status")``."""

    def __init__(self, mux: Mux) -> None:
        self._mux = mux

    async def request(self, name: str, args: JSONObject | None = None) -> JSONValue:
        response = await self._mux.request(name, args or {})
        if response.error is not None:
            raise ControlError(response.error)
        return response.result


def _control_url(url: str) -> str:
    """The gateway URL with ``mode=control`` in its query: a full gateway (max_sessions)
    still admits control connections, and says so before the upgrade."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("mode", "control")])
    return urllib.parse.urlunsplit(parts._replace(query=query))


@asynccontextmanager
async def open_control(settings: ClientSettings, token: str) -> AsyncIterator[ControlChannel]:
    """Open a control-only connection with the instance token (for status, snapshots)."""
    conn = Connection(
        Role.CLIENT, max_frame_size=settings.max_frame_size, window=settings.stream_window
    )
    try:
        with trio.fail_after(settings.connect_timeout):
            ws = await connect(
                _control_url(settings.url),
                authorization=f"Bearer {token}",
                receive_size=settings.receive_buffer_size,
                ssl_context=_ssl_context(settings),
            )
    except HandshakeRejected as exc:
        raise _refusal(exc, False) or SessionRefused(str(exc)) from None
    mux = Mux(
        conn,
        replay_limit=settings.replay_buffer_size,
        keepalive_interval=settings.keepalive_interval,
        keepalive_timeout=settings.keepalive_timeout,
        relay=settings.relay,
    )
    try:
        with trio.fail_after(settings.connect_timeout):
            await _handshake(ws, conn, Hello(mode="control"), lambda event: None)

        async def carry() -> None:
            try:
                await mux.run(ws, conn.replay())  # also what was sent before it ran
            finally:
                mux.finish("the control connection to the gateway was lost")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(carry)
            yield ControlChannel(mux)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await ws.aclose()
