"""Pipes: a real loopback TCP connection spliced to a multiplexed stream by relay callbacks."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing
from tunnel_fakes import mux_pair, receive_exactly, send_in_background

from aldaas.tunnel import TunnelStream, _splice
from aldaas.tunnel._splice import TCP_READ_SIZE, Pipe, connect_socket, start_connect

pytestmark = pytest.mark.usefixtures("relay_mode")  # each test on both relays

WINDOW = 64 * 1024


def tcp_pair(*, small: bool = False) -> tuple[socket.socket, socket.socket]:
    """Both ends of one loopback TCP connection, non-blocking; ``small`` buffers (set before
    the handshake, when the kernel sizes them) hold a few KiB from near to far."""
    with socket.socket() as server:
        if small:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # far inherits it
        server.bind(("127.0.0.1", 0))
        server.listen()
        near = socket.socket()
        if small:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        near.connect(server.getsockname())
        far, _ = server.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


def buffer_within_window(stream: TunnelStream) -> None:
    assert len(stream._buffer) <= WINDOW


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail a test that hangs (a pipe that never passes something on) within 10 s."""

    @functools.wraps(test)
    async def run(*args: object, **kwargs: object) -> None:
        with trio.fail_after(10):
            await test(*args, **kwargs)

    return run


def as_stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


Piped = tuple[TunnelStream, Pipe, trio.SocketStream]


@pytest.fixture
async def piped(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Awaitable[Piped]]]:
    """Makes a stream whose far end is piped into a TCP connection: (stream, pipe, TCP
    peer); the session ends and the sockets close after the test."""
    made: list[Piped] = []

    async def make(*, small: bool = False, **options: int) -> Piped:
        client, accepted = await mux_pair(nursery, window=WINDOW, **options)
        left = client.open_stream()
        right = await accepted.receive()
        near, far = tcp_pair(small=small)
        made.append((left, Pipe(right, near, client.relay(), read_now=False), as_stream(far)))
        return made[-1]

    yield make
    for left, pipe, far in made:
        pipe._stream._mux.finish("the test is over")
        left._mux.finish("the test is over")
        far.socket.close()


@bounded
async def test_if_frames_arrive_together_for_a_piped_stream_then_the_socket_gets_them_in_order(
    piped: Callable[..., Awaitable[Piped]],
) -> None:
    """If several DATA frames arrive in one read, then they reach the TCP peer in order and
    their credit goes back to the sender as soon as the socket took them."""
    left, _pipe, far = await piped()
    payload = os.urandom(4 * 9000)  # over half the window: a WINDOW comes back
    for i in range(4):  # one burst, no checkpoint: one websocket read at the other end
        assert left.send_available(payload[i * 9000 : (i + 1) * 9000]) == 9000
    await trio.testing.wait_all_tasks_blocked()
    assert left.send_window() == WINDOW
    assert await receive_exactly(far, len(payload)) == payload


@bounded
async def test_if_the_tcp_peer_reads_slowly_then_the_pipe_holds_at_most_a_window(
    piped: Callable[..., Awaitable[Piped]], nursery: trio.Nursery
) -> None:
    """If the TCP peer does not read, then the pipe keeps at most one window of unwritten
    bytes, the sender waits for credit, and once the peer reads everything arrives intact."""
    left, pipe, far = await piped(small=True)
    payload = os.urandom(20 * WINDOW)
    sent = send_in_background(nursery, left, payload)
    await trio.testing.wait_all_tasks_blocked()
    assert not sent.is_set()
    assert 0 < sum(len(part) for part in pipe._out) <= WINDOW
    received = await receive_exactly(far, len(payload))
    await sent.wait()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


@bounded
async def test_if_the_tcp_peer_sends_more_than_the_window_then_reading_pauses_and_resumes(
    piped: Callable[..., Awaitable[Piped]], nursery: trio.Nursery
) -> None:
    """If the TCP peer sends faster than the stream's reader takes it, then the pipe stops
    reading at one window (the rest stays in the kernel) and nothing is lost."""
    left, pipe, far = await piped()
    payload = os.urandom(20 * WINDOW)
    nursery.start_soon(far.send_all, payload)
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(10):  # the bytes reach the pipe in a few reads
        if not pipe._reading:
            break
        await trio.testing.wait_all_tasks_blocked()
    assert not pipe._reading
    assert len(pipe._rest) <= TCP_READ_SIZE
    assert len(left._buffer) <= WINDOW
    received = await receive_exactly(
        left, len(payload), max_bytes=10000, check=lambda: buffer_within_window(left)
    )
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


