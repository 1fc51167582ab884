"""Multiplexed streams between two muxes joined in memory: stream semantics, flow control."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing
from tunnel_fakes import mux_pair, receive_exactly, send_in_background

from aldaas.tunnel import TunnelStream

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
    sent = send_in_background(nursery, slow_out, payload)
    await trio.testing.wait_all_tasks_blocked()
    assert not sent.is_set()
    assert len(slow_in._buffer) == WINDOW
    await fast_out.send_all(b"ping")
    assert await fast_in.receive_some() == b"ping"

    def bounded_buffer() -> None:
        assert len(slow_in._buffer) <= WINDOW

    received = await receive_exactly(slow_in, len(payload), max_bytes=5000, check=bounded_buffer)
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

    def bounded_replay() -> None:
        assert client.conn.replay_size <= client.replay_limit + WINDOW

    async with trio.open_nursery() as inner:
        inner.start_soon(out.send_all, payload)
        received = await receive_exactly(into, len(payload), check=bounded_replay)
    assert received == payload


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
