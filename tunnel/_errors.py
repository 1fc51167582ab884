"""Errors of the tunnel, each saying whose fault it is and carrying the close code to send."""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Websocket close codes the tunnel uses (RFC 6455 ones and 4000-4999 private ones)."""

    NORMAL = 1000
    """The session or connection ended on purpose."""
    GOING_AWAY = 1001
    """The gateway is shutting down; the client may reconnect and resume."""
    PROTOCOL_ERROR = 1002
    """A frame was malformed or illegal in the current state."""
    POLICY_VIOLATION = 1008
    """The peer broke a limit (too many sessions, handshake too slow)."""
    FRAME_TOO_BIG = 1009
    """A frame announced a payload larger than the receiver's maximum."""
    INTERNAL_ERROR = 1011
    """The sender hit a bug or an unexpected failure."""
    SESSION_CLOSED = 4000
    """The server closed the session for good (lease released, killed, expired)."""
    SESSION_REFUSED = 4001
    """The server refused to open a session; the error frame says why."""
    HANDSHAKE_TIMEOUT = 4002
    """The peer did not finish the handshake in time."""
    REPLACED = 4003
    """Another connection attached to the same session and took it over."""


class TunnelError(Exception):
    """Base class of every error the tunnel raises on purpose."""


class ProtocolError(TunnelError):
    """A frame could not be produced or accepted; ``close_code`` is what to close with."""

    def __init__(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (a bug or an attack on its side)."""


class SessionRefused(TunnelError):
    """The server refused to open or attach a session; the message says why, in one sentence.

    Raised by a gateway hook to refuse (its message reaches the client), and raised by the
    client library when the server refused: the caller decides what to do (exit, open anew).
    """

    def __init__(self, message: str, close_code: int = CloseCode.SESSION_REFUSED) -> None:
        super().__init__(message)
        self.close_code = close_code


class SessionClosed(TunnelError):
    """The session ended for good (closed by the server, or the peer went away for good)."""

    def __init__(self, message: str, close_code: int = CloseCode.SESSION_CLOSED) -> None:
        super().__init__(message)
        self.close_code = close_code


class ControlError(TunnelError):
    """A control request failed; raised by a hook to answer with an error, and by the client."""
