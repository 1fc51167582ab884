"""The trio side of a session: streams, flow control and the reader/writer of one websocket.

A :class:`Mux` outlives websockets. While one is attached, :meth:`Mux.run` runs a reader
(the caller's task: socket → protocol → stream buffers, no task switch per frame) and a
writer task that coalesces every pending frame into one websocket message. While none is
attached, streams keep working until their credit or the replay budget runs out: what they
send waits in the protocol's replay buffer for the next websocket.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable
from typing import Protocol

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from aldaas.tunnel._errors import CloseCode, ProtocolError, SessionClosed
from aldaas.tunnel._limits import REPLAY_CHUNK, MemoryBudget
from aldaas.tunnel._protocol import (
    HEADER,
    Acknowledged,
    Connection,
    Data,
    Error,
    FrameType,
    GoAway,
    JSONObject,
    JSONValue,
    OpenStream,
    Ping,
    Pong,
    Progress,
    Request,
    ResetCode,
    ResetStream,
    Response,
    State,
    WindowUpdate,
)
from aldaas.tunnel._relay import Relay, RelayKind, RelayMode, current_relay, resolve_mode
from aldaas.tunnel._ws import WebSocket

ACK_EVERY = 64 * 1024
"""Acknowledge received sequenced bytes at least this often (also with every PONG), or
every quarter of the replay budget if that is smaller (the peer's is assumed to be like
ours). The peer keeps every unacknowledged frame for replay: acknowledging only every
quarter of an 8 MiB budget kept ~2 MiB of small frames (~7 MB of objects) per busy session
in the gateway; an ACK per 64 KiB costs 16 bytes."""


def error_frame(code: int, message: str) -> bytes:
    """An ERROR frame that can be sent whatever the state (the session is ending anyway)."""
    payload = json.dumps({"code": int(code), "message": message}).encode()
    return HEADER.pack(FrameType.ERROR, 0, 0, 0, len(payload)) + payload


def _wake(lot: ParkingLot | None) -> None:
    if lot:  # a ParkingLot is false when nobody waits in it
        lot.unpark_all()


class TunnelStream(trio.abc.HalfCloseableStream):
    """One multiplexed TCP stream; behaves like a ``trio.SocketStream``.

    ``aclose`` finishes our direction (FIN) and, if the peer's direction is still open,
    resets the stream so the peer's writes fail like writes to a closed TCP socket.
    """

    def __init__(self, mux: Mux, stream_id: int) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self._buffer = bytearray()
        self._eof = False
        self._eof_sent = False
        self._closed = False
        self._broken: str | None = None
        self._receiving = False
        self._sending = False
        self._receive_lot: ParkingLot | None = None  # made when a task first waits
        self._send_lot: ParkingLot | None = None
        self.pipe: StreamPipe | None = None
        """Where received data goes instead of the buffer (see :meth:`attach`)."""
        self._pending: list[bytes] | None = None
        self._fin_pending = False

    # -------------------------------------------------------------- called by the mux

    def _feed(self, data: bytes, fin: bool) -> None:
        if self._closed:
            return
        if self.pipe is not None:
            # Gathered for one delivery at the end of the dispatch (see Mux._dispatch): the
            # payloads of one websocket read go into the TCP socket in one writev.
            pending = self._pending
            if pending is None:
                self._pending = pending = []
                self._mux._sinks.append(self)
            if data:
                pending.append(data)
            if fin:
                self._eof = self._fin_pending = True
            return
        if data:
            self._buffer += data
        if fin:
            self._eof = True
        if self._buffer or fin:
            _wake(self._receive_lot)

    def _flush_sink(self) -> None:
        parts, self._pending = self._pending, None
        fin, self._fin_pending = self._fin_pending, False
        pipe = self.pipe
        if parts is not None and pipe is not None and not self._closed:
            pipe.deliver(parts, fin)

    def attach(self, pipe: StreamPipe) -> None:
        """From now on hand received data to ``pipe`` (no task reads this stream then);
        what arrived before goes to it at once."""
        self.pipe = pipe
        if self._broken is not None:
            pipe.broken(self._broken)
        elif self._buffer or self._eof:
            data = bytes(self._buffer)
            self._buffer.clear()
            pipe.deliver([data] if data else [], self._eof)

    def consumed(self, nbytes: int) -> None:
        """The pipe delivered ``nbytes`` (flow control: maybe a WINDOW frame)."""
        mux = self._mux
        mux.bytes_received += nbytes
        mux.write(mux.conn.acknowledge_data(self.stream_id, nbytes))

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        _wake(self._receive_lot)
        _wake(self._send_lot)
        if self.pipe is not None:
            self.pipe.broken(reason)

    def _wake_sender(self) -> None:
        _wake(self._send_lot)
        if self.pipe is not None:
            self.pipe.writable()

    # -------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if self._buffer:
                    break
                if self._eof:
                    await cancel_shielded_checkpoint()
                    return b""
                if self._broken is not None:
                    raise trio.BrokenResourceError(self._broken)
                if self._receive_lot is None:
                    self._receive_lot = ParkingLot()
                await self._receive_lot.park()
            buffer = self._buffer
            if max_bytes is None or max_bytes >= len(buffer):
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
            mux = self._mux
            mux.bytes_received += len(data)
            if not self._eof:
                mux.write(mux.conn.acknowledge_data(self.stream_id, len(data)))
            await cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    # -------------------------------------------------------------- sending

    def _check_send(self) -> None:
        if self._closed or self._eof_sent:
            raise trio.ClosedResourceError("this stream was closed for sending")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    async def _wait_writable(self) -> int:
        """Park until the stream has credit and the session has replay room; return credit."""
        mux = self._mux
        conn = mux.conn
        while True:
            self._check_send()
            window = conn.send_window(self.stream_id)
            if window > 0:
                if mux.has_room():
                    return window
                await mux.wait_room()
            else:
                if self._send_lot is None:
                    self._send_lot = ParkingLot()
                await self._send_lot.park()

    def send_available(self, data: bytes) -> int:
        """Send as much of ``data`` as credit and replay room allow right now, without a
        checkpoint (a pipe's send). Returns bytes sent."""
        mux = self._mux
        if (
            self._sending
            or self._closed
            or self._eof_sent
            or self._broken is not None
            or mux.finished
        ):
            return 0
        conn = mux.conn
        window = conn.send_window(self.stream_id)
        if window <= 0 or not mux.has_room():
            return 0
        n = min(len(data), window)
        chunk = data if n == len(data) else data[:n]
        mux.write(conn.send_data(self.stream_id, chunk))
        mux.bytes_sent += n
        return n

    def send_window(self) -> int:
        """Bytes the peer lets us send on this stream now (its credit)."""
        return self._mux.conn.send_window(self.stream_id)

    def want_room(self) -> None:
        """Call ``pipe.writable()`` when the session may have replay room again."""
        self._mux.want_room(self)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            self._check_send()
            mux = self._mux
            conn = mux.conn
            with memoryview(data) as view, view.cast("B") as raw:
                total = len(raw)
                pos = 0
                while pos < total:
                    window = conn.send_window(self.stream_id)
                    if window <= 0 or not mux.has_room() or self._broken is not None:
                        window = await self._wait_writable()
                    n = min(total - pos, window)
                    chunk = bytes(raw[pos : pos + n]) if (pos or n < total) else bytes(raw)
                    mux.write(conn.send_data(self.stream_id, chunk))
                    mux.bytes_sent += n
                    pos += n
            await cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            conn = self._mux.conn
            if conn.send_window(self.stream_id) > 0 and self._mux.has_room():
                self._check_send()
                await cancel_shielded_checkpoint()
                return
            await self._wait_writable()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if not self._eof_sent and self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        self.finish_sending()
        await cancel_shielded_checkpoint()

    def finish_sending(self) -> None:
        """Send FIN now if it can still be sent (a pipe's ``send_eof``)."""
        if self._closed or self._eof_sent or self._broken is not None:
            return
        self._eof_sent = True
        self._mux.write(self._mux.conn.send_data(self.stream_id, b"", fin=True))

    # -------------------------------------------------------------- closing

    def reset(self, code: int = ResetCode.CANCELLED, reason: str = "") -> None:
        """Abort the stream at once (the peer's reads and writes fail); never blocks."""
        if self._closed:
            return
        self._closed = True
        mux = self._mux
        if self._broken is None and mux.usable:
            mux.write(
                mux.conn.send(ResetStream(stream_id=self.stream_id, code=code, reason=reason))
            )
        self._finish()

    def _finish(self) -> None:
        self._closed = True
        self._buffer = bytearray()
        self._mux.forget(self)
        _wake(self._receive_lot)
        _wake(self._send_lot)
        self._mux.wake_room()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """``aclose`` without the checkpoint (for a pipe, which runs in no task)."""
        if not self._closed:
            self._closed = True
            mux = self._mux
            conn = mux.conn
            if self._broken is None and mux.usable:
                frames = b""
                if not self._eof_sent:
                    self._eof_sent = True
                    frames = conn.send_data(self.stream_id, b"", fin=True)
                if not self._eof:
                    frames += conn.send(
                        ResetStream(stream_id=self.stream_id, code=ResetCode.CANCELLED)
                    )
                mux.write(frames)
            self._finish()


class StreamPipe(Protocol):
    """Takes a stream's received data instead of a reading task (tunnel/_splice.py)."""

    def deliver(self, parts: list[bytes], fin: bool) -> None:
        """Payloads received (in order), and whether the peer finished sending."""

    def writable(self) -> None:
        """The stream may have credit again."""

    def broken(self, reason: str) -> None:
        """The stream broke (reset by the peer, or the session ended)."""


RequestHandler = Callable[[Request], None]
StreamHandler = Callable[[TunnelStream], None]


class Mux:
    """Streams of one session over whichever websocket is attached now."""

    def __init__(
        self,
        conn: Connection,
        *,
        replay_limit: int,
        keepalive_interval: float,
        keepalive_timeout: float,
        on_stream: StreamHandler | None = None,
        on_request: RequestHandler | None = None,
        on_protocol_error: Callable[[ProtocolError], None] | None = None,
        budget: MemoryBudget | None = None,
        relay: RelayMode = "auto",
    ) -> None:
        self.conn = conn
        self.relay_kind: RelayKind = resolve_mode(relay)
        """The relay this session's sockets use (see tunnel/_relay.py), resolved once."""
        self.budget = budget
        """The gateway's memory budget: replay beyond the first chunk and each stream's
        receive window are taken from it (None: no ceiling but ``replay_limit``)."""
        self._replay_allowed = replay_limit
        if budget is not None:
            self._replay_allowed = min(replay_limit, REPLAY_CHUNK)
            budget.hold(self._replay_allowed)
        self.on_protocol_error = on_protocol_error
        self.replay_limit = replay_limit
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.on_stream = on_stream
        self.on_request = on_request
        self.streams: dict[int, TunnelStream] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.streams_opened = 0
        self.finished = False
        self.finish_reason = ""
        self.rtt: float | None = None
        self.goaway: str | None = None
        self._out = bytearray()
        self._batch: list[bytes] | None = None
        self._sinks: list[TunnelStream] = []
        self._room_waiters: list[TunnelStream] = []
        self._ack_threshold = max(1, min(ACK_EVERY, replay_limit // 4))
        self._ws: WebSocket | None = None
        self._out_lot = ParkingLot()
        self._room_lot = ParkingLot()
        self._live = False
        self._ack_requested = False
        self._last_received = 0.0
        self._ping_sent_at: dict[bytes, float] = {}
        self._responses: dict[int, trio.Event] = {}
        self._results: dict[int, Response] = {}

    def relay(self) -> Relay:
        """The run's relay of this session's kind."""
        return current_relay(self.relay_kind)

    @property
    def usable(self) -> bool:
        """Whether stream frames may be produced (welcomed once, not over)."""
        return self.conn.established and not self.finished and self.conn.state is not State.CLOSED

    # -------------------------------------------------------------- output

    def write(self, frames: bytes) -> None:
        """Send frames on the attached websocket: straight into the socket when it has room
        and nothing is queued, else into the websocket's backlog (by reference, no copy)
        for the writer task to flush. Dropped while detached (sequenced frames are in the
        replay buffer and go out after the next handshake)."""
        if not frames or not self._live:
            return
        batch = self._batch
        if batch is not None:
            batch.append(frames)
            return
        ws = self._ws
        if self._out or ws is None:
            self._out += frames
            _wake(self._out_lot)
            return
        try:
            if not ws.send_nowait(frames):
                return
        except trio.BrokenResourceError:
            pass  # the reader ends this websocket; the replay buffer keeps the frames
        _wake(self._out_lot)

    def hold(self) -> None:
        """Gather the frames written from now on into one websocket message, sent by
        :meth:`release` (a burst of new streams and their first bytes)."""
        if self._batch is None:
            self._batch = []

    def release(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            self.write(b"".join(batch))

    def has_room(self) -> bool:
        return self.conn.replay_size < self._replay_allowed or self._grow_replay()

    def _grow_replay(self) -> bool:
        """Take one more replay chunk from the budget, if the session may have it."""
        budget = self.budget
        if budget is None or self.finished or self._replay_allowed >= self.replay_limit:
            return False
        chunk = min(REPLAY_CHUNK, self.replay_limit - self._replay_allowed)
        if not budget.take(chunk):
            return False
        self._replay_allowed += chunk
        return self.conn.replay_size < self._replay_allowed

    def _shrink_replay(self) -> None:
        """Give back the replay chunks that acknowledged bytes no longer need."""
        budget = self.budget
        if budget is None or self.finished:
            return
        floor = min(self.replay_limit, REPLAY_CHUNK)
        needed = -(-self.conn.replay_size // REPLAY_CHUNK) * REPLAY_CHUNK
        keep = max(floor, min(self._replay_allowed, needed))
        if keep < self._replay_allowed:
            budget.give(self._replay_allowed - keep)
            self._replay_allowed = keep

    def _take_window(self) -> bool:
        budget = self.budget
        return budget is None or budget.take(self.conn.window)

    def _give_windows(self, streams: int) -> None:
        if self.budget is not None and streams:
            self.budget.give(streams * self.conn.window)

    async def wait_room(self) -> None:
        self._request_ack()
        await self._room_lot.park()

    def want_room(self, stream: TunnelStream) -> None:
        """Call ``stream.pipe.writable()`` when replay room may be back."""
        self._request_ack()
        self._room_waiters.append(stream)

    def _request_ack(self) -> None:
        if not self._ack_requested and self._live:
            # Ask for an ACK: the peer answers every PING with PONG + ACK.
            self._ack_requested = True
            self._send_ping()

    def wake_room(self) -> None:
        _wake(self._room_lot)
        if self._room_waiters:
            waiters, self._room_waiters = self._room_waiters, []
            for stream in waiters:
                if stream.pipe is not None:
                    stream.pipe.writable()

    def _send_ping(self) -> None:
        payload = os.urandom(8)
        self._ping_sent_at[payload] = trio.current_time()
        if len(self._ping_sent_at) > 16:
            self._ping_sent_at.pop(next(iter(self._ping_sent_at)))
        self.write(self.conn.send(Ping(payload=payload)))

    # -------------------------------------------------------------- streams

    def open_stream(self) -> TunnelStream:
        """Open a new stream (client side); usable at once, even while detached."""
        if self.finished:
            raise trio.BrokenResourceError(f"the session is over: {self.finish_reason}")
        stream_id = self.conn.next_stream_id()
        self.write(self.conn.send(OpenStream(stream_id=stream_id)))
        stream = TunnelStream(self, stream_id)
        self.streams[stream_id] = stream
        if self.budget is not None:
            self.budget.hold(self.conn.window)
        self.streams_opened += 1
        return stream

    def forget(self, stream: TunnelStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self._give_windows(1)

    async def request(self, name: str, args: JSONObject) -> Response:
        """Send a control request and wait for its response (survives a resumption)."""
        if self.finished:
            raise trio.BrokenResourceError(f"the session is over: {self.finish_reason}")
        request_id = self.conn.next_request_id()
        done = trio.Event()
        self._responses[request_id] = done
        self.write(self.conn.send(Request(request_id=request_id, name=name, args=args)))
        try:
            await done.wait()
        finally:
            self._responses.pop(request_id, None)
        response = self._results.pop(request_id, None)
        if response is None:
            raise trio.BrokenResourceError(f"the session is over: {self.finish_reason}")
        return response

    def respond(self, request_id: int, result: JSONValue = None, error: str | None = None) -> None:
        if not self.finished:
            self.write(self.conn.send(Response(request_id=request_id, result=result, error=error)))

    def finish(self, reason: str) -> None:
        """The session is over: every stream breaks, every waiter wakes."""
        if self.finished:
            return
        self.finished = True
        self.finish_reason = reason
        for stream in list(self.streams.values()):
            stream._break(f"the tunnel session ended: {reason}")
        self._give_windows(len(self.streams))
        self.streams.clear()
        for done in self._responses.values():
            done.set()
        self.wake_room()
        if self.budget is not None:  # the replay goes with the session
            self.budget.give(self._replay_allowed)
            self._replay_allowed = 0

    def reset_streams(self, reason: str) -> None:
        """The peer started the session afresh: our old streams are gone."""
        for stream in list(self.streams.values()):
            stream._break(reason)
        self._give_windows(len(self.streams))
        self.streams.clear()
        for done in self._responses.values():
            done.set()

    # -------------------------------------------------------------- one websocket

    async def run(self, ws: WebSocket, first: bytes) -> None:
        """Carry the session over ``ws`` until it drops (returns) or the session fails (raises
        :class:`ProtocolError` after closing ``ws`` with its code, or :class:`SessionClosed`).

        ``first`` is sent before anything else (the WELCOME and the replay).
        """
        self._out = bytearray(first)
        self._ws = ws
        self._live = True
        self._ack_requested = False
        self._last_received = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws, nursery.cancel_scope)
                nursery.start_soon(self._keepalive, ws, nursery.cancel_scope)
                try:
                    fd = ws.relay_fd()
                    if fd is None:
                        await self._reader(ws)
                    else:
                        await self._relayed(ws, fd)
                except ProtocolError as exc:
                    self.finish(f"protocol error: {exc}")
                    if self.on_protocol_error is not None:
                        self.on_protocol_error(exc)
                    nursery.cancel_scope.cancel()
                    await ws.aclose(
                        exc.close_code, str(exc), last=error_frame(exc.close_code, str(exc))
                    )
                    raise
                except SessionClosed:
                    nursery.cancel_scope.cancel()
                    await ws.aclose(CloseCode.NORMAL)
                    raise
                nursery.cancel_scope.cancel()
        finally:
            self._live = False
            self._ws = None
            self._out = bytearray()
            self.conn.connection_lost()
            self._ack_requested = False
            self.wake_room()

    async def _writer(self, ws: WebSocket, scope: trio.CancelScope) -> None:
        try:
            while True:
                if self._out:
                    data = bytes(self._out)
                    self._out.clear()
                    ws.send_nowait(data)
                if ws.needs_flush:
                    await ws.flush()
                    continue
                if not self._out:
                    await self._out_lot.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # The websocket is broken: end it (the reader would see the same failure).
            await trio.aclose_forcefully(ws.stream)
            scope.cancel()

    async def _keepalive(self, ws: WebSocket, scope: trio.CancelScope) -> None:
        interval = self.keepalive_interval
        while True:
            await trio.sleep(interval)
            idle = trio.current_time() - self._last_received
            if idle >= self.keepalive_timeout:
                await trio.aclose_forcefully(ws.stream)
                scope.cancel()
                return
            if idle >= interval * 0.9:
                self._send_ping()

    async def _reader(self, ws: WebSocket) -> None:
        conn = self.conn
        self._dispatch()  # bytes that arrived with the handshake
        while True:
            try:
                data = await ws.receive()
            except (trio.BrokenResourceError, OSError):
                return
            if not data:
                return
            self._last_received = trio.current_time()
            conn.receive_data(data)
            self._dispatch()

    async def _relayed(self, ws: WebSocket, fd: int) -> None:
        """Like :meth:`_reader`, with the reading done by the process's relay task: each
        time the socket is readable, its callback handles what arrived, in the relay's
        task step (see tunnel/_relay.py)."""
        self._dispatch()  # bytes that arrived with the handshake
        relay = self.relay()
        ended = trio.Event()
        failure: list[Exception] = []
        conn = self.conn

        def on_readable(events: int) -> None:
            try:
                data = ws.receive_nowait()
                if data:
                    self._last_received = trio.current_time()
                    conn.receive_data(data)
                    self._dispatch()
                if ws.needs_flush:
                    _wake(self._out_lot)
                if data is None or data:
                    return
            except (trio.BrokenResourceError, OSError):
                pass
            except Exception as exc:  # ProtocolError, SessionClosed, or a bug: run() raises it
                failure.append(exc)
            relay.remove(fd, on_readable)
            ended.set()

        relay.add(fd, on_readable)
        try:
            await ended.wait()
        finally:
            relay.remove(fd, on_readable)
        if failure:
            raise failure[0]

    def _dispatch(self) -> None:
        """Handle every complete frame received so far. Frames produced meanwhile (WINDOW,
        ACK, PONG, RESET...) leave in one websocket message at the end, and each stream's
        payloads in one write into its TCP socket."""
        self._batch = batch = []
        try:
            self._dispatch_events()
        finally:
            sinks = self._sinks
            if sinks:
                for stream in sinks:
                    stream._flush_sink()
                sinks.clear()
            conn = self.conn
            if conn.unacknowledged_received >= self._ack_threshold:
                batch.append(conn.ack())
            self._batch = None
            if batch:
                self.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _dispatch_events(self) -> None:
        conn = self.conn
        streams = self.streams
        while True:
            event = conn.next_event()
            if event is None:
                break
            kind = type(event)
            if kind is Data:
                assert isinstance(event, Data)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._feed(event.data, event.fin)
            elif kind is WindowUpdate:
                assert isinstance(event, WindowUpdate)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._wake_sender()
            elif kind is Acknowledged:
                self._ack_requested = False
                self._shrink_replay()
                self.wake_room()
            elif kind is OpenStream:
                assert isinstance(event, OpenStream)
                stream = TunnelStream(self, event.stream_id)
                self.streams_opened += 1
                if not self._take_window():
                    stream.reset(
                        ResetCode.REFUSED,
                        "the gateway's memory budget is in use by other streams; try again shortly",
                    )
                    continue
                streams[event.stream_id] = stream
                if self.on_stream is None:
                    stream.reset(ResetCode.REFUSED, "this side accepts no streams")
                else:
                    self.on_stream(stream)
            elif kind is ResetStream:
                assert isinstance(event, ResetStream)
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    self._give_windows(1)
                    why = f": {event.reason}" if event.reason else ""
                    stream._break(f"the peer reset the stream (code {event.code}){why}")
            elif kind is Ping:
                assert isinstance(event, Ping)
                self.write(conn.send(Pong(payload=event.payload)) + conn.ack())
            elif kind is Pong:
                assert isinstance(event, Pong)
                sent = self._ping_sent_at.pop(event.payload, None)
                if sent is not None:
                    self.rtt = trio.current_time() - sent
            elif kind is Request:
                assert isinstance(event, Request)
                if self.on_request is None:
                    self.respond(event.request_id, error="this side answers no requests")
                else:
                    self.on_request(event)
            elif kind is Response:
                assert isinstance(event, Response)
                done = self._responses.get(event.request_id)
                if done is not None:
                    self._results[event.request_id] = event
                    done.set()
            elif kind is GoAway:
                assert isinstance(event, GoAway)
                self.goaway = event.reason
            elif kind is Error:
                assert isinstance(event, Error)
                self.finish(event.message)
                raise SessionClosed(event.message, event.code)
            elif kind is Progress:
                pass  # late progress after the welcome: nothing to show any more
            else:
                raise ProtocolError(f"unexpected {kind.__name__} in an open session")
