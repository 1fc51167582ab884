"""The relay: one place that watches every hot socket of the process (websockets, relayed
TCP sockets, the client's listeners) and calls a plain callback for each one that is ready.
The callbacks (the mux's frame handling, a pipe's TCP read or write, the client's accept)
never block and never wait for a task; two relays deliver them:

- :class:`EpollRelay`, the Linux accelerator. Relaying a small message the plain trio way
  costs a scheduler pass per message: the task waiting on the socket is woken through
  trio's epoll (``epoll_wait``, then ``epoll_ctl`` to re-arm the one-shot registration),
  rescheduled, stepped, and parked again. That pass was about half of the CPU the tunnel
  spent per ``pgbench`` transaction. Here every hot socket stays registered,
  level-triggered, in one epoll of our own, and one system task runs the callbacks back to
  back in one task step.

  While messages keep coming, it waits for the next one in its own epoll *without leaving
  its task step* (``poll`` on our epoll and trio's together, bounded by trio's next
  deadline and :data:`HOT_WAIT`), so a busy relay costs one ``poll`` and the reads and
  writes per message; what is ready already is taken with one ``epoll_wait`` and no
  ``poll``. It leaves the step whenever trio has anything to do: a task became runnable,
  trio's own epoll has an event, a deadline is due, a test waits for all tasks to be
  blocked, or the clock is a test clock (noticed when it next waits, and at least every
  :data:`YIELD_EVERY`). After :data:`HOT_WAIT` without traffic it parks in trio like any
  task (``wait_readable`` on its epoll).

  Reading trio's run queue, deadlines and epoll uses trio internals (checked once per run);
  where they are not what we expect, the relay never waits in its own step, and stays
  correct, only slower.

- :class:`PortableRelay`, everywhere (macOS, Windows, or Linux with the accelerator turned
  off): one small task per socket and direction waits with trio's own
  ``wait_readable``/``wait_writable`` (kqueue, IOCP/AFD, epoll) and calls the same callback.
  The callbacks, and so the protocol and its behaviour, are the same code on both.

Which one a gateway or client uses is its ``relay`` setting (:data:`RelayMode`); ``auto``
takes the environment variable :data:`RELAY_ENV` if it is set, else the accelerator where
``select.epoll`` exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import structlog
import trio
import trio.testing

log = structlog.get_logger()

HOT_WAIT = 0.002
"""Seconds the relay waits for traffic inside its task step before it parks in trio."""
YIELD_EVERY = 0.005
"""While busy, the relay still yields to trio at least this often (seconds): the bound on
how late trio's own I/O and deadlines are served while our sockets always have something
ready. Whenever it waits it leaves at once for them; each yield costs two scheduler passes
(to become alone again), about 30 µs, which at 1 ms was a tenth of the CPU of a short
connection."""
IDLE_WAIT = 0.001
"""Seconds the relay waits for every other task to block before it may wait in its step;
our sockets are not watched meanwhile."""

READABLE = 0x001
"""Event bit: the socket is readable (Linux's ``EPOLLIN``, so epoll masks pass unchanged)."""
WRITABLE = 0x004
"""Event bit: the socket is writable (``EPOLLOUT``)."""
TROUBLE = 0x008 | 0x010
"""Event bits: an error or hang-up (``EPOLLERR | EPOLLHUP``; the portable relay reports
these as readable or writable, where the next call meets the error)."""

Handler = Callable[[int], None]
"""Called with the event mask (:data:`READABLE` | :data:`WRITABLE` | :data:`TROUBLE`)."""

RelayMode = Literal["auto", "epoll", "portable"]
"""Which relay to use: ``epoll`` (Linux only), ``portable`` (trio's own waits, any
platform), or ``auto``: :data:`RELAY_ENV` if set, else ``epoll`` where it exists."""
RelayKind = Literal["epoll", "portable"]
"""What a :data:`RelayMode` stands for on this platform (:func:`resolve_mode`)."""
RELAY_ENV = "ALDAAS_TUNNEL_RELAY"
"""Environment variable that ``auto`` follows: ``epoll`` or ``portable``."""


def epoll_available() -> bool:
    """Whether this platform has ``select.epoll`` (Linux)."""
    return hasattr(select, "epoll")


def resolve_mode(mode: str, environ: Mapping[str, str] | None = None) -> RelayKind:
    """The relay ``mode`` (a :data:`RelayMode`) stands for here; ``auto`` reads
    :data:`RELAY_ENV` in ``environ`` (default ``os.environ``). Raises ValueError (one
    sentence naming the setting or the variable) for an unknown mode, or for ``epoll``
    where it does not exist."""
    env = os.environ if environ is None else environ
    source = "the tunnel relay setting"
    chosen = mode
    if mode == "auto":
        chosen = env.get(RELAY_ENV, "").strip().lower()
        if not chosen or chosen == "auto":
            return "epoll" if epoll_available() else "portable"
        source = RELAY_ENV
    if chosen == "portable":
        return "portable"
    if chosen != "epoll":
        raise ValueError(
            f"{source} must be auto, epoll or portable, got {chosen!r}; pick one of them"
        )
    if not epoll_available():
        raise ValueError(
            f"{source} asks for the epoll relay, which needs Linux's select.epoll and this "
            "platform has none; use auto or portable"
        )
    return "epoll"


class Relay(Protocol):
    """What owners of sockets use; :func:`current_relay` gives the run's relay."""

    callbacks: int

    def add(self, fd: int, handler: Handler) -> None:
        """Call ``handler(events)`` (in a relay task) whenever ``fd`` is readable, until
        :meth:`remove`. The handler must not raise and must not block."""

    def watch(self, fd: int, handler: Handler, events: int) -> None:
        """Call ``handler(events)`` whenever ``fd`` has one of ``events`` (level-triggered:
        while the condition holds, it is called again); ``events`` 0 is :meth:`remove`."""

    def remove(self, fd: int, handler: Handler) -> None:
        """Stop calling ``handler`` for ``fd`` (nothing if another handler took the fd
        number since: the socket was closed and the number reused)."""

    def forget(self, fd: int, handler: Handler) -> None:
        """:meth:`remove` for a socket about to be closed (and never duplicated)."""


_RELAYS: trio.lowlevel.RunVar[dict[RelayKind, Relay]] = trio.lowlevel.RunVar("aldaas_relays")


def _call(relay: Relay, fd: int, handler: Handler, events: int) -> bool:
    """Run one handler; False if it raised (logged, and the handler removed: a bug in one
    owner's handler must not end every relay)."""
    try:
        handler(events)
    except Exception:
        log.exception("tunnel relay handler failed", fd=fd)
        relay.remove(fd, handler)
        return False
    return True


class _TrioView:
    """What the relay reads of trio's run loop (private attributes, checked once)."""

    def __init__(self, runner: Any, epoll_fd: int) -> None:
        self.runner = runner
        self.epoll_fd = epoll_fd

    @classmethod
    def find(cls) -> _TrioView | None:
        """The view of the running trio loop; None under another trio version or I/O
        backend, or a test clock (whose time must not pass while we wait for real)."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

            runner = GLOBAL_RUN_CONTEXT.runner
            epoll = runner.io_manager._epoll
            epoll_fd = epoll.fileno()
            len(runner.runq)
            runner.deadlines.next_deadline()
            runner.clock.deadline_to_sleep_time(math.inf)
            len(runner.waiting_for_idle)
        except Exception:
            return None
        if not isinstance(epoll, select.epoll) or type(runner.clock) is not SystemClock:
            return None
        return cls(runner, epoll_fd)

    def wait_allowed(self) -> float:
        """Seconds the relay may wait inside its step now (0: it must not)."""
        runner = self.runner
        if runner.runq or runner.waiting_for_idle:
            return 0.0
        sleep: float = runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
        return min(HOT_WAIT, sleep)

    def busy(self) -> bool:
        return bool(self.runner.runq)


class EpollRelay:
    """The run's epoll relay (Linux); get it with :func:`current_relay`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._view = _TrioView.find()
        self._poller = select.poll()
        self._poller.register(self._epoll.fileno(), select.POLLIN)
        if self._view is not None:
            self._poller.register(self._view.epoll_fd, select.POLLIN)
        self.callbacks = 0
        """Handler calls so far (statistics)."""
        self.waits_here = 0
        """Waits for traffic inside the relay's own step so far (statistics)."""

    def add(self, fd: int, handler: Handler) -> None:
        """Call ``handler(events)`` (in the relay's task) whenever ``fd`` is readable, until
        :meth:`remove`. The handler must not raise and must not block."""
        self.watch(fd, handler, READABLE)

    def watch(self, fd: int, handler: Handler, events: int) -> None:
        """Call ``handler(events)`` whenever ``fd`` has one of ``events`` (level-triggered;
        errors and hang-ups always count); ``events`` 0 is :meth:`remove`."""
        if not events:
            self.remove(fd, handler)
            return
        self._handlers[fd] = handler
        try:
            self._epoll.register(fd, events)
        except FileExistsError:
            self._epoll.modify(fd, events)

    def remove(self, fd: int, handler: Handler) -> None:
        """Stop calling ``handler`` for ``fd`` (nothing if another handler took the fd
        number since: the socket was closed and the number reused)."""
        if self._handlers.get(fd) is not handler:
            return
        del self._handlers[fd]
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def forget(self, fd: int, handler: Handler) -> None:
        """:meth:`remove` for a socket about to be closed (and never duplicated): closing
        it takes it out of the epoll, which saves a system call."""
        if self._handlers.get(fd) is handler:
            del self._handlers[fd]

    async def run(self) -> None:
        epoll_poll = self._epoll.poll
        handlers = self._handlers
        view = self._view
        alone = False  # the only task trio would run now: we may wait inside our step
        last_yield = time.perf_counter()
        try:
            while True:
                if alone:
                    assert view is not None
                    # Busy: what is ready already costs one system call; trio's own I/O and
                    # deadlines wait for the next yield (YIELD_EVERY) meanwhile.
                    events = epoll_poll(0) or self._wait_here(view)
                    if events is None:
                        # Trio has I/O or a deadline to handle: let it.
                        alone = False
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                        last_yield = time.perf_counter()
                        continue
                else:
                    events = epoll_poll(0)
                if not events:
                    if view is not None and not view.busy() and not alone:
                        # Become the only task trio runs (every other one is blocked),
                        # then wait for traffic in our own step. Bounded: a trio that is
                        # never idle must not keep our sockets waiting.
                        with trio.move_on_after(IDLE_WAIT) as idle_scope:
                            await trio.testing.wait_all_tasks_blocked()
                        alone = not idle_scope.cancelled_caught
                    else:
                        alone = False
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                    last_yield = time.perf_counter()
                    continue
                for fd, mask in events:
                    handler = handlers.get(fd)
                    if handler is not None:
                        self.callbacks += 1
                        _call(self, fd, handler, mask)
                if view is None or view.busy() or time.perf_counter() - last_yield > YIELD_EVERY:
                    # Tasks the handlers woke (and trio's own I/O) run now.
                    alone = False
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    last_yield = time.perf_counter()
        finally:
            self._epoll.close()

    def _wait_here(self, view: _TrioView) -> list[tuple[int, int]] | None:
        """Our readable sockets, waiting for them inside the task step: [] after
        :data:`HOT_WAIT` without traffic, None when trio has something to do (I/O of its
        own, a deadline due within a millisecond, a task waiting for idleness)."""
        timeout = view.wait_allowed()
        milliseconds = int(timeout * 1000)
        if milliseconds <= 0:
            return None
        self.waits_here += 1
        ready = self._poller.poll(milliseconds)
        for fd, _ in ready:
            if fd == view.epoll_fd:
                return None
        return self._epoll.poll(0) if ready else []


class PortableRelay:
    """The run's portable relay: for each watched socket and direction, a task waits with
    trio's ``wait_readable`` / ``wait_writable`` and calls the handler; get it with
    :func:`current_relay`.

    A waiter is cancelled at once by :meth:`remove` and :meth:`forget` (the socket may be
    closed right after, so trio must no longer watch it). When :meth:`watch` merely drops a
    direction, its waiter ends the next time it wakes: a pipe that pauses reading while it
    waits for credit, then resumes, keeps its task.
    """

    def __init__(self) -> None:
        self._handlers: dict[int, Handler] = {}
        self._wanted: dict[int, int] = {}
        self._waiters: dict[tuple[int, int], trio.CancelScope] = {}
        self.callbacks = 0
        """Handler calls so far (statistics)."""

    def add(self, fd: int, handler: Handler) -> None:
        self.watch(fd, handler, READABLE)

    def watch(self, fd: int, handler: Handler, events: int) -> None:
        if not events & (READABLE | WRITABLE):
            self.remove(fd, handler)
            return
        if self._handlers.get(fd) not in (None, handler):
            self._cancel(fd)  # the fd number was reused: the old owner's waits are over
        self._handlers[fd] = handler
        self._wanted[fd] = events
        for direction in (READABLE, WRITABLE):
            if events & direction and (fd, direction) not in self._waiters:
                scope = trio.CancelScope()
                self._waiters[fd, direction] = scope
                trio.lowlevel.spawn_system_task(
                    self._wait, fd, direction, scope, name=f"aldaas tunnel relay fd {fd}"
                )

    def remove(self, fd: int, handler: Handler) -> None:
        if self._handlers.get(fd) is not handler:
            return
        del self._handlers[fd]
        del self._wanted[fd]
        self._cancel(fd)

    def forget(self, fd: int, handler: Handler) -> None:
        if self._handlers.get(fd) is not handler:
            return
        self.remove(fd, handler)
        trio.lowlevel.notify_closing(fd)

    def _cancel(self, fd: int) -> None:
        for direction in (READABLE, WRITABLE):
            scope = self._waiters.pop((fd, direction), None)
            if scope is not None:
                scope.cancel()  # a waiting task is unregistered from trio's I/O right here

    async def _wait(self, fd: int, direction: int, scope: trio.CancelScope) -> None:
        wait = trio.lowlevel.wait_readable if direction == READABLE else trio.lowlevel.wait_writable
        key = (fd, direction)
        handlers = self._handlers
        wanted = self._wanted
        waiters = self._waiters
        with scope:
            # Each round checks it is still the waiter of its socket first: one removed
            # before it ever ran (and maybe replaced for a reused fd number) must not touch
            # trio's registration of that number.
            while waiters.get(key) is scope:
                handler = handlers.get(fd)
                if handler is None or not wanted.get(fd, 0) & direction:
                    break  # the direction is no longer wanted: end here
                try:
                    await wait(fd)
                except trio.ClosedResourceError:
                    break  # closed under us (notify_closing): whoever closed it knows
                except (trio.BusyResourceError, OSError):
                    log.exception("tunnel relay cannot wait for a socket", fd=fd)
                    break
                if waiters.get(key) is not scope:
                    return  # removed meanwhile
                handler = handlers.get(fd)
                if handler is None or not wanted.get(fd, 0) & direction:
                    break
                self.callbacks += 1
                if not _call(self, fd, handler, direction):
                    return
        if waiters.get(key) is scope:
            del waiters[key]


def current_relay(mode: RelayMode = "auto") -> Relay:
    """This trio run's relay of the kind ``mode`` resolves to (:func:`resolve_mode`),
    started on first use; a run may hold one of each kind."""
    kind = resolve_mode(mode)
    try:
        relays = _RELAYS.get()
    except LookupError:
        relays = {}
        _RELAYS.set(relays)
    relay = relays.get(kind)
    if relay is not None:
        return relay
    if kind == "epoll":
        epoll_relay = EpollRelay()
        trio.lowlevel.spawn_system_task(epoll_relay.run, name="aldaas tunnel relay")
        relay = epoll_relay
    else:
        relay = PortableRelay()
    relays[kind] = relay
    return relay
