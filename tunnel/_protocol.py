"""The wire protocol as a pure state machine: bytes in, events out, ``send(event) -> bytes``.

Nothing here does I/O, reads a clock or logs (see docs/protocol.md for the format). One
:class:`Connection` object lives as long as a *session*, across any number of websockets:
when a websocket drops, the I/O layer calls :meth:`Connection.connection_lost`, opens a new
websocket, handshakes again and calls :meth:`Connection.replay` to resend what the peer has
not received. Sequenced frames are counted in bytes ("offsets"); each side acknowledges what
it received, and keeps what it sent until the peer acknowledges it (the replay buffer).
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Iterator
from typing import Literal, TypeAlias

import attrs

from aldaas.tunnel._errors import CloseCode, LocalProtocolError, RemoteProtocolError

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"
JSONObject: TypeAlias = "dict[str, JSONValue]"

PROTOCOL_VERSION = 1
SUBPROTOCOL = "aldaas.v1"
"""The websocket subprotocol; a new incompatible wire format gets a new one (``aldaas.v2``)."""

HEADER = struct.Struct("!BBHII")
"""type (u8), flags (u8), reserved (u16, zero), stream or request id (u32), payload length (u32)."""
HEADER_SIZE = HEADER.size
MAX_DATA_CHUNK = 64 * 1024
"""The largest DATA payload a sender puts in one frame; bigger writes are split."""
MIN_MAX_FRAME_SIZE = MAX_DATA_CHUNK
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")

FLAG_FIN = 0x01


class FrameType(enum.IntEnum):
    """Frame types; values below 0x10 are per-websocket, the others belong to the session."""

    HELLO = 0x01
    WELCOME = 0x02
    PROGRESS = 0x03
    ERROR = 0x04
    PING = 0x05
    PONG = 0x06
    ACK = 0x07
    GOAWAY = 0x10
    OPEN = 0x11
    DATA = 0x12
    WINDOW = 0x13
    RESET = 0x14
    REQUEST = 0x20
    RESPONSE = 0x21


SEQUENCED = frozenset(t for t in FrameType if t >= 0x10)
"""Frame types that count towards offsets and are replayed after a resumption."""
_TYPES = {int(t): t for t in FrameType}


class ResetCode(enum.IntEnum):
    """Why a stream was reset."""

    CANCELLED = 1
    """The application closed the stream without finishing it."""
    CONNECT_FAILED = 2
    """The gateway could not connect to the address the session resolves to."""
    REFUSED = 3
    """A limit refused the stream (too many streams, session going away)."""
    CONNECTION_LOST = 4
    """The TCP connection at one end broke."""
    INTERNAL_ERROR = 5
    """A bug or unexpected failure at the sender."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Handshake state of the current websocket (the session itself outlives it)."""

    IDLE = "idle"
    """No handshake yet on this websocket (or none at all)."""
    HELLO = "hello"
    """The client's hello was sent/received; the server has not welcomed it yet."""
    OPEN = "open"
    """Welcomed: every frame type is allowed."""
    CLOSED = "closed"
    """An error frame was sent or received: the session is over."""


Mode = Literal["new", "attach", "control"]
MODES: tuple[Mode, ...] = ("new", "attach", "control")


# ---------------------------------------------------------------------------- events


@attrs.frozen(kw_only=True)
class Hello:
    """Client → server, first frame on every websocket."""

    mode: Mode
    params: JSONObject = attrs.field(factory=dict)
    received: int = 0
    """Sequenced bytes the client has received from the server (filled in on send)."""
    window: int = 256 * 1024
    """Per-stream credit the client grants the server (filled in on send)."""
    fresh: bool = False
    """On an attach HELLO: the client has no replay state (it was never welcomed in this
    session, e.g. a new process with a cached id and secret), so it cannot resume the old
    streams (filled in on send). Absent on the wire means False (older clients)."""


