"""Queue ETAs on the mock clock: the model (pool/_eta.py) and what a queue of 8 really waits."""

from __future__ import annotations

import pytest
import trio
from pool_fakes import FakeSource, FakeWorld, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import QueueProgress, WarmPoolSettings
from aldaas.pool._eta import queue_etas

CLONE_SECONDS = 20.0


def test_if_clones_are_being_made_then_the_head_waits_only_what_is_left_of_them() -> None:
    """If two slots each started a clone 15 s and 5 s ago (20 s per clone), then waiters
    1..4 get clones in 5, 15, 25 and 35 s."""
    etas = queue_etas(waiting=4, now=100.0, per_clone=20.0, started=[85.0, 95.0], slots=2)
    assert etas == [5.0, 15.0, 25.0, 35.0]


def test_if_a_slot_is_idle_then_its_clone_counts_from_now() -> None:
    """If one of two slots is idle, then it yields a clone a whole clone time from now."""
    assert queue_etas(waiting=3, now=0.0, per_clone=10.0, started=[-4.0], slots=2) == [
        6.0,
        10.0,
        16.0,
    ]


def test_if_a_clone_is_late_then_it_is_expected_any_moment_not_in_the_past() -> None:
    """If a clone is overdue, then its waiter's ETA is 0, never negative."""
    assert queue_etas(waiting=1, now=50.0, per_clone=10.0, started=[0.0], slots=1) == [0.0]


def test_if_no_clone_was_ever_made_then_there_is_no_eta() -> None:
    """If the pool has not learnt how long a clone takes, then every ETA is unknown."""
    assert queue_etas(waiting=2, now=0.0, per_clone=None, started=[], slots=2) == [None, None]


@pytest.mark.parametrize("slots", [1, 2])
async def test_if_eight_queue_behind_a_pool_of_one_then_the_head_eta_is_within_30_percent(
    autojump_clock: MockClock, slots: int
) -> None:
    """If 8 acquirers queue behind a pool of 1 whose one clone is leased, then every waiter
    that reaches the head of the queue is told an ETA within ±30% of its actual wait."""
    world = FakeWorld()
    world.clone_seconds = CLONE_SECONDS
    source = FakeSource()
    source.put("nightly.sql", b"CREATE TABLE t (i int);\n", modified=1.0)
    one = settings(pool=WarmPoolSettings(size=1, max_provisioning=slots))
    at_head: dict[int, tuple[float, float | None]] = {}
    served: dict[int, float] = {}
    async with running_pool(world, source, one) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] >= 1, what="a warm clone")
        await h.pool.acquire()  # the pool's one clone is now leased

        async def one_waiter(i: int) -> None:
            def seen(p: QueueProgress) -> None:
                if p.position == 1:
                    at_head[i] = (trio.current_time(), p.eta_seconds)

            await h.pool.acquire(timeout=3600, on_progress=seen)
            served[i] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one_waiter, i)
                await trio.sleep(0.5)
    assert len(served) == 8
    assert len(at_head) >= 4, at_head  # most waiters reach the head before a clone is free
    for i, (when, eta) in at_head.items():
        actual = served[i] - when
        assert eta is not None
        assert abs(eta - actual) <= 0.3 * actual + 0.5, (i, eta, actual)
