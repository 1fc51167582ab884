"""Splice TCP connections and tunnel streams together, and connect to TCP addresses.

A :class:`Pipe` joins one TCP socket and one tunnel stream without a trio task: the relay
task (tunnel/_relay.py) calls it when the socket is readable (or writable while data waits
for it), and the mux hands it what the stream receives. A new connection therefore costs no
task spawn and no scheduler pass on either side, and a message costs none either: opening a
stream used to take about 25 task steps per connection on each side, which was most of its
latency.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

import trio

from aldaas.tunnel._mux import TunnelStream
from aldaas.tunnel._protocol import ResetCode
from aldaas.tunnel._relay import READABLE as _IN
from aldaas.tunnel._relay import TROUBLE as _TROUBLE
from aldaas.tunnel._relay import WRITABLE as _OUT
from aldaas.tunnel._relay import Relay

TCP_READ_SIZE = 256 * 1024
"""Bytes asked of the TCP socket per read: large enough that bulk moves in few frames."""
_IOV_MAX = 1024
_LOST = "the TCP connection at the other end broke"
_IN_PROGRESS = {errno.EINPROGRESS, errno.EWOULDBLOCK, getattr(errno, "WSAEWOULDBLOCK", 10035)}
"""``connect_ex`` results of a non-blocking connect under way (Windows says WSAEWOULDBLOCK)."""
SOCKET_IS_FD = os.name != "nt"
"""Whether a socket is a file descriptor (``os.read``/``os.writev`` work on it): everywhere
but Windows, where the socket's own ``recv``/``send`` are used."""


def read_socket(sock: socket.socket, fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the non-blocking socket ``sock`` (``fd`` is its number);
    raises BlockingIOError if none are there yet."""
    return os.read(fd, size) if SOCKET_IS_FD else sock.recv(size)


def write_socket(sock: socket.socket, fd: int, parts: Sequence[bytes | memoryview]) -> int:
    """Write as much of ``parts`` as the non-blocking socket takes now, in one system call
    (``writev`` where sockets are file descriptors); the number of bytes written."""
    if len(parts) == 1:
        return os.write(fd, parts[0]) if SOCKET_IS_FD else sock.send(parts[0])
    if SOCKET_IS_FD:
        return os.writev(fd, parts[:_IOV_MAX])
    return sock.send(b"".join(parts))


def _ip_family(host: str) -> socket.AddressFamily | None:
    """The family of an IP literal, None for a host name (``inet_pton``: ``ipaddress``
    costs ~10 µs per new stream)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def start_connect(host: str, port: int) -> tuple[socket.socket, bool] | None:
    """Begin a non-blocking connect to an IP literal: ``(socket, connected)``; None for a
    host name (connect with :func:`connect_socket`). On loopback the handshake is usually
    over when ``connect`` returns, so no wait is needed. Raises OSError if it failed."""
    family = _ip_family(host)
    if family is None:
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)  # not SOCK_NONBLOCK: Linux only
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex((host, port))
        if error in _IN_PROGRESS:
            try:
                sock.getpeername()  # succeeds once the handshake is over
            except OSError:
                return sock, False  # under way (or failed: finish_connect says which)
            error = 0
        _check_connected(error, host, port)
    except BaseException:
        sock.close()
        raise
    return sock, True


def _check_connected(error: int, host: str, port: int) -> None:
    if error and error != errno.EISCONN:
        raise OSError(error, f"connecting to {host}:{port} failed: {os.strerror(error)}")


async def connect_socket(host: str, port: int) -> socket.socket:
    """Connect to ``host:port`` (a name goes through trio's resolution and happy eyeballs);
    a connected non-blocking socket."""
    started = start_connect(host, port)
    if started is None:
        stream = await trio.open_tcp_stream(host, port)
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        return sock
    sock, connected = started
    return sock if connected else await finish_connect(sock, host, port)