@attrs.frozen(kw_only=True)
class Welcome:
    """Server → client: the session is open (or resumed)."""

    session_id: str
    secret: str | None = None
    """Only for a new session: what the client must present to attach again."""
    info: JSONObject = attrs.field(factory=dict)
    resumed: bool = False
    """True if the server kept the session's streams: both sides replay what the other missed."""
    received: int = 0
    """Sequenced bytes the server has received from the client (filled in on send)."""
    window: int = 256 * 1024
    """Per-stream credit the server grants the client (filled in on send)."""


@attrs.frozen(kw_only=True)
class Progress:
    """Server → client while a new session waits (queue position, ETA, ...)."""

    params: JSONObject


@attrs.frozen(kw_only=True)
class Error:
    """The last frame of a session that failed; ``message`` is one sentence for a human."""

    code: int
    message: str


@attrs.frozen(kw_only=True)
class Ping:
    payload: bytes


@attrs.frozen(kw_only=True)
class Pong:
    payload: bytes


@attrs.frozen(kw_only=True)
class Acknowledged:
    """Received only: the peer has everything we sent up to ``offset`` (replay room freed)."""

    offset: int


@attrs.frozen(kw_only=True)
class GoAway:
    """No new streams will be accepted; open ones may finish."""

    reason: str


@attrs.frozen(kw_only=True)
class OpenStream:
    stream_id: int


@attrs.frozen(kw_only=True)
class Data:
    stream_id: int
    data: bytes
    fin: bool = False


@attrs.frozen(kw_only=True)
class WindowUpdate:
    """Received only: the peer consumed data, ``stream_id`` may send ``increment`` more bytes."""

    stream_id: int
    increment: int


@attrs.frozen(kw_only=True)
class ResetStream:
    stream_id: int
    code: int
    reason: str = ""


@attrs.frozen(kw_only=True)
class Request:
    """Client → server: a control request (``reset``, ``status``, ...)."""

    request_id: int
    name: str
    args: JSONObject = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Response:
    """Server → client: ``result`` if ``error`` is None, else ``error`` is one sentence."""

    request_id: int
    result: JSONValue = None
    error: str | None = None


Event: TypeAlias = (
    Hello
    | Welcome
    | Progress
    | Error
    | Ping
    | Pong
    | Acknowledged
    | GoAway
    | OpenStream
    | Data
    | WindowUpdate
    | ResetStream
    | Request
    | Response
)


# ---------------------------------------------------------------------------- state table

_HANDSHAKE_TABLE: dict[tuple[Role, bool, State, FrameType], State] = {
    # (role, sent_by_us, state, frame) -> new state; frames not listed keep the state if
    # the state is OPEN, and are illegal otherwise.
    (Role.CLIENT, True, State.IDLE, FrameType.HELLO): State.HELLO,
    (Role.CLIENT, False, State.HELLO, FrameType.PROGRESS): State.HELLO,
    (Role.CLIENT, False, State.HELLO, FrameType.WELCOME): State.OPEN,
    (Role.CLIENT, False, State.HELLO, FrameType.ERROR): State.CLOSED,
    (Role.CLIENT, False, State.OPEN, FrameType.ERROR): State.CLOSED,
    (Role.CLIENT, True, State.HELLO, FrameType.ERROR): State.CLOSED,
    (Role.CLIENT, True, State.OPEN, FrameType.ERROR): State.CLOSED,
    (Role.SERVER, False, State.IDLE, FrameType.HELLO): State.HELLO,
    (Role.SERVER, True, State.HELLO, FrameType.PROGRESS): State.HELLO,
    (Role.SERVER, True, State.HELLO, FrameType.WELCOME): State.OPEN,
    (Role.SERVER, True, State.HELLO, FrameType.ERROR): State.CLOSED,
    (Role.SERVER, True, State.OPEN, FrameType.ERROR): State.CLOSED,
    (Role.SERVER, False, State.HELLO, FrameType.ERROR): State.CLOSED,
    (Role.SERVER, False, State.OPEN, FrameType.ERROR): State.CLOSED,
}
_ALWAYS = frozenset({FrameType.PING, FrameType.PONG})
"""Allowed in HELLO and OPEN states without changing them (keepalive while a client waits)."""
_OPEN_ONLY = frozenset(
    {
        FrameType.ACK,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOAWAY,
        FrameType.DATA,
        FrameType.WINDOW,
        FrameType.RESET,
    }
)
"""Frames either side may send in OPEN state without changing it (the hot path skips the
table for them: ``_transition`` would return OPEN)."""
_CLIENT_SENDS = frozenset({FrameType.HELLO, FrameType.OPEN, FrameType.REQUEST})
_SERVER_SENDS = frozenset({FrameType.WELCOME, FrameType.PROGRESS, FrameType.RESPONSE})


