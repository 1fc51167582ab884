"""A thin websocket over a trio stream, driven by wsproto directly.

trio-websocket runs a reader task and hands each message over a channel: two task switches
per message and a 4 KiB read size. Here the caller's task reads the socket (large reads) and
gets the binary payloads of everything that arrived in one go; the tunnel does not care
about message boundaries.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import ssl
import struct
import urllib.parse

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong
from wsproto.events import Request as WsRequest
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from aldaas.tunnel._errors import CloseCode
from aldaas.tunnel._protocol import SUBPROTOCOL

WS_ERRORS = (WsLocalProtocolError, WsRemoteProtocolError)
_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_XOR_TABLES: list[bytes] = []
_IOV_MAX = 512
"""Buffers per ``writev`` call (Linux allows 1024)."""
_KEY_POOL_SIZE = 4096
"""Bytes of masking keys fetched from the OS at once: one ``getrandom`` per 1024 messages."""


def _mask_python(data: bytes | memoryview, key: bytes) -> bytes | bytearray:
    """XOR ``data`` with the 4-byte ``key`` (RFC 6455 client masking): one copy, then four
    strided ``bytes.translate`` passes in C (about 300 MB/s)."""
    if not _XOR_TABLES:
        _XOR_TABLES.extend(bytes(a ^ b for a in range(256)) for b in range(256))
    masked = bytearray(data)
    for i in range(4):
        masked[i::4] = masked[i::4].translate(_XOR_TABLES[key[i]])
    return masked


try:
    # websockets' C helper masks at several GB/s: masking was the ceiling of uploads.
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - a platform without the compiled helper
    _mask = _mask_python
else:

    def _mask(data: bytes | memoryview, key: bytes) -> bytes | bytearray:
        """XOR ``data`` with the 4-byte ``key`` (RFC 6455 client masking), in C."""
        return _apply_mask(data, key)


class _MaskKeys:
    """Masking keys from the OS's strong random source, fetched in batches (RFC 6455 wants
    them unpredictable, not one syscall each)."""

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def next(self) -> bytes:
        pos = self._pos
        if pos >= len(self._pool):
            self._pool = os.urandom(_KEY_POOL_SIZE)
            pos = 0
        self._pos = pos + 4
        return self._pool[pos : pos + 4]


def unlimit_unsent(stream: trio.abc.Stream) -> None:
    """Undo trio's ``TCP_NOTSENT_LOWAT`` of 16 KiB on a relay socket: with it, a 256 KiB
    write is taken 16 KiB at a time (more syscalls and wake-ups per byte); the tunnel
    bounds what it buffers itself (windows, replay budget)."""
    if isinstance(stream, trio.SocketStream) and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0)


def socket_fd(stream: trio.abc.Stream) -> int | None:
    """The file descriptor under a plain TCP stream, which the hot paths read and write
    with ``os.read``/``os.writev``; None for TLS, and on Windows, where a socket is no
    file descriptor (the trio stream's own methods are used there, as for TLS)."""
    if isinstance(stream, trio.SocketStream) and os.name != "nt":
        return stream.socket.fileno()
    return None


class SocketReader:
    """``receive_some`` for a hot loop: on plain TCP, ``os.read`` on the non-blocking socket,
    and after a short read wait for readability *first* (the socket is most likely
    drained), which saves trio's speculative ``recv`` (a syscall failing with EAGAIN) and
    its checkpoint sandwich on every message. TLS streams use ``receive_some``."""

    def __init__(self, stream: trio.abc.Stream, size: int) -> None:
        self._stream = stream
        self._size = size
        self._fd = socket_fd(stream)
        self._drained = True

    async def read(self) -> bytes:
        fd = self._fd
        if fd is None:
            return bytes(await self._stream.receive_some(self._size))
        if self._drained:
            await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.checkpoint()  # a busy socket must not starve other tasks
        while True:
            try:
                data = os.read(fd, self._size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the socket was closed") from exc
                raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
            self._drained = len(data) < self._size
            return data


class FrameError(Exception):
    """The peer broke RFC 6455 framing; ``code`` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class FrameReader:
    """Incremental RFC 6455 frame parser for an open websocket that carries only binary
    messages: payload bytes come out as they arrive (a large frame is never buffered whole)
    with one copy, unmasked by four strided ``bytes.translate`` passes; control frames come
    out whole. wsproto's parser makes three or more copies and many calls per frame."""

    def __init__(self, *, expect_masked: bool) -> None:
        self._expect_masked = expect_masked
        self._buffer = b""
        self._remaining = 0
        self._key = b""
        self._offset = 0
        self._in_message = False

    def feed(self, data: bytes) -> tuple[list[bytes | bytearray], list[tuple[int, bytes]]]:
        """Data payload chunks and (opcode, payload) control frames in ``data``."""
        chunks: list[bytes | bytearray] = []
        controls: list[tuple[int, bytes]] = []
        whole = self._buffer + data if self._buffer else data
        size = len(whole)
        pos = 0
        with memoryview(whole) as view:
            while pos < size:
                if self._remaining:
                    n = min(self._remaining, size - pos)
                    chunk = view[pos : pos + n]
                    if self._key:
                        shift = self._offset % 4
                        chunks.append(_mask(chunk, self._key[shift:] + self._key[:shift]))
                    else:
                        chunks.append(whole if n == size else bytes(chunk))
                    pos += n
                    self._remaining -= n
                    self._offset += n
                    continue
                if size - pos < 2:
                    break
                first, second = view[pos], view[pos + 1]
                opcode = first & 0x0F
                masked = bool(second & 0x80)
                length = second & 0x7F
                header = 2
                if length == 126:
                    header = 4
                elif length == 127:
                    header = 10
                if masked:
                    header += 4
                if size - pos < header:
                    break
                if length == 126:
                    length = int.from_bytes(view[pos + 2 : pos + 4], "big")
                elif length == 127:
                    length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                if first & 0x70:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set in a frame")
                if masked != self._expect_masked:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "frame masking is wrong")
                key = bytes(view[pos + header - 4 : pos + header]) if masked else b""
                if opcode >= 8:
                    if length > 125 or not first & 0x80:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "malformed control frame")
                    if size - pos < header + length:
                        break
                    payload = view[pos + header : pos + header + length]
                    controls.append((opcode, bytes(_mask(payload, key) if key else payload)))
                    pos += header + length
                    continue
                if (opcode == 2 and not self._in_message) or (opcode == 0 and self._in_message):
                    pass
                elif opcode == 1:
                    raise FrameError(1003, "text messages are not part of aldaas.v1")
                else:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, f"unexpected opcode {opcode}")
                self._in_message = not first & 0x80
                pos += header
                self._remaining = length
                self._key = key
                self._offset = 0
            self._buffer = bytes(view[pos:]) if pos < size else b""
        return chunks, controls


