"""The state every pool concern shares: its tables of snapshots, clones and leases, and its events.

Each concern is a module of functions over one :class:`PoolState`, their first argument ``st``:
:mod:`._handout`, :mod:`._lease_life`, :mod:`._warm`, :mod:`._pipeline` and :mod:`._adoption`.
The :class:`~._pool.Pool` facade owns the state and starts their loops. Concerns call each other
where the work really crosses (a clone made warm goes to the queue; an ended lease's clone is
destroyed). A background step started with :meth:`PoolState.spawn` gets the state first, too.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable
from typing import Literal

import attrs
import structlog
import trio

from ._lease import (
    Observer,
    PoolErrorEvent,
    PoolEvent,
    QueueProgressCallback,
    RestoreStatus,
    SourceHealth,
)
from ._provider import Endpoint, Kind, Provider, ProviderError, Resource, Restartable, Source
from ._settings import PoolSettings
from ._states import CloneState, LeaseState, SnapshotState

log = structlog.get_logger("aldaas.pool")

BACKOFF_MAX = 60.0
"""Longest wait, in seconds, between retries of a step that keeps failing."""
CLEANUP_SECONDS = 60.0
"""How long a shielded clean-up (or a refresh before answering "no") may take."""

EndReason = Literal["released", "killed", "expired_idle", "expired_lifetime", "lost"]


@attrs.define(eq=False)
class SnapshotEntry:
    name: str
    state: SnapshotState
    backup_key: str
    backup_etag: str
    created_wall: float
    meta: dict[str, str]
    version: str = ""
    ready_wall: float | None = None
    reason: str | None = None


@attrs.define(eq=False)
class CloneEntry:
    name: str
    snapshot: str
    state: CloneState
    created_wall: float
    endpoint: Endpoint | None = None
    version: str = ""
    lease: LeaseEntry | None = None
    lock: trio.Lock = attrs.Factory(trio.Lock)
    writes: int = 0
    """Meta writes this pool started on it: a view refresh skips clones written meanwhile."""
    provision_started: float | None = None
    """trio time this pool started making it (queue ETAs count what is left of it)."""


@attrs.define(eq=False)
class LeaseEntry:
    id: str
    secret_hash: str
    ttl: float
    labels: dict[str, str]
    state: LeaseState
    clone: CloneEntry
    created_wall: float
    lifetime_deadline: float
    """trio time."""
    idle_deadline: float
    """trio time; meaningful while idle."""
    started: float
    """trio time the lease began (or was adopted), for its duration."""
    attached: int = 0
    generation: int = 0
    resets: int = 0
    lock: trio.Lock = attrs.Factory(trio.Lock)
    persisted_idle: float = -math.inf
    """trio time of the idle deadline last written to the clone's meta (for other replicas)."""


@attrs.define(eq=False)
class Waiter:
    event: trio.Event = attrs.Factory(trio.Event)
    clone: CloneEntry | None = None
    error: BaseException | None = None
    on_progress: QueueProgressCallback | None = None
    last_position: int = 0


class Lost(Exception):
    """The clone reserved for a hand-out could not be claimed; try another one."""


