"""The relay task: callbacks for readable sockets, and trio keeps running around it."""

from __future__ import annotations

import socket
import threading

import pytest
import trio
import trio.testing

from aldaas.tunnel._relay import current_relay


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_if_a_socket_becomes_readable_then_its_handler_runs_until_removed() -> None:
    """If a handler is added for a socket, then it runs for each arrival; once removed, it
    does not run again, and removing it with another handler changes nothing."""
    relay = current_relay()
    a, b = pair()
    with a, b:
        seen: list[bytes] = []
        arrived = trio.Event()

        def handler(events: int) -> None:
            seen.append(b.recv(100))
            arrived.set()

        relay.add(b.fileno(), handler)
        relay.remove(b.fileno(), lambda events: None)  # not its handler: still registered
        a.send(b"one")
        with trio.fail_after(5):
            await arrived.wait()
        relay.remove(b.fileno(), handler)
        a.send(b"two")
        await trio.sleep(0.05)
        assert seen == [b"one"]
        assert b.recv(100) == b"two"


async def test_if_a_handler_raises_then_it_is_dropped_and_others_keep_running(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """If one handler raises, then it is logged and removed, and other sockets still get
    their callbacks."""
    relay = current_relay()
    bad_a, bad_b = pair()
    good_a, good_b = pair()
    with bad_a, bad_b, good_a, good_b:
        calls = {"bad": 0}
        arrived = trio.Event()

        def bad(events: int) -> None:
            calls["bad"] += 1
            raise RuntimeError("handler bug")

        def good(events: int) -> None:
            good_b.recv(100)
            arrived.set()

        relay.add(bad_b.fileno(), bad)
        relay.add(good_b.fileno(), good)
        bad_a.send(b"x")  # stays unread: a level-triggered handler that stayed would spin
        await trio.sleep(0.05)
        good_a.send(b"y")
        with trio.fail_after(5):
            await arrived.wait()
        relay.remove(good_b.fileno(), good)
    assert calls["bad"] == 1
    assert "tunnel relay handler failed" in capsys.readouterr().out


async def test_if_the_relay_is_busy_then_other_tasks_timers_and_threads_still_run() -> None:
    """If a peer keeps the relay busy with a ping-pong, then a task waiting on another
    socket, a sleeping task and a call from a thread all complete meanwhile."""
    relay = current_relay()
    a, b = pair()
    other_a, other_b = pair()
    stop = threading.Event()

    def peer() -> None:  # answers every byte at once, until told to stop
        a.setblocking(True)
        a.settimeout(5)
        while not stop.is_set():
            try:
                data = a.recv(100)
            except TimeoutError:
                return
            if not data:
                return
            a.send(data)

    rounds = {"n": 0}

    def handler(events: int) -> None:
        try:
            data = b.recv(100)
        except BlockingIOError:
            return
        rounds["n"] += 1
        if data:
            b.send(data)

    with a, b, other_a, other_b:
        thread = threading.Thread(target=peer)
        thread.start()
        try:
            relay.add(b.fileno(), handler)
            b.send(b"p")
            token = trio.lowlevel.current_trio_token()
            done: list[str] = []
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:

                    async def reader() -> None:
                        await trio.lowlevel.wait_readable(other_b)
                        done.append(other_b.recv(10).decode())

                    async def sleeper() -> None:
                        await trio.sleep(0.02)
                        done.append("slept")

                    nursery.start_soon(reader)
                    nursery.start_soon(sleeper)
                    await trio.sleep(0.005)
                    other_a.send(b"io")
                    await trio.to_thread.run_sync(
                        lambda: trio.from_thread.run_sync(done.append, "thread", trio_token=token)
                    )
            assert sorted(done) == ["io", "slept", "thread"]
            assert rounds["n"] > 1  # the ping-pong really ran meanwhile
            assert relay.waits_here > 0  # and it waited for them inside its own step
        finally:
            relay.remove(b.fileno(), handler)
            stop.set()
            b.shutdown(socket.SHUT_WR)  # the peer reads EOF and ends
            thread.join()


async def test_if_a_test_waits_for_all_tasks_blocked_then_it_returns_with_the_relay_idle() -> None:
    """If the relay has a registered, quiet socket, then wait_all_tasks_blocked still
    returns (the relay parks like any task)."""
    relay = current_relay()
    a, b = pair()
    with a, b:

        def handler(events: int) -> None:
            pass

        relay.add(b.fileno(), handler)
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
        relay.remove(b.fileno(), handler)


async def test_if_the_clock_is_a_mock_clock_then_the_relay_still_delivers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If the run has a test clock, then the relay never waits in its own step and still
    calls handlers."""
    relay = current_relay()
    a, b = pair()
    with a, b:
        arrived = trio.Event()

        def handler(events: int) -> None:
            b.recv(10)
            arrived.set()

        relay.add(b.fileno(), handler)
        await trio.sleep(3600)  # jumps: the relay must not hold the clock back
        a.send(b"x")
        await arrived.wait()
        relay.remove(b.fileno(), handler)