def wsproto_buffered(ws: WSConnection) -> int | None:
    """Bytes wsproto holds past the handshake, not yet parsed into frames; None if that
    cannot be known: the websocket is not open, or wsproto no longer keeps them where this
    looks (``Connection._proto._frame_decoder.buffer``, private). None keeps wsproto's own
    parser for the whole connection: correct, only slower (and no relay for it). A test
    (tests/tunnel/test_tunnel_websocket.py) fails loudly when a wsproto release moves it."""
    connection = ws.connection
    if connection is None:
        return None
    try:
        size = len(connection._proto._frame_decoder.buffer)
    except (AttributeError, TypeError):
        return None
    return size if isinstance(size, int) else None


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP error; ``message`` is its one-line body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class WebSocket:
    """One open websocket. ``receive`` and ``send`` may run in two different tasks."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, receive_size: int) -> None:
        self.stream = stream
        self.ws = ws
        self.receive_size = receive_size
        self.close_code: int | None = None
        self.close_reason = ""
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False
        self._backlog: list[bytes | bytearray | memoryview] = []
        # Plain TCP: frames are written straight to the non-blocking socket when it has
        # room and no trio send is in progress (TLS goes through flush()).
        self._fd = socket_fd(stream)
        unlimit_unsent(stream)
        self._client = ws.client
        self._keys = _MaskKeys()
        self._reader = SocketReader(stream, receive_size)
        self._frames: FrameReader | None = None
        self._parse_ourselves: bool | None = None

    def _choose_parser(self) -> None:
        if self._frames is None and self._parse_ourselves is None:
            # Parse frames ourselves once wsproto holds no bytes past the handshake (it
            # would otherwise own a partial frame); else stay with wsproto throughout.
            self._parse_ourselves = wsproto_buffered(self.ws) == 0
            if self._parse_ourselves:
                self._frames = FrameReader(expect_masked=not self._client)

    def relay_fd(self) -> int | None:
        """The socket the relay may read with :meth:`receive_nowait` (plain TCP, frames
        parsed here), else None: then only :meth:`receive` reads."""
        if self._fd is None:
            return None
        self._choose_parser()
        return self._fd if self._frames is not None else None

    def receive_nowait(self) -> bytes | bytearray | None:
        """What :meth:`receive` returns, without waiting: None if no payload arrived (yet).

        Only after :meth:`relay_fd` gave a socket. Control frames are answered by queueing
        (see :attr:`needs_flush`). Raises ``trio.BrokenResourceError`` like :meth:`receive`.
        """
        fd = self._fd
        assert fd is not None
        if self._closed:
            return b""
        try:
            data = os.read(fd, self.receive_size)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._closed = True
            raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
        if not data:
            self._closed = True
            return b""
        return self._take(data)

    def _take(self, data: bytes) -> bytes | bytearray | None:
        """The payload in ``data`` (b"" if the websocket closed, None if only control
        frames came); control frames are answered by queueing (see :attr:`needs_flush`)."""
        assert self._frames is not None
        try:
            chunks, controls = self._frames.feed(data)
        except FrameError as exc:
            self._closed = True
            self.close_code = exc.code
            with contextlib.suppress(*WS_ERRORS):
                self._queue(self.ws.send(CloseConnection(code=exc.code)))
            raise trio.BrokenResourceError(f"websocket framing error: {exc}") from exc
        for opcode, payload in controls:
            if opcode == 9:  # ping
                self._queue(self.ws.send(WsPong(payload=payload)))
            elif opcode == 8:  # close
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_code = code
                self.close_reason = payload[2:].decode(errors="replace")
                reply = CloseConnection(code=code if code not in (1005, 1006) else 1000)
                with contextlib.suppress(*WS_ERRORS):
                    self._queue(self.ws.send(reply))
                self._closed = True
                break
        if chunks:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return b"" if self._closed else None

    async def receive(self) -> bytes | bytearray:
        """Binary payload bytes that arrived (never empty); b"" once the websocket is closed.

        Raises ``trio.BrokenResourceError`` if the socket broke.
        """
        self._choose_parser()
        if self._frames is not None:
            return await self._receive_frames()
        while True:
            if self._closed:
                return b""
            try:
                data = await self._reader.read()
            except trio.ClosedResourceError:
                return b""
            self.ws.receive_data(bytes(data) if data else None)
            chunks: list[bytes | bytearray] = []
            try:
                for event in self.ws.events():
                    if isinstance(event, BytesMessage):
                        chunks.append(event.data)
                    elif isinstance(event, WsPing):
                        await self._send_raw(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        self.close_reason = event.reason or ""
                        self._closed = True
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError
                        ):
                            await self._send_raw(self.ws.send(event.response()))
                        break
                    elif isinstance(event, TextMessage):
                        self.close_code = CloseCode.PROTOCOL_ERROR
                        self._closed = True
                        raise trio.BrokenResourceError("text messages are not part of aldaas.v1")
            except WS_ERRORS as exc:
                self._closed = True
                raise trio.BrokenResourceError(f"websocket framing error: {exc}") from exc
            if chunks:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if not data:
                self._closed = True
                return b""

    async def _receive_frames(self) -> bytes | bytearray:
        while True:
            if self._closed:
                return b""
            try:
                data = await self._reader.read()
            except trio.ClosedResourceError:
                return b""
            if not data:
                self._closed = True
                return b""
            try:
                payload = self._take(data)
            finally:
                if self.needs_flush:
                    await self._flush_replies()
            if payload is not None:
                return payload

    async def _flush_replies(self) -> None:
        """Send the queued answers to control frames; once closing, the peer may be gone."""
        if not self._closed:
            await self.flush()
            return
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await self.flush()

    async def send(self, data: bytes) -> None:
        """Send ``data`` as one binary message."""
        if self.send_nowait(data):
            await self.flush()

    def send_nowait(self, data: bytes) -> bool:
        """Frame ``data`` as one binary message and write it at once if the socket takes it
        (no task switch, no scheduler pass); True if bytes are left for :meth:`flush`.

        Data frames are serialized here rather than by wsproto, which copies the payload
        three times (seven when masking); a server frame is header + payload with no copy.
        """
        if self._closed or self.ws.state is not ConnectionState.OPEN:
            raise trio.BrokenResourceError("the websocket is closing")
        length = len(data)
        mask_bit = 0x80 if self._client else 0
        if length < 126:
            header = bytes((0x82, mask_bit | length))
        elif length < 65536:
            header = _HEADER16.pack(0x82, mask_bit | 126, length)
        else:
            header = _HEADER64.pack(0x82, mask_bit | 127, length)
        if not self._client:
            return self._queue(header, data)
        key = self._keys.next()
        return self._queue(header + key, _mask(data, key))

    def _queue(self, header: bytes, payload: bytes | bytearray = b"") -> bool:
        """Write ``header`` + ``payload`` now if nothing is queued and the socket takes them,
        else queue them (by reference: neither may change afterwards). True if queued."""
        backlog = self._backlog
        if backlog or self._fd is None or self._send_lock.locked():
            backlog.append(header)
            if payload:
                backlog.append(payload)
            return True
        try:
            written = (
                os.writev(self._fd, (header, payload)) if payload else os.write(self._fd, header)
            )
        except OSError:
            written = 0  # full (EAGAIN) or broken: flush() meets the error the trio way
        if written >= len(header) + len(payload):
            return False
        if written < len(header):
            backlog.append(header[written:])
            if payload:
                backlog.append(payload)
        else:
            backlog.append(memoryview(payload)[written - len(header) :])
        return True

    @property
    def needs_flush(self) -> bool:
        return bool(self._backlog)

    async def flush(self) -> None:
        """Write every queued byte (waits while the socket is full).

        The backlog is a list of buffers written with ``writev`` on plain TCP: a large
        payload queued while the socket was full is never copied into a bigger buffer."""
        async with self._send_lock:
            fd = self._fd
            while self._backlog:
                if fd is None:
                    data = b"".join(self._backlog)
                    self._backlog.clear()
                    await self.stream.send_all(data)
                    continue
                await trio.lowlevel.wait_writable(fd)
                self._write_backlog(fd)

    def _write_backlog(self, fd: int) -> None:
        backlog = self._backlog
        try:
            written = os.writev(fd, backlog[:_IOV_MAX])
        except BlockingIOError:
            return
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
        done = 0
        for part in backlog:
            if len(part) > written:
                break
            written -= len(part)
            done += 1
        del backlog[:done]
        if written:
            backlog[0] = memoryview(backlog[0])[written:]

    async def _send_raw(self, frame: bytes) -> None:
        self._backlog.append(frame)
        await self.flush()

    async def aclose(
        self, code: int = CloseCode.NORMAL, reason: str = "", last: bytes = b""
    ) -> None:
        """Send ``last`` and a close frame (best effort, bounded), then close the socket."""
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                frames = b""
                if last:
                    frames += self.ws.send(BytesMessage(data=last))
                if not self._closed:
                    frames += self.ws.send(CloseConnection(code=code, reason=reason[:120]))
                self._closed = True
                if frames:
                    await self._send_raw(frames)
            except (*WS_ERRORS, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(self.stream)


# ---------------------------------------------------------------------------- client side


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


async def connect(
    url: str,
    *,
    authorization: str,
    receive_size: int,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocket:
    """Open a websocket to ``url`` (ws:// or wss://) with our subprotocol.

    Raises :class:`HandshakeRejected` if the server refuses the upgrade, ``OSError`` or
    ``trio.BrokenResourceError`` if the network fails. The caller bounds the time.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"the tunnel url must be ws:// or wss://host/path, got {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    tcp = await trio.open_tcp_stream(parts.hostname, port)  # trio sets TCP_NODELAY
    stream: trio.abc.Stream = tcp
    try:
        if secure:
            context = ssl_context or client_ssl_context(None)
            tls = trio.SSLStream(tcp, context, server_hostname=parts.hostname)
            await tls.do_handshake()
            stream = tls
        ws = WSConnection(ConnectionType.CLIENT)
        host = parts.netloc.rsplit("@", 1)[-1]
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        await stream.send_all(
            ws.send(
                WsRequest(
                    host=host,
                    target=target,
                    subprotocols=[SUBPROTOCOL],
                    extra_headers=[(b"authorization", authorization.encode())],
                )
            )
        )
        body = b""
        status = 0
        while True:
            data = await stream.receive_some(65536)
            ws.receive_data(bytes(data) if data else None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return WebSocket(stream, ws, receive_size)
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise HandshakeRejected(status, "")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise HandshakeRejected(status, body.decode(errors="replace").strip())
            if not data:
                raise trio.BrokenResourceError("the server closed the connection during upgrade")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


# ---------------------------------------------------------------------------- server side


async def read_request(
    stream: trio.abc.Stream, ws: WSConnection, receive_size: int
) -> WsRequest | None:
    """Read until the upgrade request is complete; None if the peer closed or sent garbage."""
    while True:
        try:
            data = await stream.receive_some(receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        try:
            ws.receive_data(bytes(data) if data else None)
            for event in ws.events():
                if isinstance(event, WsRequest):
                    return event
        except WS_ERRORS:
            return None
        if not data:
            return None


async def reject(
    stream: trio.abc.Stream,
    ws: WSConnection,
    status: int,
    message: str,
    *,
    retry_after: float | None = None,
) -> None:
    """Refuse an upgrade with ``status`` and a one-line plain-text reason, then hang up."""
    body = (message + "\n").encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    try:
        frames = ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        frames += ws.send(RejectData(data=body, body_finished=True))
        with trio.move_on_after(2):
            await stream.send_all(frames)
    except (*WS_ERRORS, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    await trio.aclose_forcefully(stream)


_REASONS = {429: "Too Many Requests", 503: "Service Unavailable"}


async def refuse_early(stream: trio.abc.Stream, status: int, message: str) -> None:
    """Answer ``status`` without reading the request (the gateway is over a connection
    limit and spends nothing on this peer), then hang up."""
    if not isinstance(stream, trio.SocketStream):
        # TLS: an answer would need a handshake the peer may stall; hang up at once.
        await trio.aclose_forcefully(stream)
        return
    body = (message + "; try again in a few seconds\n").encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(head.encode() + body)
    await trio.aclose_forcefully(stream)


async def accept(
    stream: trio.abc.Stream, ws: WSConnection, receive_size: int, subprotocol: str | None
) -> WebSocket:
    await stream.send_all(ws.send(AcceptConnection(subprotocol=subprotocol)))
    return WebSocket(stream, ws, receive_size)


def new_server_connection() -> WSConnection:
    return WSConnection(ConnectionType.SERVER)