async def finish_connect(sock: socket.socket, host: str, port: int) -> socket.socket:
    """Wait until a connect that :func:`start_connect` began is over (closes ``sock`` if
    it failed or was cancelled)."""
    try:
        await trio.lowlevel.wait_writable(sock)
        _check_connected(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), host, port)
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return sock


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """:func:`connect_socket` as a trio stream."""
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = await connect_socket(host, port)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class Pipe:
    """Relay bytes both ways between a connected non-blocking TCP socket and a tunnel
    stream, with every step done in a callback (see the module docstring).

    TCP → tunnel: each read goes out at once while the stream has credit and the session
    replay room; what does not fit waits here, reading stops, and the stream's ``writable``
    resumes it. Tunnel → TCP: each delivery is written at once (one ``writev``); what the
    socket does not take waits here until it is writable, and only written bytes return
    credit. A FIN is passed on in each direction; when both are done the socket and the
    stream close. A broken socket resets the stream; a broken stream closes the socket.
    """

    def __init__(
        self, stream: TunnelStream, sock: socket.socket, relay: Relay, *, read_now: bool
    ) -> None:
        self._stream = stream
        self._sock = sock
        self._fd = sock.fileno()
        self._relay = relay
        self._handler = self._on_events  # one bound method: the relay removes by identity
        self._events = 0
        self._reading = True
        self._rest = b""
        self._out: list[bytes | memoryview] = []
        self._fin_received = False
        self._sent_fin = False
        self._shut = False
        self.closed = False
        stream.attach(self)
        if not self.closed:
            if read_now:
                self._read()
            self._update()

    # -------------------------------------------------------------- socket side

    def _update(self) -> None:
        if self.closed:
            return
        events = (_IN if self._reading else 0) | (_OUT if self._out else 0)
        if events != self._events:
            self._events = events
            self._relay.watch(self._fd, self._handler, events)

    def _on_events(self, events: int) -> None:
        # Each step below calls _update() itself when it changes what we wait for.
        if self._out and events & (_OUT | _TROUBLE):
            self._write_out()
        if self._reading and events & (_IN | _TROUBLE):
            self._read()

    def _read(self) -> None:
        try:
            data = read_socket(self._sock, self._fd, TCP_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._abort(f"{_LOST}: {exc.strerror or exc}")
            return
        if not data:
            self._reading = False
            self._stream.finish_sending()
            self._sent_fin = True
            self._update()
            self._maybe_done()
            return
        sent = self._stream.send_available(data)
        if sent < len(data):
            self._rest = data[sent:]
            self._reading = False
            self._update()
            self._wait_credit()

    def _wait_credit(self) -> None:
        stream = self._stream
        if stream.send_window() > 0:
            stream.want_room()
        # Else the peer's WINDOW frame calls writable().

    def writable(self) -> None:
        if self.closed or not self._rest:
            return
        sent = self._stream.send_available(self._rest)
        self._rest = self._rest[sent:]
        if self._rest:
            self._wait_credit()
            return
        self._reading = True
        self._update()

    # -------------------------------------------------------------- stream side

    def deliver(self, parts: list[bytes], fin: bool) -> None:
        if self.closed:
            return
        if self._out:
            self._out.extend(parts)
        elif parts and not self._write(parts):
            return
        if fin:
            self._fin_received = True
            if not self._out:
                self._shutdown()
        if self._out and not self._events & _OUT:
            self._update()

    def _write(self, parts: Sequence[bytes | memoryview]) -> bool:
        """Write ``parts`` now; keep what the socket did not take for when it is writable.
        False if the connection broke (the pipe is closed then)."""
        try:
            written = write_socket(self._sock, self._fd, parts)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._abort(f"{_LOST}: {exc.strerror or exc}")
            return False
        if written:
            self._stream.consumed(written)
        total = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if written == total:
            return True
        rest: list[bytes | memoryview] = []
        for part in parts:
            if written >= len(part):
                written -= len(part)
            elif written:
                rest.append(memoryview(part)[written:])
                written = 0
            else:
                rest.append(part)
        self._out = rest
        return True

    def _write_out(self) -> None:
        """The socket became writable: write what waited for it."""
        out, self._out = self._out, []
        if not self._write(out):
            return
        if not self._out and self._fin_received:
            self._shutdown()
        self._update()

    def _shutdown(self) -> None:
        if self._shut or self.closed:
            return
        self._shut = True
        if self._sent_fin:
            self._close()  # both directions are over: close() sends the FIN itself
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._abort(f"{_LOST}: {exc.strerror or exc}")
            return
        self._maybe_done()

    def broken(self, reason: str) -> None:
        self._close()

    # -------------------------------------------------------------- the end

    def _maybe_done(self) -> None:
        if self._sent_fin and self._shut:
            self._close()

    def _abort(self, reason: str) -> None:
        self._stream.reset(ResetCode.CONNECTION_LOST, reason)
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._relay.forget(self._fd, self._handler)  # closing the socket unregisters it
        self._events = 0
        self._out = []
        self._rest = b""
        self._sock.close()
        self._stream.close()