def _transition(role: Role, ours: bool, state: State, frame: FrameType) -> State:
    sender = role if ours else (Role.SERVER if role is Role.CLIENT else Role.CLIENT)
    error = LocalProtocolError if ours else RemoteProtocolError
    if (frame in _CLIENT_SENDS and sender is not Role.CLIENT) or (
        frame in _SERVER_SENDS and sender is not Role.SERVER
    ):
        raise error(f"a {sender.value} must not send {frame.name} frames")
    new = _HANDSHAKE_TABLE.get((role, ours, state, frame))
    if new is not None:
        return new
    if state is State.OPEN and frame not in (FrameType.HELLO, FrameType.WELCOME):
        return state
    if state is State.HELLO and frame in _ALWAYS:
        return state
    verb = "send" if ours else "receive"
    raise error(f"cannot {verb} {frame.name} in handshake state {state.value}")


# ---------------------------------------------------------------------------- streams


@attrs.define(kw_only=True)
class _Stream:
    send_window: int
    recv_window: int
    consumed: int = 0
    local_closed: bool = False
    remote_closed: bool = False


def _json_payload(value: JSONObject) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _parse_json_object(payload: bytes, frame: FrameType) -> JSONObject:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{frame.name} frame does not carry valid JSON") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{frame.name} frame must carry a JSON object")
    result: JSONObject = value
    return result


def _field(obj: JSONObject, key: str, kind: type, frame: FrameType) -> JSONValue:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RemoteProtocolError(
            f"{frame.name} field {key!r} must be a {kind.__name__}, got {type(value).__name__}"
        )
    result: JSONValue = value
    return result


def _offset_field(obj: JSONObject, key: str, frame: FrameType) -> int:
    value = _field(obj, key, int, frame)
    assert isinstance(value, int)
    if value < 0 or value >= 2**63:
        raise RemoteProtocolError(f"{frame.name} field {key!r} is out of range: {value}")
    return value


def _window_field(obj: JSONObject, frame: FrameType) -> int:
    value = _field(obj, "window", int, frame)
    assert isinstance(value, int)
    if not 1 <= value <= MAX_WINDOW:
        raise RemoteProtocolError(f"{frame.name} window {value} is outside 1..{MAX_WINDOW}")
    return value


