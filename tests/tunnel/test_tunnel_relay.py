"""The relays: callbacks for ready sockets, and trio keeps running around them."""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest
import trio
import trio.testing

from aldaas.tunnel._relay import (
    READABLE,
    RELAY_ENV,
    TROUBLE,
    WRITABLE,
    current_relay,
    epoll_available,
    resolve_mode,
)

linux_only = pytest.mark.skipif(not epoll_available(), reason="the epoll relay is Linux's")


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.mark.usefixtures("relay_mode")
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


@pytest.mark.usefixtures("relay_mode")
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


@linux_only
async def test_if_the_relay_is_busy_then_other_tasks_timers_and_threads_still_run() -> None:
    """If a peer keeps the epoll relay busy with a ping-pong, then a task waiting on another
    socket, a sleeping task and a call from a thread all complete meanwhile."""
    relay = current_relay("epoll")
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
            assert relay.waits_here > 0  # type: ignore[attr-defined]  # waited in its step
        finally:
            relay.remove(b.fileno(), handler)
            stop.set()
            b.shutdown(socket.SHUT_WR)  # the peer reads EOF and ends
            thread.join()


@pytest.mark.usefixtures("relay_mode")
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


@pytest.mark.usefixtures("relay_mode")
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


@linux_only
def test_if_the_relay_events_are_named_then_they_are_linux_epoll_bits() -> None:
    """If the epoll relay passes masks straight to epoll, then our event bits must be
    Linux's (the portable relay only ever reports READABLE or WRITABLE)."""
    assert (READABLE, WRITABLE, TROUBLE) == (
        select.EPOLLIN,
        select.EPOLLOUT,
        select.EPOLLERR | select.EPOLLHUP,
    )


def test_if_the_mode_is_auto_then_the_environment_and_then_the_platform_decide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the setting says auto, then ALDAAS_TUNNEL_RELAY decides when set, else epoll where
    it exists; a setting that names a relay wins over the variable."""
    native = "epoll" if epoll_available() else "portable"
    assert resolve_mode("auto", {}) == native
    assert resolve_mode("auto", {RELAY_ENV: " Portable "}) == "portable"
    assert resolve_mode("auto", {RELAY_ENV: "auto"}) == native
    assert resolve_mode("portable", {RELAY_ENV: "epoll"}) == "portable"
    with pytest.raises(
        ValueError,
        match=r"^ALDAAS_TUNNEL_RELAY must be auto, epoll or portable, "
        r"got 'kqueue'; pick one of them$",
    ):
        resolve_mode("auto", {RELAY_ENV: "kqueue"})
    monkeypatch.delattr(select, "epoll", raising=False)  # as on macOS and Windows
    assert resolve_mode("auto", {}) == "portable"
    with pytest.raises(ValueError, match=r"needs Linux's select\.epoll and this platform has none"):
        resolve_mode("epoll", {})
    with pytest.raises(ValueError, match=r"^ALDAAS_TUNNEL_RELAY asks for the epoll relay"):
        resolve_mode("auto", {RELAY_ENV: "epoll"})


async def test_if_a_socket_is_forgotten_and_its_number_reused_then_only_the_new_owner_hears() -> (
    None
):
    """If the portable relay forgets a socket that is then closed, and a new socket gets the
    same number, then only the new socket's handler runs, for the new socket's data."""
    relay = current_relay("portable")
    a, b = pair()
    old_calls: list[int] = []
    old = old_calls.append
    relay.add(b.fileno(), old)
    number = b.fileno()
    relay.forget(number, old)
    b.close()
    c, d = pair()
    if c.fileno() == number:
        c, d = d, c
    elif d.fileno() != number:  # the kernel handed out other numbers: reuse it by hand
        os.dup2(d.fileno(), number)
        d.close()
        d = socket.socket(fileno=number)
    with a, c, d:
        arrived = trio.Event()
        got: list[bytes] = []

        def new(events: int) -> None:
            got.append(d.recv(10))
            arrived.set()

        relay.add(number, new)
        c.send(b"new")
        with trio.fail_after(5):
            await arrived.wait()
        relay.forget(number, new)
        assert (old_calls, got) == ([], [b"new"])


async def test_if_writability_is_asked_for_then_the_portable_relay_reports_it_once_wanted() -> None:
    """If a socket is watched for writing and then only for reading, then the handler hears
    WRITABLE while it was wanted and READABLE once data arrives, never WRITABLE after."""
    relay = current_relay("portable")
    a, b = pair()
    with a, b:
        seen: list[int] = []
        arrived = trio.Event()

        def handler(events: int) -> None:
            seen.append(events)
            if events == WRITABLE:
                relay.watch(b.fileno(), handler, READABLE)
            else:
                b.recv(10)
                arrived.set()

        relay.watch(b.fileno(), handler, READABLE | WRITABLE)
        await trio.testing.wait_all_tasks_blocked()
        a.send(b"x")
        with trio.fail_after(5):
            await arrived.wait()
        relay.remove(b.fileno(), handler)
        assert seen == [WRITABLE, READABLE]