@bounded
async def test_if_the_replay_room_runs_out_then_a_piped_upload_waits_for_an_ack(
    piped: Callable[..., Awaitable[Piped]], nursery: trio.Nursery
) -> None:
    """If unacknowledged bytes fill the piped side's replay budget before the receiver's
    periodic ACK is due, then the pipe asks for one (PING) and the transfer completes,
    bounded by the budget."""
    left, pipe, far = await piped()
    mux = pipe._stream._mux
    mux.replay_limit = 48 * 1024  # below the receiver's ACK interval (64 KiB)
    payload = os.urandom(8 * WINDOW)
    nursery.start_soon(far.send_all, payload)

    def bounded_replay() -> None:
        assert mux.conn.replay_size <= mux.replay_limit + TCP_READ_SIZE

    assert await receive_exactly(left, len(payload), check=bounded_replay) == payload


@bounded
async def test_if_each_side_half_closes_then_the_other_sees_eof_and_the_pipe_closes(
    piped: Callable[..., Awaitable[Piped]],
) -> None:
    """If the TCP peer and the stream each finish sending, then each sees the other's EOF
    after its data, and the pipe closes the socket and forgets the stream."""
    left, pipe, far = await piped()
    await far.send_all(b"question")
    await far.send_eof()
    assert await receive_exactly(left, 8) == b"question"
    assert await left.receive_some() == b""
    assert not pipe.closed
    await left.send_all(b"answer")
    await left.send_eof()
    assert await receive_exactly(far, 6) == b"answer"
    assert await far.receive_some() == b""
    await trio.testing.wait_all_tasks_blocked()
    assert pipe.closed
    assert pipe._sock.fileno() == -1
    assert pipe._stream.stream_id not in pipe._stream._mux.streams


@bounded
async def test_if_the_stream_is_reset_then_the_tcp_peer_sees_the_connection_end(
    piped: Callable[..., Awaitable[Piped]],
) -> None:
    """If the other side resets the stream, then the pipe closes its socket at once."""
    left, pipe, far = await piped()
    left.reset(code=2, reason="gone")
    assert await far.receive_some() == b""
    assert pipe.closed


@bounded
async def test_if_the_tcp_connection_breaks_then_the_stream_is_reset_with_the_reason(
    piped: Callable[..., Awaitable[Piped]],
) -> None:
    """If the TCP peer aborts (RST), then the stream's other end fails naming the lost
    connection."""
    left, pipe, far = await piped()
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.socket.close()
    with pytest.raises(trio.BrokenResourceError, match="TCP connection at the other end broke"):
        await left.receive_some()
    assert pipe.closed


@bounded
async def test_if_the_session_ends_then_every_piped_socket_closes(
    piped: Callable[..., Awaitable[Piped]],
) -> None:
    """If the session ends, then each pipe closes its TCP connection (no socket leaks)."""
    _left, pipe, far = await piped()
    pipe._stream._mux.finish("the test ended the session")
    assert pipe.closed
    assert await far.receive_some() == b""


@bounded
async def test_if_sockets_are_not_file_descriptors_then_the_pipe_uses_recv_and_send(
    piped: Callable[..., Awaitable[Piped]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If sockets are no file descriptors (Windows), then the pipe moves bursts of frames
    both ways with the socket's own recv and send, and passes the half-close on."""
    monkeypatch.setattr(_splice, "SOCKET_IS_FD", False)
    left, _pipe, far = await piped()
    down = os.urandom(4 * 9000)
    for i in range(4):  # several payloads in one delivery: one joined send
        assert left.send_available(down[i * 9000 : (i + 1) * 9000]) == 9000
    assert await receive_exactly(far, len(down)) == down
    up = os.urandom(3 * WINDOW)
    async with trio.open_nursery() as nursery:
        sent = send_in_background(nursery, far, up)
        assert await receive_exactly(left, len(up)) == up
    assert sent.is_set()
    await far.send_eof()
    assert await left.receive_some() == b""


async def test_if_a_target_refuses_or_answers_then_connecting_says_so_or_connects() -> None:
    """If nothing listens at an IP literal, then connecting raises an OSError naming the
    address; a listening one connects (on loopback with no wait), a host name too."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(OSError, match=rf"connecting to 127\.0\.0\.1:{port} failed"):
        await connect_socket("127.0.0.1", port)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        started = start_connect("127.0.0.1", port)
        assert started is not None
        with started[0]:
            pass
        assert start_connect("localhost", port) is None  # a name: resolved in a task
        with await connect_socket("localhost", port) as sock:
            assert sock.getpeername()[1] == port
