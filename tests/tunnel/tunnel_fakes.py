"""Test helpers for the tunnel: a dict-backed hooks fake, TCP servers, a gateway on loopback."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from tunnel import (
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

    async def resolve(self, session_id: str) -> tuple[str, int]:
        await trio.lowlevel.checkpoint()
        return self.addresses[session_id]

    async def control(self, session_id: str | None, name: str, args: JSONObject) -> JSONValue:
        await trio.lowlevel.checkpoint()
        if name == "status":
            return {"session": session_id, "args": args}
        raise ControlError(f"unknown request {name!r}; try status")

    async def resolve_legacy(self, name: str, session: str) -> LegacyRoute:
        await trio.lowlevel.checkpoint()
        return LegacyRoute(
            session_id=f"legacy-{name}-{session}", host=self.address[0], port=self.address[1]
        )

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
        return ClientSettings(url=self.url, **changes)


def gateway_settings(**changes: Any) -> GatewaySettings:
    return GatewaySettings(host="127.0.0.1", port=0, instance_token=TOKEN, **changes)


async def start_rig(nursery: trio.Nursery, hooks: FakeHooks | None = None, **changes: Any) -> Rig:
    hooks = hooks or FakeHooks()
    hooks.address = await start_tcp_server(nursery, echo_handler)
    gateway = await nursery.start(serve_gateway, gateway_settings(**changes), hooks)
    return Rig(gateway, hooks, f"ws://127.0.0.1:{gateway.port}/tunnel", nursery)