@attrs.define(eq=False)
class PoolState:
    """What one pool knows: its tables, its wake-up events, and its link to the provider."""

    settings: PoolSettings
    provider: Provider
    source: Source
    wall_clock: Callable[[], float]
    observers: list[Observer]
    alive: Callable[[str], bool] | None
    """The provider's cheap liveness check, asked at each hand-out (None: it has none)."""
    snapshots: dict[str, SnapshotEntry] = attrs.Factory(dict)
    clones: dict[str, CloneEntry] = attrs.Factory(dict)
    warm: dict[str, CloneEntry] = attrs.Factory(dict)
    """Warm clones free for hand-out, oldest first; taking one out reserves it."""
    leases: dict[str, LeaseEntry] = attrs.Factory(dict)
    handing_out: int = 0
    """Acquires past the ``lease.max_active`` check that hold no lease yet (queued or claiming):
    they count against the limit, so concurrent acquires cannot overshoot it."""
    waiters: collections.deque[Waiter] = attrs.Factory(collections.deque)
    doomed: dict[tuple[Kind, str], str] = attrs.Factory(dict)
    """Resources whose destroy failed, retried by the health loop (value: why)."""
    to_verify: list[SnapshotEntry] = attrs.Factory(list)
    dead_leases: set[str] = attrs.Factory(set)
    """Active leases whose database the health loop found dead (until reset or end)."""
    restarts: dict[str, trio.Event] = attrs.Factory(dict)
    """Leased clones (by name) whose database the leader is starting again; set when done
    (:class:`~._provider.Restartable` providers only). Destroying one waits for it."""
    restart_not_before: dict[str, float] = attrs.Factory(dict)
    """Leased clones whose restart failed: trio time of the next attempt."""
    protected: set[str] = attrs.Factory(set)
    """Leased clones this leader protected from drains (:meth:`Restartable.protect`)."""
    temporary: dict[tuple[str, str], tuple[int, float]] = attrs.Factory(dict)
    """(backup key, ETag) → (temporary failures in a row, trio time of the next attempt)."""
    source_health: SourceHealth = attrs.Factory(SourceHealth)
    """The source's last listing (the source loop replaces it after each poll)."""
    restored_etags: set[str] = attrs.Factory(set)
    """ETags of backups this pool restored: one of them is never "newer" again (a re-upload)."""
    pipeline_snapshot: SnapshotEntry | None = None
    restore: RestoreStatus | None = None
    draining: bool = False
    nursery: trio.Nursery | None = None
    lead_nursery: trio.Nursery | None = None
    """Where leader-only work (provisioning) runs; cancelled when leadership ends."""
    shared: bool = False
    """Set by ``Pool.serve``: other replicas share the provider (see docs/pool.md)."""
    view_lock: trio.Lock = attrs.Factory(trio.Lock)
    view_wakeup: trio.Event = attrs.Factory(trio.Event)
    keeper_wakeup: trio.Event = attrs.Factory(trio.Event)
    lease_wakeup: trio.Event = attrs.Factory(trio.Event)
    refresh_wakeup: trio.Event = attrs.Factory(trio.Event)
    prune_wakeup: trio.Event = attrs.Factory(trio.Event)
    persist_wakeup: trio.Event = attrs.Factory(trio.Event)
    dirty: set[str] = attrs.Factory(set)
    """Lease ids whose attach state changed and must be written to their clone's meta."""
    provisioning_failures: int = 0
    provision_not_before: float = 0.0
    provision_seconds: float | None = None
    """Moving average of recent provisioning times, for queue ETAs."""

    @property
    def restartable(self) -> Restartable | None:
        """The provider, if a leased clone's data outlives its database (it can be restarted)."""
        return self.provider if isinstance(self.provider, Restartable) else None

    @property
    def leading(self) -> bool:
        """Whether background work runs here (``Pool.run``, or ``Pool.lead`` running)."""
        return self.lead_nursery is not None

    def newest_ready(self) -> SnapshotEntry | None:
        ready = [s for s in self.snapshots.values() if s.state is SnapshotState.READY]
        return max(ready, key=lambda s: s.created_wall) if ready else None

    def forget_clone(self, clone: CloneEntry) -> None:
        """Drop a clone from this pool's view without touching it (another replica owns it now)."""
        self.warm.pop(clone.name, None)
        if self.clones.get(clone.name) is clone:
            del self.clones[clone.name]
        self.wake(self.keeper_wakeup)

    async def find(self, kind: Kind, name: str) -> Resource | None:
        for resource in await self.provider.list(kind):
            if resource.name == name:
                return resource
        return None

    # -- clocks: leases keep trio time, meta and statistics hold wall time ------------------

    def wall(self) -> float:
        return self.wall_clock()

    def to_wall(self, trio_time: float) -> float:
        return self.wall() + (trio_time - trio.current_time())

    def from_wall(self, wall: float) -> float:
        return trio.current_time() + (wall - self.wall())

    # -- events, wake-ups and background steps ---------------------------------------------

    def emit(self, event: PoolEvent) -> None:
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:
                log.exception("pool.observer_failed", event_type=type(event).__name__)

    def report_error(self, component: str, exc: BaseException) -> None:
        self.emit(PoolErrorEvent(component=component, message=str(exc)))

    @staticmethod
    def wake(*events: trio.Event) -> None:
        for event in events:
            event.set()

    def spawn(self, component: str, step: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``step(self, *args)`` in the background; ``component`` labels its errors (metrics)."""
        assert self.nursery is not None, "the pool is not running; start Pool.run() first"
        self.nursery.start_soon(self.guarded, component, step, *args)

    async def guarded(
        self, component: str, step: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        """Run ``step(self, *args)``; a provider failure is logged and counted, never fatal.

        Steps about one clone (their first argument) bind ``clone`` and
        ``snapshot`` for every log line inside them (the provider's included).
        """
        bound: dict[str, str] = {}
        if args and isinstance(args[0], CloneEntry):
            bound = {"clone": args[0].name, "snapshot": args[0].snapshot}
        try:
            with structlog.contextvars.bound_contextvars(**bound):
                await step(self, *args)
        except ProviderError as exc:
            log.warning("pool.step_failed", component=component, error=str(exc))
            self.report_error(component, exc)
        except Exception as exc:
            # A bug or an error the provider did not wrap: keep the pool serving, but loudly.
            log.exception("pool.step_crashed", component=component)
            self.emit(
                PoolErrorEvent(
                    component=component, message=f"unexpected {type(exc).__name__}: {exc}"
                )
            )


STALLED_SECONDS = 5.0
"""A restore without new bytes for this long shows as stalled (a chunk takes far less)."""
MIB = 1024 * 1024
"""Progress is shown in MiB everywhere (logs, messages, the client)."""


def restore_now(restore: RestoreStatus, now: float) -> RestoreStatus:
    """``restore`` as of ``now`` (trio time): elapsed time runs on while no bytes arrive, so
    the rate decays and the ETA grows; ``stalled_seconds`` counts once 5 s pass without bytes.
    """
    p = restore.progress
    progress = attrs.evolve(p, elapsed_seconds=max(p.elapsed_seconds, now - restore.started_at))
    idle = max(0.0, now - restore.bytes_at)
    return attrs.evolve(
        restore, progress=progress, stalled_seconds=idle if idle >= STALLED_SECONDS else 0.0
    )
