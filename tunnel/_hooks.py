"""What the gateway asks of its owner (the broker; tests plug a dict-backed fake)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

from aldaas.tunnel._protocol import JSONObject, JSONValue

ProgressCallback = Callable[[JSONObject], None]
"""Sends a PROGRESS frame to the waiting client (queue position, ETA, ...); never blocks."""


@attrs.frozen(kw_only=True)
class SessionGrant:
    """A new session: its id, the secret to attach again, and info shown to the client."""

    session_id: str
    secret: str = attrs.field(repr=False)
    info: JSONObject = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class LegacyRoute:
    """Where a legacy ``/{name}/{token}/{session}`` websocket goes, and whose traffic it is."""

    session_id: str
    host: str
    port: int


class GatewayHooks(Protocol):
    """Callbacks of :func:`tunnel.serve_gateway`.

    Raise :class:`tunnel.SessionRefused` from ``open_session`` / ``resolve_legacy`` and
    :class:`tunnel.ControlError` from ``control``: their one-sentence message reaches the
    client. Any other exception is reported to the client as an internal error, without detail.
    """

    async def open_session(self, params: JSONObject, progress: ProgressCallback) -> SessionGrant:
        """Open a new session for a client whose instance token was verified. May wait long."""
        ...

    async def verify_session(self, session_id: str, secret: str) -> bool:
        """Whether ``secret`` is the secret of ``session_id`` (compare in constant time).

        Raise :class:`SessionRefused` to refuse with its message instead of the generic
        "unknown session" (e.g. the session ended, and the client should learn why).
        """
        ...

    def resolve(self, session_id: str) -> tuple[str, int]:
        """The TCP address a new stream of ``session_id`` connects to (asked per stream, in
        the relay's callback: must not block; an IP literal is connected without a task)."""
        ...

    async def control(self, session_id: str | None, name: str, args: JSONObject) -> JSONValue:
        """Answer a control request; ``session_id`` is None on a control-only connection."""
        ...

    async def resolve_legacy(self, name: str, session: str) -> LegacyRoute:
        """Route a legacy websocket (only called if the legacy endpoint is enabled)."""
        ...

    def attached(self, session_id: str) -> None:
        """A websocket carries the session now."""
        ...

    def detached(self, session_id: str) -> None:
        """The session lost its websocket; it waits for a resumption (grace period)."""
        ...

    def traffic(self, session_id: str, bytes_up: int, bytes_down: int) -> None:
        """Stream bytes moved since the last report (up = client to server)."""
        ...

    def session_ended(self, session_id: str, reason: str) -> None:
        """The session is gone for good (grace period over, closed, or the gateway stopped)."""
        ...
