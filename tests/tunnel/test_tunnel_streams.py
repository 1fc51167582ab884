"""Multiplexed streams between two muxes joined in memory: stream semantics, flow control."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio
import trio.testing
from tunnel_fakes import mux_pair

from tunnel import TunnelStream
from tunnel._splice import connect_tcp

WINDOW = 64 * 1024


async def stream_pair(nursery: trio.Nursery) -> tuple[TunnelStream, TunnelStream]:
    client, accepted = await mux_pair(nursery, window=WINDOW)
    left = client.open_stream()
    right = await accepted.receive()
    return left, right


async def test_if_streams_are_checked_generically_then_they_behave_like_tcp(
    nursery: trio.Nursery,
) -> None:
    """If trio's generic half-closeable stream checks run, then every one passes."""

    async def maker() -> tuple[TunnelStream, TunnelStream]:
        return await stream_pair(nursery)

    async def clogged() -> tuple[TunnelStream, TunnelStream]:
        left, right = await stream_pair(nursery)
        # Spend the whole credit both ways (the check also runs flipped): sends must wait.
        await left.send_all(b"x" * WINDOW)
        await right.send_all(b"y" * WINDOW)
        return left, right

    await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_if_a_reader_is_slow_then_only_its_stream_waits_and_memory_stays_bounded(
    nursery: trio.Nursery,
) -> None:
    """If one stream's reader stops, then its sender stalls at one window and others flow."""
    client, accepted = await mux_pair(nursery, window=WINDOW)
    slow_out = client.open_stream()
    slow_in = await accepted.receive()
    fast_out = client.open_stream()
    fast_in = await accepted.receive()
    payload = os.urandom(10 * WINDOW)
    sent = trio.Event()

    async def send_everything() -> None:
        await slow_out.send_all(payload)
        sent.set()

    nursery.start_soon(send_everything)
    await trio.testing.wait_all_tasks_blocked()
    assert not sent.is_set()
    assert len(slow_in._buffer) == WINDOW
    await fast_out.send_all(b"ping")
    assert await fast_in.receive_some() == b"ping"
    received = bytearray()
    while len(received) < len(payload):
        received += await slow_in.receive_some(5000)
        assert len(slow_in._buffer) <= WINDOW
    await sent.wait()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_if_the_replay_budget_is_full_then_senders_wait_for_an_ack(
    nursery: trio.Nursery,
) -> None:
    """If unacknowledged bytes reach the replay budget, then a PING fetches an ACK and
    the transfer completes."""
    client, accepted = await mux_pair(nursery, window=WINDOW)
    client.replay_limit = 3 * WINDOW // 2
    out = client.open_stream()
    into = await accepted.receive()
    payload = os.urandom(6 * WINDOW)
    async with trio.open_nursery() as inner:
        inner.start_soon(out.send_all, payload)
        received = bytearray()
        while len(received) < len(payload):
            received += await into.receive_some()
            assert client.conn.replay_size <= client.replay_limit + WINDOW
    assert bytes(received) == payload


async def test_if_a_stream_is_reset_then_the_peer_reads_and_writes_fail(
    nursery: trio.Nursery,
) -> None:
    """If one side resets a stream, then the other side's receive and send break."""
    left, right = await stream_pair(nursery)
    left.reset(code=2, reason="no route")
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.BrokenResourceError, match=r"reset the stream \(code 2\): no route"):
        await right.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await right.send_all(b"x")


def drain_socket(sock: socket.socket) -> bytes:
    """Everything readable on a non-blocking socket right now."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


async def test_if_frames_arrive_together_for_a_spliced_stream_then_the_socket_gets_them_in_order(
    nursery: trio.Nursery,
) -> None:
    """If several DATA frames arrive in one read for a stream with a sink socket, then they
    are written there in order and their credit goes back to the sender."""
    left, right = await stream_pair(nursery)
    sink, far = socket.socketpair()
    with sink, far:
        sink.setblocking(False)
        far.setblocking(False)
        right.sink_fd = sink.fileno()
        payload = os.urandom(4 * 9000)  # over half the window: a WINDOW comes back
        for i in range(4):  # one burst, no checkpoint: one websocket read at the other end
            assert left.send_available(payload[i * 9000 : (i + 1) * 9000]) == 9000
        await trio.testing.wait_all_tasks_blocked()
        assert drain_socket(far) == payload
        assert left._mux.conn.send_window(left.stream_id) == WINDOW


async def test_if_the_sink_socket_is_full_then_the_rest_waits_in_the_stream_in_order(
    nursery: trio.Nursery,
) -> None:
    """If the sink socket takes only part of a burst, then the rest comes out of
    receive_some, after what the socket took, with nothing lost or reordered."""
    left, right = await stream_pair(nursery)
    sink, far = socket.socketpair()
    with sink, far:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sink.setblocking(False)
        far.setblocking(False)
        right.sink_fd = sink.fileno()
        payload = os.urandom(3 * 20000)
        for i in range(3):
            assert left.send_available(payload[i * 20000 : (i + 1) * 20000]) == 20000
        await trio.testing.wait_all_tasks_blocked()
        direct = drain_socket(far)
        assert 0 < len(direct) < len(payload)
        rest = b""
        while len(direct) + len(rest) < len(payload):
            rest += await right.receive_some()
            right.sink_busy = False
        assert direct + rest == payload


async def test_if_a_session_carries_steady_small_traffic_then_the_replay_buffer_stays_small(
    nursery: trio.Nursery,
) -> None:
    """If many small messages flow (a database session), then the receiver acknowledges
    every 64 KiB, so the sender keeps at most that much for replay, not a quarter of its
    8 MiB budget."""
    client, accepted = await mux_pair(nursery, window=WINDOW)
    out = client.open_stream()
    into = await accepted.receive()
    largest = 0
    for _ in range(3000):  # 600 kB in all
        await out.send_all(b"q" * 200)
        assert await into.receive_some() == b"q" * 200
        largest = max(largest, client.conn.replay_size)
    assert largest <= 64 * 1024 + 2 * 1024


async def test_if_a_tcp_address_refuses_or_answers_then_connect_tcp_says_so_or_connects() -> None:
    """If nothing listens at an IP literal, then connect_tcp raises an OSError naming the
    address; if something does, it returns a working stream (loopback: often with no wait)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(OSError, match=rf"connecting to 127\.0\.0\.1:{port} failed"):
        await connect_tcp("127.0.0.1", port)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as server:
        stream = await connect_tcp("127.0.0.1", server.socket.getsockname()[1])
        accepted = await server.accept()
        async with stream, accepted:
            await stream.send_all(b"hi")
            assert await accepted.receive_some(10) == b"hi"
