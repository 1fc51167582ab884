"""Supervised tasks: restarts with backoff after a crash, counted; early failures surface."""

from __future__ import annotations

import itertools

import pytest
import trio
from structlog.testing import capture_logs

from aldaas.broker._supervise import Backoff, supervised


async def test_if_a_started_task_crashes_then_it_restarts_with_doubling_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If a started task crashes twice, then it is restarted twice, 1 s then 2 s later, and counted."""
    runs: list[float] = []
    restarts: list[str] = []

    async def flaky(task_status: trio.TaskStatus[str]) -> None:
        runs.append(trio.current_time())
        task_status.started("up")
        if len(runs) < 3:
            raise OSError("boom")

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            value = await nursery.start(
                lambda task_status: supervised(
                    "flaky", flaky, on_restart=restarts.append, task_status=task_status
                )
            )
    assert value == "up"
    assert restarts == ["flaky", "flaky"]
    assert [b - a for a, b in itertools.pairwise(runs)] == [1.0, 2.0]
    crashed = [e for e in logs if e["event"] == "task crashed; restarting"]
    assert [e["error"] for e in crashed] == ["OSError: boom", "OSError: boom"]
    assert logs[-1]["event"] == "task finished"


async def test_if_a_task_ran_long_before_crashing_then_the_backoff_resets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If a run outlived the maximum delay before crashing, then the next delay is the initial one."""
    runs: list[float] = []

    async def task(task_status: trio.TaskStatus[None]) -> None:
        runs.append(trio.current_time())
        task_status.started()
        if len(runs) == 1:
            raise OSError("first")
        if len(runs) == 2:
            await trio.sleep(100)
            raise OSError("second, after a long healthy run")

    await supervised("t", task, on_restart=lambda _: None, backoff=Backoff(initial=1, maximum=10))
    assert runs[1] - runs[0] == 1.0
    assert runs[2] - runs[1] == 101.0


async def test_if_a_task_fails_before_it_started_then_the_error_surfaces() -> None:
    """If a task fails before calling started(), then supervised re-raises it and never restarts."""
    restarts: list[str] = []

    async def broken(task_status: trio.TaskStatus[None]) -> None:
        raise OSError("port 9090 is in use")

    with pytest.raises(OSError, match="port 9090 is in use"):
        await supervised("admin", broken, on_restart=restarts.append)
    assert restarts == []
