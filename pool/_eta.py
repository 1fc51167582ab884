"""When a queued acquirer gets its clone: a pure model the queue's progress reports use.

Waiter *k* (1 = the head) is served by the *k*-th clone to become warm. Clones are made
``slots`` at a time (``pool.max_provisioning``); a slot busy with a clone frees when that
clone is ready and starts the next one at once. A clone being made is expected ready
``per_clone`` seconds after it *started* (the time a clone takes to become ready, learnt
from the last ones), so the head behind a clone started long ago waits only what is left
of it, and the rest wait for the clones not started yet.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def queue_etas(
    *,
    waiting: int,
    now: float,
    per_clone: float | None,
    started: Sequence[float],
    slots: int,
) -> list[float | None]:
    """Seconds from ``now`` until each of the first ``waiting`` waiters gets a clone.

    ``started``: when each clone being made now started (same clock as ``now``); ``None``
    for every waiter while no clone has been made yet (nothing to learn from).
    """
    if per_clone is None:
        return [None] * waiting
    # The next time each slot yields a warm clone: busy ones when their clone is due (not
    # before now: a late clone is expected any moment), idle ones a whole clone from now.
    ready = [max(now, start + per_clone) for start in started]
    ready += [now + per_clone] * max(0, slots - len(started))
    heapq.heapify(ready)
    etas: list[float | None] = []
    for _ in range(waiting):
        if not ready:
            break
        at = heapq.heappop(ready)
        etas.append(at - now)
        heapq.heappush(ready, at + per_clone)
    return etas + [None] * (waiting - len(etas))
