"""Copy bytes both ways between a tunnel stream and a TCP connection."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket

import trio

from tunnel._mux import TunnelStream
from tunnel._protocol import ResetCode
from tunnel._relay import current_relay
from tunnel._ws import SocketReader, unlimit_unsent

TCP_READ_SIZE = 256 * 1024
"""Bytes asked of the TCP socket per read: large enough that bulk moves in few frames."""

_ABORTS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """Connect to ``host:port``; an IP literal skips resolution and happy eyeballs (a
    nursery and several scheduler passes per new stream), a name goes the usual way."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            # On loopback the handshake is usually over already: no scheduler pass then.
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error and error != errno.EISCONN:
            raise OSError(error, f"connecting to {host}:{port} failed: {os.strerror(error)}")
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class _RelayedReads:
    """TCP → tunnel with the reads done by the relay task: each read goes out at once while
    the stream has credit and replay room (no task switch); whatever does not fit is sent
    from the splice's task, which waits for credit, then hands the socket back."""

    def __init__(self, tunnel: TunnelStream, fd: int) -> None:
        self._tunnel = tunnel
        self._fd = fd
        self._relay = current_relay()
        self._rest: bytes | OSError | None = None
        self._ready = trio.Event()
        self._handler = self._on_readable  # one bound method: the relay removes by identity

    def _lend(self) -> trio.Event:
        """Hand the socket to the relay until a read does not fit or ends the stream."""
        self._rest = None
        self._ready = trio.Event()
        self._relay.add(self._fd, self._handler)
        return self._ready

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, TCP_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._rest = exc
        else:
            if data:
                sent = self._tunnel.send_available(data)
                if sent == len(data):
                    return
                self._rest = data[sent:]
            else:
                self._rest = b""
        self._relay.remove(self._fd, self._handler)
        self._ready.set()

    async def run(self) -> None:
        while True:
            ready = self._lend()
            try:
                await ready.wait()
            finally:
                self._relay.remove(self._fd, self._handler)
            rest = self._rest
            if isinstance(rest, OSError):
                raise rest
            if not rest:
                await self._tunnel.send_eof()
                return
            await self._tunnel.send_all(rest)


async def splice(tunnel: TunnelStream, tcp: trio.abc.HalfCloseableStream) -> None:
    """Relay until both directions finished; a broken end aborts the other one."""

    unlimit_unsent(tcp)

    async def upstream() -> None:
        if isinstance(tcp, trio.SocketStream):
            await _RelayedReads(tunnel, tcp.socket.fileno()).run()
            return
        reader = SocketReader(tcp, TCP_READ_SIZE)
        while True:
            data = await reader.read()
            if not data:
                await tunnel.send_eof()
                return
            sent = tunnel.send_available(bytes(data))
            if sent < len(data):
                await tunnel.send_all(memoryview(data)[sent:])

    async def downstream() -> None:
        while True:
            data = await tunnel.receive_some()
            if not data:
                await tcp.send_eof()
                return
            try:
                await tcp.send_all(data)
            finally:
                tunnel.sink_busy = False  # set by receive_some, so no byte overtakes ``data``

    if isinstance(tcp, trio.SocketStream):
        tunnel.sink_fd = tcp.socket.fileno()
        tunnel.flush_to_sink()  # what arrived before the connection was made

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(downstream)
            await upstream()  # in this task: one task fewer to start per connection
    except* _ABORTS:
        tunnel.reset(ResetCode.CONNECTION_LOST, "the TCP connection at the other end broke")
    finally:
        tunnel.sink_fd = None
        # Both close synchronously before their checkpoint, which may raise Cancelled.
        try:
            await trio.aclose_forcefully(tcp)
        finally:
            await trio.aclose_forcefully(tunnel)
