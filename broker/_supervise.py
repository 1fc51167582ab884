"""Supervised background tasks: a crash is logged, counted and retried with backoff, never silent.

The broker runs every long-lived part (the pool's background work, the
gateway, the admin listener) under one nursery through :func:`supervised`.
A task that crashes *after* it started is restarted after a delay that
doubles on each crash (reset once a run stays up for ``max_delay``). A task
that fails *before* it started (a port in use, a bad data folder) is not
retried: the error reaches ``aldaas serve``, which exits with it, because
retrying a misconfiguration only hides it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import attrs
import structlog
import trio

log = structlog.get_logger("aldaas.supervise")

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class Backoff:
    """Delays between restarts of a crashed task."""

    initial: float = 1.0
    """First delay: long enough not to spin on a hard failure, short enough to be unnoticed."""
    maximum: float = 60.0
    """Delays double up to this; a run that lasts this long resets the delay to ``initial``."""

    def next(self, delay: float) -> float:
        return min(self.maximum, delay * 2)


class _FirstStartOnly(Generic[T]):
    """A task status that forwards ``started()`` to the real one the first time only."""

    def __init__(self, outer: trio.TaskStatus[T]) -> None:
        self._outer = outer
        self.started_once = False

    def started(self, value: T | None = None) -> None:
        if not self.started_once:
            self.started_once = True
            self._outer.started(value)  # type: ignore[arg-type]


async def supervised(
    name: str,
    fn: Callable[..., Awaitable[object]],
    *,
    on_restart: Callable[[str], None],
    backoff: Backoff = Backoff(),
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn(task_status=...)`` until it returns; restart it with backoff when it crashes.

    ``on_restart(name)`` is called once per restart (the broker counts it in
    ``aldaas_task_restarts_total``). Start with ``nursery.start`` to wait for
    the task's own ``task_status.started()``.
    """
    status: _FirstStartOnly[Any] = _FirstStartOnly(task_status)
    delay = backoff.initial
    while True:
        began = trio.current_time()
        try:
            await fn(task_status=status)
        except Exception as exc:
            if not status.started_once:
                raise
            if trio.current_time() - began >= backoff.maximum:
                delay = backoff.initial
            log.error(
                "task crashed; restarting",
                task=name,
                error=f"{type(exc).__name__}: {exc}",
                restart_in_seconds=delay,
                exc_info=exc,
            )
            on_restart(name)
            await trio.sleep(delay)
            delay = backoff.next(delay)
        else:
            if not status.started_once:
                status.started()
            log.info("task finished", task=name)
            return
