"""The admin and health HTTP listener: probes, metrics, and a small JSON admin API.

It listens on its own port (never the gateway's), speaks HTTP/1.1 through
h11 (no hand-rolled parsing) and knows nothing about pools or tunnels: the
broker hands it an :class:`AdminBackend`.

==========================  ======  ==========================================
route                       auth    answer
==========================  ======  ==========================================
``GET /healthz``            none    200 while the process serves HTTP at all
``GET /readyz``             none    200 when a ready snapshot exists and the
                                    pool hands out, else 503
``GET /metrics``            none    Prometheus text exposition
``GET /api/status``         admin   pool, leases (no secrets), snapshots
``POST /api/leases/ID/kill`` admin  end lease ``ID`` now
``POST /api/refresh``       admin   look for new backups now
``POST /api/drain``         admin   stop handing out leases (existing ones
                                    keep working)
==========================  ======  ==========================================

``admin`` means ``Authorization: Bearer <admin token>``, compared in constant
time. With no admin token configured the API answers 403 and the probes and
metrics keep working. Every error body is ``{"error": "<one sentence>"}``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import h11
import structlog
import trio

from ._metrics import EXPOSITION_CONTENT_TYPE

log = structlog.get_logger("aldaas.admin")

MAX_BODY_BYTES = 64 * 1024
"""Admin requests carry no meaningful body; anything bigger is refused."""


class StartupError(Exception):
    """A listener could not start (port in use, address not local); one sentence to show."""


class AdminBackend(Protocol):
    """What the admin listener asks the broker."""

    def is_ready(self) -> tuple[bool, str]:
        """Whether ``/readyz`` should answer 200, and a one-sentence reason when it should not."""
        ...

    def status(self) -> Mapping[str, Any]:
        """JSON-serialisable status of pool, leases (never their secrets) and snapshots."""
        ...

    async def kill_lease(self, lease_id: str) -> bool:
        """End lease ``lease_id`` now; ``False`` if there is no such lease."""
        ...

    async def refresh(self) -> None:
        """Look for new or changed backups now."""
        ...

    async def drain(self) -> None:
        """Stop handing out leases; existing leases keep working."""
        ...


@attrs.frozen(kw_only=True)
class Request:
    method: str
    target: str
    headers: Mapping[str, str]
    """Lower-cased header names; a repeated header keeps its last value."""
    body: bytes


@attrs.frozen(kw_only=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any, **kw: Any) -> Response:
        body = json.dumps(payload, sort_keys=True, default=str).encode() + b"\n"
        return cls(status=status, body=body, **kw)

    @classmethod
    def error(cls, status: int, sentence: str, **kw: Any) -> Response:
        return cls.json(status, {"error": sentence}, **kw)


class AdminApp:
    """Routes one parsed request to the backend; pure of sockets so it reads like a table."""

    def __init__(
        self, backend: AdminBackend, exposition: Callable[[], bytes], *, token: str | None
    ) -> None:
        self._backend = backend
        self._exposition = exposition
        self._token = token.encode() if token else None

    async def handle(self, request: Request) -> Response:
        path = request.target.split("?", 1)[0]
        if path == "/healthz":
            return self._only(request, "GET") or Response.json(200, {"status": "alive"})
        if path == "/readyz":
            if wrong := self._only(request, "GET"):
                return wrong
            ready, reason = self._backend.is_ready()
            if ready:
                return Response.json(200, {"status": "ready"})
            return Response.json(503, {"status": "not ready", "reason": reason})
        if path == "/metrics":
            if wrong := self._only(request, "GET"):
                return wrong
            return Response(
                status=200, body=self._exposition(), content_type=EXPOSITION_CONTENT_TYPE
            )
        if path == "/api" or path.startswith("/api/"):
            if denied := self._authorize(request):
                return denied
            return await self._api(request, path)
        return Response.error(
            404,
            f"There is no admin route {path!r}; use /healthz, /readyz, /metrics or /api/status.",
        )

    async def _api(self, request: Request, path: str) -> Response:
        if path == "/api/status":
            return self._only(request, "GET") or Response.json(200, self._backend.status())
        if path == "/api/refresh":
            if wrong := self._only(request, "POST"):
                return wrong
            await self._backend.refresh()
            return Response.json(202, {"refresh": "started"})
        if path == "/api/drain":
            if wrong := self._only(request, "POST"):
                return wrong
            await self._backend.drain()
            return Response.json(202, {"drain": "started"})
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "api", "leases"] and parts[4] == "kill":
            if wrong := self._only(request, "POST"):
                return wrong
            lease_id = parts[3]
            if await self._backend.kill_lease(lease_id):
                return Response.json(200, {"killed": lease_id})
            return Response.error(
                404, f"There is no lease {lease_id!r}; list the leases with GET /api/status."
            )
        return Response.error(
            404,
            f"There is no admin API route {path!r}; use /api/status, /api/refresh, /api/drain "
            "or /api/leases/<id>/kill.",
        )

    def _authorize(self, request: Request) -> Response | None:
        if self._token is None:
            return Response.error(
                403, "The admin API is disabled because no admin token is set; set admin.token."
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            return Response.error(
                401,
                "The admin token is missing or wrong; send 'Authorization: Bearer <admin token>'.",
                headers=(("WWW-Authenticate", 'Bearer realm="aldaas-admin"'),),
            )
        return None

    @staticmethod
    def _only(request: Request, method: str) -> Response | None:
        if request.method == method:
            return None
        return Response.error(
            405,
            f"Method {request.method} is not allowed on {request.target!r}; use {method}.",
            headers=(("Allow", method),),
        )


async def serve_admin(
    app: AdminApp,
    *,
    host: str,
    port: int,
    idle_timeout: float = 30.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (``0`` picks a free port) and serve ``app`` until cancelled.

    Reports the bound port through ``task_status``.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError(
            f"The admin listener cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "set admin.listen/admin.port to a free address."
        ) from None
    bound = listeners[0].socket.getsockname()[1]
    log.info("admin listening", host=host, port=bound)

    async def handler(stream: trio.SocketStream) -> None:
        # One connection's failure must never end the listener (and /healthz with it).
        try:
            await _serve_connection(stream, app, idle_timeout)
        except Exception:
            log.exception("admin connection failed")

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


async def _serve_connection(stream: trio.SocketStream, app: AdminApp, idle_timeout: float) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    async with stream:
        try:
            while True:
                request: Request | None = None
                with trio.move_on_after(idle_timeout):
                    request = await _read_request(conn, stream)
                if request is None:
                    return  # closed by the peer, or idle for too long
                await _send_response(conn, stream, await _answer(app, request))
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                sentence = f"The request could not be parsed ({exc}); send valid HTTP/1.1."
                response = Response.error(exc.error_status_hint, sentence)
                with trio.move_on_after(idle_timeout):
                    await _send_response(conn, stream, response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _answer(app: AdminApp, request: Request) -> Response:
    """``app``'s response, or a 500 naming the failure when a handler (the backend) raises."""
    try:
        return await app.handle(request)
    except Exception as exc:
        path = request.target.split("?", 1)[0]
        log.exception("admin request failed", method=request.method, path=path)
        return Response.error(
            500,
            f"The broker failed while answering {request.method} {path!r} "
            f"({type(exc).__name__}); see the broker's log for the cause.",
        )


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16 * 1024)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError(
                    f"body larger than {MAX_BODY_BYTES} bytes", error_status_hint=413
                )
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(
                method=head.method.decode(),
                target=head.target.decode("latin-1"),
                headers=headers,
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # pragma: no cover - h11 yields nothing else to a server
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")


async def _send_response(conn: h11.Connection, stream: trio.SocketStream, r: Response) -> None:
    headers = [
        ("Content-Type", r.content_type),
        ("Content-Length", str(len(r.body))),
        ("Cache-Control", "no-store"),
        *r.headers,
    ]
    out = bytearray()
    for event in (h11.Response(status_code=r.status, headers=headers), h11.Data(data=r.body)):
        out += conn.send(event) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(bytes(out))