class Connection:
    """One side of one tunnel session.

    ``max_frame_size`` bounds the payload of any frame we accept; ``window`` is the
    per-stream credit we grant the peer (announced in our hello or welcome).
    """

    def __init__(
        self, role: Role, *, max_frame_size: int = 1024 * 1024, window: int = 256 * 1024
    ) -> None:
        if max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_MAX_FRAME_SIZE}")
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be within 1..{MAX_WINDOW}")
        self.role = role
        self.max_frame_size = max_frame_size
        self.window = window
        self.state = State.IDLE
        self._buffer: bytes | bytearray = b""
        self._pos = 0
        self._error: RemoteProtocolError | None = None
        self._peer_hello_received = 0
        self._peer_hello_fresh = False
        self._reset_session()

    def _reset_session(self) -> None:
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._peer_window = 256 * 1024
        self._received = 0
        self._acked_received = 0
        self._sent = 0
        self._replay: deque[bytes] = deque()
        self._replay_start = 0
        self._next_request_id = 1
        self._pending_requests: set[int] = set()
        self.goaway_sent = False
        self.goaway_received = False
        self._established = False

    # ------------------------------------------------------------------ inspection

    @property
    def received_offset(self) -> int:
        """Sequenced bytes received from the peer so far."""
        return self._received

    @property
    def sent_offset(self) -> int:
        """Sequenced bytes sent so far."""
        return self._sent

    @property
    def replay_size(self) -> int:
        """Sequenced bytes sent but not yet acknowledged (kept for a resumption)."""
        return self._sent - self._replay_start

    @property
    def unacknowledged_received(self) -> int:
        """Sequenced bytes received since we last told the peer (see :meth:`ack`)."""
        return self._received - self._acked_received

    @property
    def established(self) -> bool:
        """Whether the session was welcomed (streams may be used, even while detached)."""
        return self._established

    @property
    def stream_ids(self) -> frozenset[int]:
        return frozenset(self._streams)

    def send_window(self, stream_id: int) -> int:
        """How many bytes we may send on ``stream_id`` now (0 for an unknown stream)."""
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def next_stream_id(self) -> int:
        return self._last_stream_id + 1

    def next_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    # ------------------------------------------------------------------ transport changes

    def connection_lost(self) -> None:
        """The websocket is gone: drop partial input; a new handshake must follow."""
        self._buffer = b""
        self._pos = 0
        self._error = None
        self._peer_hello_received = 0
        self._peer_hello_fresh = False
        if self.state is not State.CLOSED:
            self.state = State.IDLE

    def replay(self) -> bytes:
        """Sequenced frames the peer has not acknowledged, to send right after the handshake."""
        return b"".join(self._replay)

    def _acknowledge(self, offset: int, *, source: str) -> None:
        if not self._replay_start <= offset <= self._sent:
            raise RemoteProtocolError(
                f"{source} acknowledges offset {offset}, outside the unacknowledged range "
                f"{self._replay_start}..{self._sent}"
            )
        drop = offset - self._replay_start
        while drop:
            head = self._replay[0]
            if len(head) <= drop:
                self._replay.popleft()
                drop -= len(head)
            else:
                self._replay[0] = head[drop:]
                drop = 0
        self._replay_start = offset

    # ------------------------------------------------------------------ sending

    def _frame(self, ftype: FrameType, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
        if not (ftype in SEQUENCED and self._established and self.state is not State.CLOSED):
            # Once a session was welcomed, sequenced frames may be produced while it has no
            # websocket: they wait in the replay buffer for the next one.
            self.state = _transition(self.role, True, self.state, ftype)
        frame = HEADER.pack(ftype, flags, 0, stream_id, len(payload)) + payload
        if ftype in SEQUENCED:
            self._sent += len(frame)
            self._replay.append(frame)
        return frame

    def ack(self) -> bytes:
        """An ACK frame for everything received so far (send it when ``unacknowledged_received``
        grows large, and with pongs)."""
        if self.state is not State.OPEN:
            return b""
        self._acked_received = self._received
        return HEADER.pack(FrameType.ACK, 0, 0, 0, 8) + _U64.pack(self._received)

    def acknowledge_data(self, stream_id: int, nbytes: int) -> bytes:
        """The application consumed ``nbytes`` of ``stream_id``: maybe a WINDOW frame.

        Credit is returned once half the window was consumed (one WINDOW frame per half
        window: a sender keeps at least half a window of credit, and the frames stay few),
        so a slow reader holds back only its own stream and memory per stream stays below
        one window.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed or nbytes <= 0:
            return b""
        stream.consumed += nbytes
        if stream.consumed < self.window // 2:
            return b""
        increment, stream.consumed = stream.consumed, 0
        stream.recv_window += increment
        return self._frame(FrameType.WINDOW, stream_id, _U32.pack(increment))

    def send(self, event: Event) -> bytes:
        """Encode ``event``; raise :class:`LocalProtocolError` if the protocol forbids it now."""
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {type(event).__name__} on a closed session")
        if isinstance(event, Data):
            return self._send_data(event.stream_id, event.data, event.fin)
        if isinstance(event, Hello):
            if event.mode not in MODES:
                raise LocalProtocolError(f"unknown hello mode {event.mode!r}")
            payload = _json_payload(
                {
                    "version": PROTOCOL_VERSION,
                    "mode": event.mode,
                    "params": event.params,
                    "received": self._received,
                    "window": self.window,
                    "fresh": event.mode == "attach" and not self._established,
                }
            )
            return self._frame(FrameType.HELLO, 0, payload)
        if isinstance(event, Welcome):
            if self.state is State.HELLO and event.resumed and self._peer_hello_fresh:
                raise LocalProtocolError(
                    "the client attached without replay state (HELLO fresh); "
                    "answer resumed=false and reset the old streams"
                )
            if self.state is State.HELLO and event.resumed:
                self._acknowledge(self._peer_hello_received, source="the client's hello")
            elif self.state is State.HELLO:
                self._reset_session_keep_peer()
            payload = _json_payload(
                {
                    "session": event.session_id,
                    "secret": event.secret,
                    "info": event.info,
                    "resumed": event.resumed,
                    "received": self._received,
                    "window": self.window,
                }
            )
            frame = self._frame(FrameType.WELCOME, 0, payload)
            self._established = True
            return frame
        if isinstance(event, Progress):
            return self._frame(FrameType.PROGRESS, 0, _json_payload(event.params))
        if isinstance(event, Error):
            payload = _json_payload({"code": event.code, "message": event.message})
            return self._frame(FrameType.ERROR, 0, payload)
        if isinstance(event, Ping | Pong):
            if len(event.payload) != 8:
                raise LocalProtocolError("PING and PONG payloads are 8 bytes")
            ftype = FrameType.PING if isinstance(event, Ping) else FrameType.PONG
            return self._frame(ftype, 0, event.payload)
        if isinstance(event, GoAway):
            self.goaway_sent = True
            return self._frame(FrameType.GOAWAY, 0, _json_payload({"reason": event.reason}))
        if isinstance(event, OpenStream):
            return self._send_open(event)
        if isinstance(event, ResetStream):
            if event.stream_id not in self._streams:
                if 0 < event.stream_id <= self._last_stream_id:
                    return b""  # already closed on both sides; nothing to reset
                raise LocalProtocolError(f"cannot reset stream {event.stream_id}: never opened")
            del self._streams[event.stream_id]
            payload = _U32.pack(event.code) + event.reason.encode()
            return self._frame(FrameType.RESET, event.stream_id, payload)
        if isinstance(event, Request):
            self._pending_requests.add(event.request_id)
            payload = _json_payload({"name": event.name, "args": event.args})
            return self._frame(FrameType.REQUEST, event.request_id, payload)
        if isinstance(event, Response):
            if event.request_id not in self._pending_requests:
                raise LocalProtocolError(f"no request {event.request_id} is waiting for a response")
            self._pending_requests.discard(event.request_id)
            body: JSONObject = (
                {"ok": True, "result": event.result}
                if event.error is None
                else {"ok": False, "error": event.error}
            )
            return self._frame(FrameType.RESPONSE, event.request_id, _json_payload(body))
        raise LocalProtocolError(f"{type(event).__name__} events are received, never sent")

    def _reset_session_keep_peer(self) -> None:
        peer_window = self._peer_window
        self._reset_session()
        self._peer_window = peer_window

    def _send_open(self, event: OpenStream) -> bytes:
        if not self._established:
            raise LocalProtocolError(f"cannot open a stream in handshake state {self.state.value}")
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client opens streams")
        if self.goaway_received:
            raise LocalProtocolError("cannot open a stream after the server sent GOAWAY")
        if not self._last_stream_id < event.stream_id <= MAX_STREAM_ID:
            raise LocalProtocolError(
                f"stream id {event.stream_id} must exceed the last one, {self._last_stream_id}"
            )
        frame = self._frame(FrameType.OPEN, event.stream_id, b"")
        self._last_stream_id = event.stream_id
        self._streams[event.stream_id] = _Stream(
            send_window=self._peer_window, recv_window=self.window
        )
        return frame

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> bytes:
        """``send(Data(stream_id, data, fin))`` without building the event (the hot path)."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("cannot send Data on a closed session")
        return self._send_data(stream_id, data, fin)

    def _send_data(self, sid: int, data: bytes, fin: bool) -> bytes:
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            raise LocalProtocolError(f"stream {sid} is not open for sending")
        if not self._established:
            raise LocalProtocolError(f"cannot send DATA in handshake state {self.state.value}")
        if len(data) > stream.send_window:
            raise LocalProtocolError(
                f"{len(data)} bytes exceed the send window of stream {sid} ({stream.send_window})"
            )
        stream.send_window -= len(data)
        end = len(data)
        fin_flag = FLAG_FIN if fin else 0
        if end <= MAX_DATA_CHUNK:
            blob = HEADER.pack(FrameType.DATA, fin_flag, 0, sid, end) + data
        else:
            # One copy for all the frames: headers and memoryview slices joined once.
            parts: list[bytes | memoryview] = []
            with memoryview(data) as view:
                for pos in range(0, end, MAX_DATA_CHUNK):
                    n = min(MAX_DATA_CHUNK, end - pos)
                    flags = fin_flag if pos + n >= end else 0
                    parts.append(HEADER.pack(FrameType.DATA, flags, 0, sid, n))
                    parts.append(view[pos : pos + n])
                blob = b"".join(parts)
                parts.clear()
        self._sent += len(blob)
        self._replay.append(blob)
        if fin:
            stream.local_closed = True
            if stream.remote_closed:
                del self._streams[sid]
        return blob

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes read from the websocket (any split: message boundaries do not matter).

        The object is kept, not copied, when nothing is left over from earlier reads: do
        not change a bytearray after passing it in.
        """
        buffer = self._buffer
        if self._pos >= len(buffer):
            self._buffer = data
        else:
            if not isinstance(buffer, bytearray) or self._pos:
                with memoryview(buffer) as view:
                    buffer = bytearray(view[self._pos :])
            buffer += data
            self._buffer = buffer
        self._pos = 0

    def events(self) -> Iterator[Event]:
        """Yield the events in the bytes received so far; raise :class:`RemoteProtocolError`
        at the first illegal frame (and again on every later call)."""
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event

    def next_event(self) -> Event | None:
        """The next complete event, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            while True:
                buffer = self._buffer
                pos = self._pos
                if len(buffer) - pos < HEADER_SIZE:
                    return None
                raw_type, flags, reserved, stream_id, length = HEADER.unpack_from(buffer, pos)
                ftype = _TYPES.get(raw_type)
                if ftype is None:
                    raise RemoteProtocolError(f"unknown frame type 0x{raw_type:02x}")
                if length > self.max_frame_size:
                    raise RemoteProtocolError(
                        f"{ftype.name} frame of {length} bytes exceeds the limit of "
                        f"{self.max_frame_size}",
                        CloseCode.FRAME_TOO_BIG,
                    )
                if reserved:
                    raise RemoteProtocolError(f"{ftype.name} frame has reserved bits set")
                if flags & ~FLAG_FIN or (flags and ftype is not FrameType.DATA):
                    raise RemoteProtocolError(f"{ftype.name} frame has unknown flags 0x{flags:02x}")
                end = pos + HEADER_SIZE + length
                if len(buffer) < end:
                    return None
                with memoryview(buffer) as view:
                    payload = bytes(view[pos + HEADER_SIZE : end])
                self._pos = end
                if not (ftype in _OPEN_ONLY and self.state is State.OPEN):
                    self.state = _transition(self.role, False, self.state, ftype)
                if ftype in SEQUENCED:
                    self._received += HEADER_SIZE + length
                event = self._decode(ftype, flags, stream_id, payload)
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            self._error = exc
            self.state = State.CLOSED
            raise

    def _decode(self, ftype: FrameType, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if ftype is FrameType.DATA:
            return self._receive_data_frame(stream_id, payload, bool(flags & FLAG_FIN))
        if ftype is FrameType.WINDOW:
            if len(payload) != 4:
                raise RemoteProtocolError("WINDOW payload must be 4 bytes")
            (increment,) = _U32.unpack(payload)
            stream = self._streams.get(stream_id)
            if stream is None:
                self._check_past_stream(stream_id, ftype)
                return None
            if increment == 0 or stream.send_window + increment > MAX_WINDOW:
                raise RemoteProtocolError(
                    f"WINDOW increment {increment} on stream {stream_id} is out of range"
                )
            stream.send_window += increment
            return WindowUpdate(stream_id=stream_id, increment=increment)
        if ftype is FrameType.ACK:
            if len(payload) != 8:
                raise RemoteProtocolError("ACK payload must be 8 bytes")
            (offset,) = _U64.unpack(payload)
            self._acknowledge(offset, source="ACK")
            return Acknowledged(offset=offset)
        if ftype is FrameType.PING or ftype is FrameType.PONG:
            if len(payload) != 8:
                raise RemoteProtocolError(f"{ftype.name} payload must be 8 bytes")
            return Ping(payload=payload) if ftype is FrameType.PING else Pong(payload=payload)
        if ftype is FrameType.OPEN:
            return self._receive_open(stream_id, payload)
        if ftype is FrameType.RESET:
            if len(payload) < 4:
                raise RemoteProtocolError("RESET payload must start with a 4-byte code")
            (code,) = _U32.unpack_from(payload)
            try:
                reason = payload[4:].decode()
            except UnicodeDecodeError as exc:
                raise RemoteProtocolError("RESET reason is not valid UTF-8") from exc
            if self._streams.pop(stream_id, None) is None:
                self._check_past_stream(stream_id, ftype)
                return None
            return ResetStream(stream_id=stream_id, code=code, reason=reason)
        if stream_id != 0 and ftype not in (FrameType.REQUEST, FrameType.RESPONSE):
            raise RemoteProtocolError(f"{ftype.name} frame must have id 0, got {stream_id}")
        obj = _parse_json_object(payload, ftype)
        if ftype is FrameType.HELLO:
            return self._receive_hello(obj)
        if ftype is FrameType.WELCOME:
            return self._receive_welcome(obj)
        if ftype is FrameType.PROGRESS:
            return Progress(params=obj)
        if ftype is FrameType.ERROR:
            code = _field(obj, "code", int, ftype)
            message = _field(obj, "message", str, ftype)
            assert isinstance(code, int)
            assert isinstance(message, str)
            return Error(code=code, message=message)
        if ftype is FrameType.GOAWAY:
            why = _field(obj, "reason", str, ftype)
            assert isinstance(why, str)
            self.goaway_received = True
            return GoAway(reason=why)
        if ftype is FrameType.REQUEST:
            name = _field(obj, "name", str, ftype)
            args = _field(obj, "args", dict, ftype)
            assert isinstance(name, str)
            assert isinstance(args, dict)
            if stream_id in self._pending_requests:
                raise RemoteProtocolError(f"request id {stream_id} is already in use")
            self._pending_requests.add(stream_id)
            return Request(request_id=stream_id, name=name, args=args)
        assert ftype is FrameType.RESPONSE
        if stream_id not in self._pending_requests:
            raise RemoteProtocolError(f"RESPONSE to request {stream_id}, which is not pending")
        self._pending_requests.discard(stream_id)
        ok = _field(obj, "ok", bool, ftype)
        if ok:
            return Response(request_id=stream_id, result=obj.get("result"))
        error = _field(obj, "error", str, ftype)
        assert isinstance(error, str)
        return Response(request_id=stream_id, error=error)

    def _check_past_stream(self, stream_id: int, ftype: FrameType) -> None:
        # Frames for a stream that was closed or reset may still be in flight: ignore them.
        # Frames for a stream that was never opened are a peer bug.
        if not 0 < stream_id <= self._last_stream_id:
            raise RemoteProtocolError(f"{ftype.name} frame for stream {stream_id}, never opened")

    def _receive_open(self, stream_id: int, payload: bytes) -> Event:
        if payload:
            raise RemoteProtocolError("OPEN frame must have an empty payload")
        if stream_id <= self._last_stream_id:
            raise RemoteProtocolError(
                f"stream id {stream_id} reused: ids must increase, the last was "
                f"{self._last_stream_id}"
            )
        self._last_stream_id = stream_id
        self._streams[stream_id] = _Stream(send_window=self._peer_window, recv_window=self.window)
        return OpenStream(stream_id=stream_id)

    def _receive_data_frame(self, stream_id: int, payload: bytes, fin: bool) -> Event | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_past_stream(stream_id, FrameType.DATA)
            return None
        if stream.remote_closed:
            raise RemoteProtocolError(f"DATA on stream {stream_id} after its FIN")
        if len(payload) > stream.recv_window:
            raise RemoteProtocolError(
                f"{len(payload)} bytes on stream {stream_id} exceed its window "
                f"({stream.recv_window})"
            )
        stream.recv_window -= len(payload)
        if fin:
            stream.remote_closed = True
            if stream.local_closed:
                del self._streams[stream_id]
        return Data(stream_id=stream_id, data=payload, fin=fin)

    def _receive_hello(self, obj: JSONObject) -> Event:
        version = _field(obj, "version", int, FrameType.HELLO)
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"HELLO version {version} is not {PROTOCOL_VERSION}")
        mode = obj.get("mode")
        if mode not in MODES:
            raise RemoteProtocolError(f"HELLO mode {mode!r} is not one of {', '.join(MODES)}")
        params = _field(obj, "params", dict, FrameType.HELLO)
        assert isinstance(params, dict)
        received = _offset_field(obj, "received", FrameType.HELLO)
        window = _window_field(obj, FrameType.HELLO)
        fresh = obj.get("fresh", False)
        if not isinstance(fresh, bool):
            raise RemoteProtocolError("HELLO field 'fresh' must be a boolean")
        if fresh and received:
            raise RemoteProtocolError(
                f"a fresh HELLO claims {received} bytes received; a fresh client has received none"
            )
        self._peer_hello_received = received
        self._peer_hello_fresh = fresh
        self._peer_window = window
        assert mode == "new" or mode == "attach" or mode == "control"
        return Hello(mode=mode, params=params, received=received, window=window, fresh=fresh)

    def _receive_welcome(self, obj: JSONObject) -> Event:
        session_id = _field(obj, "session", str, FrameType.WELCOME)
        secret = obj.get("secret")
        if secret is not None and not isinstance(secret, str):
            raise RemoteProtocolError("WELCOME field 'secret' must be a string or null")
        info = _field(obj, "info", dict, FrameType.WELCOME)
        resumed = _field(obj, "resumed", bool, FrameType.WELCOME)
        received = _offset_field(obj, "received", FrameType.WELCOME)
        window = _window_field(obj, FrameType.WELCOME)
        assert isinstance(session_id, str)
        assert isinstance(info, dict)
        assert isinstance(resumed, bool)
        if resumed:
            self._acknowledge(received, source="the server's welcome")
        else:
            self._reset_session()
        self._peer_window = window
        self._established = True
        return Welcome(
            session_id=session_id,
            secret=secret,
            info=info,
            resumed=resumed,
            received=received,
            window=window,
        )
