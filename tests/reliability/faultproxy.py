"""A fault-injecting TCP proxy on loopback, for tests (S3 downloads, client ↔ gateway links).

Run it in a trio nursery in front of any TCP server::

    proxy = FaultProxy("127.0.0.1", server_port)
    await nursery.start(proxy.run)
    ... connect to ("127.0.0.1", proxy.port) ...
    proxy.mode = "refuse"          # new connections are closed at once (server unreachable)
    proxy.mode = "blackhole"       # new connections are accepted and never answered
    proxy.mode = "reply_503"       # answer every connection with an HTTP 503 and close
    proxy.cut_after = 65536        # each new connection breaks after that many bytes downstream
    proxy.cut_when = b"GET /x"     # ... but only connections whose upstream bytes contain this
    proxy.stall_after = 0          # each new connection stops forwarding server → client after
                                   # that many bytes and holds the link open, silent (also
                                   # limited by cut_when): a black hole in mid-answer
    proxy.cut()                    # break every live connection now (a network cut)
    proxy.mode = "pass"            # back to normal (the link is restored)

Everything is bounded: the proxy's own tasks live in the nursery it was
started in and end with it. Faults apply to connections as they happen;
``cut()`` ends live ones. Counters (``connections``, ``cuts``, ``stalls``) let a test
prove that a fault was actually hit.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Literal

import trio

Mode = Literal["pass", "refuse", "blackhole", "reply_503"]

_REPLY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/xml\r\n"
    b"Content-Length: 93\r\n"
    b"Connection: close\r\n\r\n"
    b"<Error><Code>ServiceUnavailable</Code><Message>injected by faultproxy</Message></Error>\n\n\n\n\n"
)


class FaultProxy:
    """Forwards TCP connections from a loopback port to ``(host, port)``, with faults on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode: Mode = "pass"
        self.cut_after: int | None = None
        """Break a connection after this many bytes went server → client (None: never)."""
        self.cut_when: bytes | None = None
        """Apply ``cut_after`` and ``stall_after`` only to connections whose client → server bytes
        contain this."""
        self.stall_after: int | None = None
        """Stop forwarding server → client after this many bytes, keeping the link open (None:
        never)."""
        self.port = 0
        self.connections = 0
        """Connections accepted so far."""
        self.cuts = 0
        """Connections broken by a fault (cut_after, cut(), reply_503, refuse)."""
        self.stalls = 0
        """Connections that went silent (stall_after, or accepted in ``blackhole`` mode)."""
        self._live: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def cut(self) -> None:
        """Break every live connection now (both directions), as a network cut would."""
        for scope in list(self._live):
            scope.cancel()
        self.cuts += len(self._live)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        mode = self.mode
        async with client:
            if mode == "refuse":
                self.cuts += 1
                _reset(client)
                return
            if mode == "blackhole":
                self.stalls += 1
                with trio.CancelScope() as scope:
                    self._live.add(scope)
                    try:  # read and drop what the client sends, answer nothing, until it leaves
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError
                        ):
                            while await client.receive_some(65536):
                                pass
                    finally:
                        self._live.discard(scope)
                return
            if mode == "reply_503":
                self.cuts += 1
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.receive_some(65536)
                    await client.send_all(_REPLY_503)
                return
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                _reset(client)
                return
            async with server:
                await self._pump(client, server)

    async def _pump(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        seen = bytearray()
        armed = self.cut_after
        stall_armed = self.stall_after
        matcher = self.cut_when
        budget: list[int | None] = [armed if matcher is None else None]
        stall: list[int | None] = [stall_armed if matcher is None else None]
        stalled = trio.Event()

        async def upstream() -> None:
            while data := await client.receive_some(65536):
                if matcher is not None and budget[0] is None and stall[0] is None:
                    seen.extend(data)
                    if matcher in seen:
                        budget[0] = armed
                        stall[0] = stall_armed
                    del seen[: max(0, len(seen) - len(matcher))]
                await server.send_all(data)
            if stalled.is_set():  # the client gave up on the silent link: nothing left to do
                nursery.cancel_scope.cancel()
                return
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await server.send_eof()

        async def downstream() -> None:
            while data := await server.receive_some(65536):
                quiet = stall[0]
                if quiet is not None and len(data) >= quiet:
                    if quiet:
                        await client.send_all(data[:quiet])
                    self.stalls += 1
                    stalled.set()
                    await trio.sleep_forever()  # silent, link open, until the client leaves
                if quiet is not None:
                    stall[0] = quiet - len(data)
                left = budget[0]
                if left is not None and len(data) >= left:
                    await client.send_all(data[:left])
                    self.cuts += 1
                    _reset(client)
                    nursery.cancel_scope.cancel()
                    return
                if left is not None:
                    budget[0] = left - len(data)
                await client.send_all(data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send_eof()

        with trio.CancelScope() as scope:
            self._live.add(scope)
            try:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(upstream)
                        nursery.start_soon(downstream)
            finally:
                self._live.discard(scope)
        if scope.cancel_called:  # cut(): the peer must see a broken link, not a clean end
            _reset(client)


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST rather than FIN where possible, so the peer sees a broken link."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
