"""Test helpers for the tunnel: a dict-backed hooks fake, TCP servers, a gateway on loopback."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsRequest

from aldaas.tunnel import (
    ClientSettings,
    ControlError,
    Gateway,
    GatewaySettings,
    JSONObject,
    JSONValue,
    LegacyRoute,
    ProgressCallback,
    SessionGrant,
    SessionRefused,
    serve_gateway,
)
from aldaas.tunnel._mux import Mux, TunnelStream
from aldaas.tunnel._protocol import Connection, Hello, Role, Welcome
from aldaas.tunnel._ws import WebSocket

TOKEN = "instance-token-123"


@attrs.define
class FakeHooks:
    """The broker's side, as dicts: sessions, secrets and where each session's streams go."""

    address: tuple[str, int] = ("127.0.0.1", 1)
    secrets: dict[str, str] = attrs.field(factory=dict)
    addresses: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    log: list[tuple[str, ...]] = attrs.field(factory=list)
    traffic_seen: dict[str, list[int]] = attrs.field(factory=dict)
    refuse_with: str | None = None
    progress_steps: list[JSONObject] = attrs.field(factory=list)
    gate: trio.Event | None = None
    opened: int = 0

    async def open_session(self, params: JSONObject, progress: ProgressCallback) -> SessionGrant:
        for step in self.progress_steps:
            progress(step)
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse_with is not None:
            raise SessionRefused(self.refuse_with)
        self.opened += 1
        session_id = f"s{self.opened}"
        self.secrets[session_id] = f"secret-{session_id}"
        self.addresses[session_id] = self.address
        self.log.append(("open", session_id, str(params.get("name", ""))))
        return SessionGrant(
            session_id=session_id, secret=self.secrets[session_id], info={"user": "u1"}
        )

    async def verify_session(self, session_id: str, secret: str) -> bool:
        await trio.lowlevel.checkpoint()
        expected = self.secrets.get(session_id)
        return expected is not None and hmac.compare_digest(expected, secret)

    def resolve(self, session_id: str) -> tuple[str, int]:
        return self.addresses[session_id]

    async def control(self, session_id: str | None, name: str, args: JSONObject) -> JSONValue:
        await trio.lowlevel.checkpoint()
        if name == "status":
            return {"session": session_id, "args": args}
        raise ControlError(f"unknown request {name!r}; try status")

    async def resolve_legacy(self, name: str, session: str) -> LegacyRoute:
        await trio.lowlevel.checkpoint()
        self.log.append(("legacy", name, session))
        return LegacyRoute(session_id=session, host=self.address[0], port=self.address[1])

    def attached(self, session_id: str) -> None:
        self.log.append(("attached", session_id))

    def detached(self, session_id: str) -> None:
        self.log.append(("detached", session_id))

    def traffic(self, session_id: str, bytes_up: int, bytes_down: int) -> None:
        seen = self.traffic_seen.setdefault(session_id, [0, 0])
        seen[0] += bytes_up
        seen[1] += bytes_down

    def session_ended(self, session_id: str, reason: str) -> None:
        self.log.append(("ended", session_id, reason))


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo every byte back; half-close when the client does."""
    try:
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    await stream.send_eof()
                    return
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def receive_exactly(
    stream: trio.abc.ReceiveStream,
    size: int,
    *,
    max_bytes: int | None = None,
    check: Callable[[], None] | None = None,
) -> bytes:
    """Receive ``size`` bytes (EOF before is a failure), calling ``check()`` after every
    read: an invariant that must hold all along."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(max_bytes)
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
        if check is not None:
            check()
    return bytes(data)


def send_in_background(
    nursery: trio.Nursery, stream: trio.abc.SendStream, payload: bytes
) -> trio.Event:
    """Start sending ``payload`` on ``stream``; the event is set once all of it went out."""
    sent = trio.Event()

    async def send() -> None:
        await stream.send_all(payload)
        sent.set()

    nursery.start_soon(send)
    return sent


async def start_tcp_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port


@attrs.define
class Rig:
    gateway: Gateway
    hooks: FakeHooks
    url: str
    nursery: trio.Nursery

    def client_settings(self, **changes: Any) -> ClientSettings:
        return attrs.evolve(ClientSettings(url=self.url), **changes)


def gateway_settings(**changes: Any) -> GatewaySettings:
    return GatewaySettings(host="127.0.0.1", port=0, instance_token=TOKEN, **changes)


async def start_rig(nursery: trio.Nursery, hooks: FakeHooks | None = None, **changes: Any) -> Rig:
    hooks = hooks or FakeHooks()
    hooks.address = await start_tcp_server(nursery, echo_handler)
    gateway = await nursery.start(serve_gateway, gateway_settings(**changes), hooks)
    return Rig(gateway, hooks, f"ws://127.0.0.1:{gateway.port}/tunnel", nursery)


@attrs.define
class CutProxy:
    """A TCP relay in front of the gateway that the test can cut, like a Wi-Fi switch."""

    target: tuple[str, int]
    port: int = 0
    connections: list[tuple[trio.SocketStream, trio.SocketStream]] = attrs.field(factory=list)
    refuse: bool = False

    async def handler(self, downstream: trio.SocketStream) -> None:
        if self.refuse:
            await downstream.aclose()
            return
        upstream = await trio.open_tcp_stream(*self.target)
        pair = (downstream, upstream)
        self.connections.append(pair)

        async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
            try:
                while True:
                    data = await a.receive_some(65536)
                    if not data:
                        break
                    await b.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, downstream, upstream)
                nursery.start_soon(pump, upstream, downstream)
        finally:
            upstream.socket.close()
            downstream.socket.close()

    async def cut(self) -> None:
        """Drop every relayed connection at once, without closing handshakes."""
        for a, b in self.connections:
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)
        self.connections.clear()


async def start_cut_proxy(nursery: trio.Nursery, target: tuple[str, int]) -> CutProxy:
    proxy = CutProxy(target=target)
    _, proxy.port = await start_tcp_server(nursery, proxy.handler)
    return proxy


def ws_pair() -> tuple[WSConnection, WSConnection]:
    """A client and a server wsproto connection past the upgrade, nothing else sent."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(WsRequest(host="test", target="/tunnel")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    return client, server


async def mux_pair(
    nursery: trio.Nursery, *, window: int = 64 * 1024, replay_limit: int = 8 * 1024 * 1024
) -> tuple[Mux, trio.MemoryReceiveChannel[TunnelStream]]:
    """Two muxes joined by an in-memory websocket; the server side's streams come out of the
    returned channel (no gateway, no TCP: the streams themselves are under test)."""
    client_end, server_end = trio.testing.memory_stream_pair()
    cws, sws = ws_pair()
    cconn = Connection(Role.CLIENT, window=window)
    sconn = Connection(Role.SERVER, window=window)
    sconn.receive_data(cconn.send(Hello(mode="new")))
    list(sconn.events())
    cconn.receive_data(sconn.send(Welcome(session_id="pair")))
    list(cconn.events())
    send, receive = trio.open_memory_channel[TunnelStream](1000)
    options = {"replay_limit": replay_limit, "keepalive_interval": 1e6, "keepalive_timeout": 1e7}
    client = Mux(cconn, **options)
    server = Mux(sconn, on_stream=send.send_nowait, **options)
    nursery.start_soon(client.run, WebSocket(client_end, cws, 65536), b"")
    nursery.start_soon(server.run, WebSocket(server_end, sws, 65536), b"")
    await trio.testing.wait_all_tasks_blocked()  # both websockets attached
    return client, receive
