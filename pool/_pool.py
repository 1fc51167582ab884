"""The pool: backups → verified snapshots → warm clones → leases.

Everything here is logic over two interfaces (:class:`Provider`,
:class:`Source`). State lives with the resources (their ``meta``), so a new
:class:`Pool` over the same provider rebuilds itself from ``provider.list()``:
live leases, warm clones and ready/failed snapshots are adopted, half-made
things and orphans destroyed, and a snapshot still being verified resumes
its verification instead of restoring its backup again.

One replica runs :meth:`Pool.run`. Several replicas over one provider each run
:meth:`Pool.serve` (hand-out and lease answers, with a view refreshed from the
provider) and, only while elected leader, :meth:`Pool.lead`, which does the
background work:

- source poll → snapshot pipeline (one at a time),
- warm-pool keeper (``pool.size`` clones of the newest ready snapshot,
  at most ``pool.max_provisioning`` being made at once; roll-over of idle
  clones of older snapshots),
- health checks of warm clones,
- TTL and lifetime enforcement,
- pruning of old ready and expired failed snapshots.

Persistence of attach/detach state runs on every replica (in :meth:`Pool.run`
or :meth:`Pool.serve`); see docs/pool.md, "Several broker replicas".
"""

from __future__ import annotations

import collections
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Literal

import attrs
import structlog
import trio

from . import _meta as m
from ._lease import (
    CloneFailed,
    CloneProvisioned,
    InvalidRequestError,
    Lease,
    LeaseEnded,
    LeaseHandedOut,
    LeaseInfo,
    LeaseNotFoundError,
    LeaseReset,
    NoSnapshotReadyError,
    Observer,
    PoolDrainingError,
    PoolErrorEvent,
    PoolEvent,
    PoolStatistics,
    QueueLeft,
    QueueProgress,
    QueueProgressCallback,
    QueueTimeoutError,
    RestoreFinished,
    RestoreStatus,
    SnapshotFailed,
    SnapshotInfo,
    SnapshotReady,
)
from ._provider import (
    Backup,
    ConflictError,
    Endpoint,
    Kind,
    Liveness,
    NotFoundError,
    Provider,
    ProviderError,
    Resource,
    RestoreProgress,
    Source,
    TemporaryProviderError,
)
from ._settings import PoolSettings
from ._states import (
    ACTIVE_LEASE_STATES,
    LIVE_CLONE_STATES,
    CloneEvent,
    CloneState,
    LeaseEvent,
    LeaseState,
    SnapshotEvent,
    SnapshotState,
    clone_transition,
    lease_transition,
    snapshot_transition,
)

log = structlog.get_logger("aldaas.pool")

_MAX_LABELS = 32
_MAX_LABEL_CHARS = 256
_HEARTBEAT_RETRY_SECONDS = 1.0
_DUMMY_HASH = m.secret_hash("not a lease secret")
_PROGRESS_LOG_SECONDS = 5.0
_BACKOFF_MAX = 60.0
_CLEANUP_SECONDS = 60.0
_TEMPORARY_ATTEMPTS = 3
"""A backup whose pipeline fails temporarily this many times in a row is recorded as failed."""

EndReason = Literal["released", "killed", "expired_idle", "expired_lifetime", "lost"]


@attrs.define(eq=False)
class _Snapshot:
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
class _Clone:
    name: str
    snapshot: str
    state: CloneState
    created_wall: float
    endpoint: Endpoint | None = None
    version: str = ""
    lease: _Lease | None = None
    lock: trio.Lock = attrs.Factory(trio.Lock)
    writes: int = 0
    """Meta writes this pool started on it: a view refresh skips clones written meanwhile."""


@attrs.define(eq=False)
class _Lease:
    id: str
    secret_hash: str
    ttl: float
    labels: dict[str, str]
    state: LeaseState
    clone: _Clone
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
class _Waiter:
    event: trio.Event = attrs.Factory(trio.Event)
    clone: _Clone | None = None
    error: BaseException | None = None
    on_progress: QueueProgressCallback | None = None
    last_position: int = 0


class _Lost(Exception):
    """The clone reserved for a hand-out could not be claimed; try another one."""


class Pool:
    """Warm pool of database clones over one provider and one backup source."""

    def __init__(
        self,
        settings: PoolSettings,
        provider: Provider,
        source: Source,
        *,
        wall_clock: Callable[[], float] = time.time,
        observers: Iterable[Observer] = (),
    ) -> None:
        self._settings = settings
        self._provider = provider
        self._alive: Callable[[str], bool] | None = (
            provider.alive if isinstance(provider, Liveness) else None
        )
        """The provider's cheap liveness check, asked at each hand-out (None: it has none)."""
        self._source = source
        self._wall_clock = wall_clock
        self._observers: list[Observer] = list(observers)
        self._snapshots: dict[str, _Snapshot] = {}
        self._clones: dict[str, _Clone] = {}
        self._warm: dict[str, _Clone] = {}
        """Warm clones free for hand-out, oldest first; taking one out reserves it."""
        self._leases: dict[str, _Lease] = {}
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._doomed: dict[tuple[Kind, str], str] = {}
        """Resources whose destroy failed, retried by the health loop (value: why)."""
        self._to_verify: list[_Snapshot] = []
        self._dead_leases: set[str] = set()
        """Active leases whose database the health loop found dead (until reset or end)."""
        self._temporary: dict[tuple[str, str], tuple[int, float]] = {}
        """(backup key, ETag) → (temporary failures in a row, trio time of the next attempt)."""
        self._pipeline_snapshot: _Snapshot | None = None
        self._restore: RestoreStatus | None = None
        self._draining = False
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._lead_nursery: trio.Nursery | None = None
        """Where leader-only work (provisioning) runs; cancelled when leadership ends."""
        self._shared = False
        """Set by :meth:`serve`: other replicas share the provider (see docs/pool.md)."""
        self._leading = False
        self._view_lock = trio.Lock()
        self._view_wakeup = trio.Event()
        self._keeper_wakeup = trio.Event()
        self._lease_wakeup = trio.Event()
        self._refresh_wakeup = trio.Event()
        self._prune_wakeup = trio.Event()
        self._persist_wakeup = trio.Event()
        self._dirty: set[str] = set()
        """Lease ids whose attach state changed and must be written to their clone's meta."""
        self._provisioning_failures = 0
        self._provision_not_before = 0.0
        self._provision_seconds: float | None = None
        """Moving average of recent provisioning times, for queue ETAs."""

    # -- public API ------------------------------------------------------------------------

    @property
    def settings(self) -> PoolSettings:
        return self._settings

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer`` with every :data:`PoolEvent`; returns a function that removes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt what the provider holds, then run the background loops until cancelled.

        ``task_status.started()`` is called once adoption is done, so acquires
        made after ``await nursery.start(pool.run)`` see every adopted lease.
        Cancelling leaves clones and leases running: the next pool adopts them.
        """
        if self._running:
            raise RuntimeError("Pool.run() is already running; a pool runs once at a time.")
        self._running = True
        try:
            await self._adopt_with_retries()
            async with trio.open_nursery() as nursery:
                self._nursery = self._lead_nursery = nursery
                self._start_leader_loops(nursery)
                nursery.start_soon(self._persist_loop)
                task_status.started()
        finally:
            self._nursery = self._lead_nursery = None
            self._running = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve as one of several replicas over one provider (a follower until :meth:`lead`).

        Hands out warm clones that the leader made and answers for every lease,
        persisting what other replicas need (attach state, idle deadlines) in the
        clone's meta; refreshes its view from ``provider.list()`` every
        ``pool.refresh_interval`` and right before failing a request. It never
        restores, provisions, prunes, expires or destroys what it did not end
        itself. ``task_status.started()`` follows the first view. Use either
        :meth:`run` (one replica) or :meth:`serve` + :meth:`lead`, not both.
        """
        if self._running:
            raise RuntimeError("Pool.serve() or run() is already running; run one at a time.")
        self._running = True
        self._shared = True
        try:
            await self._with_retries("refresh", self.refresh_view)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._persist_loop)
                nursery.start_soon(self._view_loop)
                nursery.start_soon(self._follower_health_loop)
                task_status.started()
        finally:
            self._nursery = None
            self._running = False

    async def lead(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the background work while this replica leads; cancel it to step down.

        Needs :meth:`serve` running. Takes over first: merges the provider's
        current state, resumes an interrupted verification and destroys what a
        previous leader left half-made (volumes, provisioning or verify clones,
        unreadable leases); then runs the source/pipeline, keeper, health, TTL
        and prune loops. Pass it to ``LeaderElector.serve(pool.lead)``.
        """
        if self._nursery is None or not self._shared:
            raise RuntimeError("Pool.lead() needs Pool.serve() running first.")
        if self._leading:
            raise RuntimeError("Pool.lead() is already running; a pool leads once at a time.")
        self._leading = True
        try:
            await self._with_retries("adopt", self._take_over)
            async with trio.open_nursery() as nursery:
                self._lead_nursery = nursery
                self._start_leader_loops(nursery)
                log.info("pool.leading", warm=len(self._warm), leases=len(self._leases))
                task_status.started()
        finally:
            self._lead_nursery = None
            self._leading = False
            self._step_down()

    @property
    def leading(self) -> bool:
        """Whether background work runs here (:meth:`run`, or :meth:`lead` running)."""
        return self._lead_nursery is not None

    async def refresh_view(self) -> None:
        """Re-read the provider and merge what other replicas did (warm clones, leases, snapshots).

        A follower calls it by itself; call it when :meth:`verify_secret` or
        :meth:`lease` do not know an id that another replica may have handed out.
        """
        async with self._view_lock:
            writes = {name: clone.writes for name, clone in self._clones.items()}
            resources = await self._provider.list()
            self._merge(resources, writes)

    async def acquire(
        self,
        *,
        ttl: float | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a queue timeout, not an I/O one
        on_progress: QueueProgressCallback | None = None,
    ) -> Lease:
        """Hand out a warm clone as a new lease, waiting in the FIFO queue if none is free.

        Raises :class:`NoSnapshotReadyError` when there is nothing to clone yet,
        :class:`QueueTimeoutError` after ``timeout`` seconds in the queue
        (default ``lease.queue_timeout``), :class:`PoolDrainingError` while draining.
        """
        started = trio.current_time()
        ttl = self._checked_ttl(ttl)
        clean_labels = _checked_labels(labels)
        if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
            raise InvalidRequestError(
                f"queue timeout {timeout!r} is not a finite number of seconds ≥ 0; pass e.g. 60."
            )
        try:
            self._check_can_hand_out()
        except NoSnapshotReadyError:
            if not self._shared:
                raise
            await self._refresh_quietly()
            self._check_can_hand_out()
        deadline = started + (self._settings.lease.queue_timeout if timeout is None else timeout)
        while True:
            clone, queued = await self._obtain_clone(deadline, on_progress)
            try:
                lease, secret = await self._hand_out(clone, ttl, clean_labels)
            except _Lost:
                continue
            seconds = trio.current_time() - started
            self._emit(
                LeaseHandedOut(
                    lease_id=lease.id,
                    clone=clone.name,
                    snapshot=clone.snapshot,
                    seconds=seconds,
                    queued_seconds=queued,
                )
            )
            log.info(
                "lease.acquired",
                lease_id=lease.id,
                clone=clone.name,
                snapshot=clone.snapshot,
                ttl=lease.ttl,
                labels=lease.labels,
                seconds=round(seconds, 6),
                queued_seconds=round(queued, 6),
            )
            return self._public_lease(lease, secret=secret)

    def lease(self, lease_id: str) -> Lease:
        """The active lease ``lease_id`` (without its secret); raises :class:`LeaseNotFoundError`."""
        return self._public_lease(self._active(lease_id))

    def leases(self) -> tuple[Lease, ...]:
        """Every active lease (without secrets)."""
        return tuple(self._public_lease(lease) for lease in self._leases.values())

    def verify_secret(self, lease_id: str, secret: str) -> bool:
        """Whether ``secret`` is the active lease's secret; compares hashes in constant time."""
        lease = self._leases.get(lease_id)
        expected = lease.secret_hash if lease is not None else _DUMMY_HASH
        matches = hmac.compare_digest(m.secret_hash(secret), expected)
        return matches and lease is not None and lease.state in ACTIVE_LEASE_STATES

    async def release(self, lease_id: str) -> None:
        """End the lease now and destroy its clone."""
        await self._end_lease(await self._lookup(lease_id), LeaseEvent.RELEASE, "released")

    async def kill(self, lease_id: str) -> None:
        """End the lease now on an admin's request and destroy its clone."""
        await self._end_lease(await self._lookup(lease_id), LeaseEvent.RELEASE, "killed")

    async def extend(self, lease_id: str, *, ttl: float | None = None) -> Lease:
        """Restart the idle TTL (optionally with a new ``ttl``); the maximum lifetime stays."""
        lease = await self._lookup(lease_id)
        if ttl is not None:
            lease.ttl = self._checked_ttl(ttl)
        lease.idle_deadline = trio.current_time() + lease.ttl
        await self._write_clone_meta(lease.clone)
        lease = self._active(lease_id)  # still ours (another replica may have ended it)
        self._wake(self._lease_wakeup)
        log.info("lease.extended", lease_id=lease.id, clone=lease.clone.name, ttl=lease.ttl)
        return self._public_lease(lease)

    async def reset(
        self,
        lease_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a queue timeout, not an I/O one
        on_progress: QueueProgressCallback | None = None,
    ) -> Lease:
        """Swap the lease's clone for a fresh one of the newest snapshot; the lease id stays."""
        lease = await self._lookup(lease_id)
        self._check_can_hand_out()
        deadline = trio.current_time() + (
            self._settings.lease.queue_timeout if timeout is None else timeout
        )
        # Its holder is waiting for the reset: the idle TTL must not run out meanwhile
        # (in memory, like traffic; the claim persists the deadline the reset sets).
        lease.idle_deadline = max(lease.idle_deadline, deadline + lease.ttl)
        async with lease.lock:
            while True:
                self._active(lease_id)
                clone, _ = await self._obtain_clone(deadline, on_progress)
                if lease.state not in ACTIVE_LEASE_STATES:
                    self._return_clone(clone)
                    raise self._not_found(lease_id)
                old = lease.clone
                # The new clone's meta must carry the reset's idle deadline and count: a
                # restart adopts the lease from it (before, it kept the old, earlier deadline).
                undo = (lease.idle_deadline, lease.resets)
                lease.generation += 1
                lease.resets += 1
                lease.idle_deadline = trio.current_time() + lease.ttl
                try:
                    await self._claim(clone, lease)
                except _Lost:
                    lease.generation -= 1
                    lease.idle_deadline, lease.resets = undo
                    continue
                if lease.state not in ACTIVE_LEASE_STATES:
                    # Released while we were claiming: the new clone goes, too.
                    clone.lease = None
                    self._spawn("destroy", self._retire_clone, clone, "lease ended during reset")
                    raise self._not_found(lease_id)
                break
            lease.state = lease_transition(lease.id, lease.state, LeaseEvent.RESET)
            self._dead_leases.discard(lease.id)
            old.lease = None
        self._emit(LeaseReset(lease_id=lease.id, old_clone=old.name, new_clone=clone.name))
        log.info(
            "lease.reset",
            lease_id=lease.id,
            old_clone=old.name,
            clone=clone.name,
            snapshot=clone.snapshot,
        )
        self._spawn("destroy", self._retire_clone, old, "lease reset")
        self._wake(self._lease_wakeup, self._keeper_wakeup)
        return self._public_lease(lease)

    def attached(self, lease_id: str) -> None:
        """A client attached to the lease: its idle TTL pauses."""
        lease = self._active(lease_id)
        lease.attached += 1
        if lease.attached == 1:
            lease.state = lease_transition(lease.id, lease.state, LeaseEvent.ATTACH)
            self._mark_dirty(lease)

    def detached(self, lease_id: str) -> None:
        """A client detached; when none is left the idle TTL restarts from now."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.attached == 0:
            return
        lease.attached -= 1
        if lease.attached == 0:
            lease.state = lease_transition(lease.id, lease.state, LeaseEvent.DETACH)
            lease.idle_deadline = trio.current_time() + lease.ttl
            self._mark_dirty(lease)

    def traffic(self, lease_id: str) -> None:
        """Bytes flowed for the lease: the idle TTL counts from now.

        Kept in memory; with several replicas it is also written (at most every
        ``ttl / 3``) so that the leader's TTL sees it.
        """
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.idle_deadline = max(lease.idle_deadline, trio.current_time() + lease.ttl)
            if self._shared and self._heartbeat_due(lease, trio.current_time()):
                self._mark_dirty(lease)  # so the leader's TTL sees this replica's traffic

    def trigger_refresh(self) -> None:
        """Look at the backup source now instead of at the next poll."""
        self._wake(self._refresh_wakeup)

    def drain(self) -> None:
        """Stop handing out (queued acquires fail) and stop making clones; leases keep running."""
        if self._draining:
            return
        self._draining = True
        error = PoolDrainingError(
            "the pool is draining and hands out no new databases; use another broker."
        )
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()
        log.info("pool.draining", leases=len(self._leases))

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of clones, queue, leases, snapshots and restore progress.

        Call it from the trio thread (it reads ``trio.current_time()``).
        """
        now_wall = self._wall()
        clones = {s.value: 0 for s in CloneState if s is not CloneState.GONE}
        for clone in self._clones.values():
            if clone.state is not CloneState.GONE:
                clones[clone.state.value] += 1
        snapshots = sorted(self._snapshots.values(), key=lambda s: s.created_wall, reverse=True)
        by_status = {s.value: 0 for s in SnapshotState if s is not SnapshotState.PRUNED}
        for snap in snapshots:
            if snap.state is not SnapshotState.PRUNED:
                by_status[snap.state.value] += 1
        newest = self._newest_ready()
        return PoolStatistics(
            clones=clones,
            queue_length=len(self._waiters),
            leases_active=len(self._leases),
            leases=tuple(self._lease_info(lease) for lease in self._leases.values()),
            snapshots=tuple(
                SnapshotInfo(
                    name=s.name,
                    status=s.state.value,
                    backup_key=s.backup_key,
                    backup_etag=s.backup_etag,
                    created_at=s.created_wall,
                    ready_at=s.ready_wall,
                    age_seconds=max(0.0, now_wall - s.created_wall),
                    reason=s.reason,
                )
                for s in snapshots
                if s.state is not SnapshotState.PRUNED
            ),
            snapshots_by_status=by_status,
            newest_ready_snapshot=newest.name if newest else None,
            snapshot_age_seconds=max(0.0, now_wall - newest.created_wall) if newest else None,
            restore=self._restore,
            draining=self._draining,
        )

    # -- acquiring -------------------------------------------------------------------------

    def _check_can_hand_out(self) -> None:
        if self._draining:
            raise PoolDrainingError(
                "the pool is draining and hands out no new databases; use another broker."
            )
        if self._newest_ready() is None and not self._warm:
            raise NoSnapshotReadyError(self._no_snapshot_message())

    def _no_snapshot_message(self) -> str:
        failed = [s for s in self._snapshots.values() if s.state is SnapshotState.FAILED]
        if self._restore is not None:
            p = self._restore.progress
            done = f"{p.done_bytes / 1e6:.1f} of {p.total_bytes / 1e6:.1f} MB"
            eta = f", about {p.eta_seconds:.0f} s left" if p.eta_seconds is not None else ""
            return (
                f"no snapshot is ready yet: backup {self._restore.backup_key!r} is being "
                f"restored ({done}{eta}); retry when it is ready."
            )
        if self._pipeline_snapshot is not None or self._to_verify:
            return "no snapshot is ready yet: a restored backup is being verified; retry shortly."
        if failed:
            newest = max(failed, key=lambda s: s.created_wall)
            return (
                f"no snapshot is ready yet: the last restore of {newest.backup_key!r} failed "
                f"({newest.reason}); fix the backup and trigger a refresh."
            )
        return (
            f"no snapshot is ready yet: no backup has been restored from "
            f"{self._source.description}; put a backup there or trigger a refresh."
        )

    async def _obtain_clone(
        self, deadline: float, on_progress: QueueProgressCallback | None
    ) -> tuple[_Clone, float]:
        """Reserve a warm clone (taking it out of the free list), queueing FIFO if none is free."""
        if not self._waiters:
            clone = self._take_warm()
            if clone is not None:
                return clone, 0.0
        self._check_can_hand_out()
        queued_at = trio.current_time()
        waiter = _Waiter(on_progress=on_progress)
        self._waiters.append(waiter)
        self._report_positions()
        self._wake(self._keeper_wakeup, self._view_wakeup)
        outcome: Literal["served", "timeout", "cancelled", "draining"] = "cancelled"
        try:
            with trio.move_on_at(deadline):
                await waiter.event.wait()
            if self._shared and waiter.clone is None and waiter.error is None:
                # Another replica's leader may have made clones since the last look.
                await self._refresh_quietly()
            if waiter.error is not None:
                outcome = "draining"
                raise waiter.error
            if waiter.clone is None:
                outcome = "timeout"
                position = self._waiters.index(waiter) + 1 if waiter in self._waiters else 1
                raise QueueTimeoutError(
                    f"no database became free within {deadline - queued_at:.0f} s "
                    f"(still number {position} of {len(self._waiters)} in the queue); "
                    "retry later or ask the operator to raise pool.size."
                )
            outcome = "served"
            return waiter.clone, trio.current_time() - queued_at
        finally:
            if outcome != "served":
                self._abandon(waiter)
            self._emit(QueueLeft(seconds=trio.current_time() - queued_at, outcome=outcome))

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._report_positions()
        if waiter.clone is not None:
            clone, waiter.clone = waiter.clone, None
            self._return_clone(clone)

    def _take_warm(self) -> _Clone | None:
        """Reserve a free warm clone, preferring the newest ready snapshot; ``None`` if none.

        A clone the provider knows to be dead (:class:`Liveness`) is broken and
        replaced instead of handed out: its database may have died since the last
        health check.
        """
        newest = self._newest_ready()
        while self._warm:
            chosen = None
            for clone in self._warm.values():
                if newest is not None and clone.snapshot == newest.name:
                    chosen = clone
                    break
                if chosen is None:
                    chosen = clone
            assert chosen is not None
            if not self._is_alive(chosen):
                log.warning("clone.dead_at_hand_out", clone=chosen.name, snapshot=chosen.snapshot)
                self._break(chosen, "its database was found dead at hand-out")
                continue
            del self._warm[chosen.name]
            self._wake(self._keeper_wakeup)
            return chosen
        return None

    def _is_alive(self, clone: _Clone) -> bool:
        if self._alive is None:
            return True
        try:
            return self._alive(clone.name)
        except Exception:  # a liveness probe must never stop a hand-out
            log.exception("clone.liveness_check_failed", clone=clone.name)
            return True

    def _return_clone(self, clone: _Clone) -> None:
        """Put a reserved, never-claimed clone back (front of the free list)."""
        if clone.state is CloneState.WARM and clone.name in self._clones:
            self._warm = {clone.name: clone, **self._warm}
            self._dispatch()

    def _dispatch(self) -> None:
        """Give free warm clones to queued acquirers, first come first served."""
        served = False
        while self._waiters and self._warm:
            clone = self._take_warm()
            assert clone is not None
            waiter = self._waiters.popleft()
            waiter.clone = clone
            waiter.event.set()
            served = True
        if served:
            self._report_positions()

    def _report_positions(self) -> None:
        length = len(self._waiters)
        per_clone = self._provision_seconds
        slots = self._settings.pool.max_provisioning
        for index, waiter in enumerate(self._waiters):
            position = index + 1
            if waiter.on_progress is None or position == waiter.last_position:
                continue
            waiter.last_position = position
            eta = None if per_clone is None else math.ceil(position / slots) * per_clone
            try:
                waiter.on_progress(
                    QueueProgress(position=position, queue_length=length, eta_seconds=eta)
                )
            except Exception:
                log.exception("queue.progress_callback_failed")

    async def _hand_out(
        self, clone: _Clone, ttl: float, labels: dict[str, str]
    ) -> tuple[_Lease, str]:
        """Turn a reserved warm clone into a new lease (one compare-and-set of its meta)."""
        now = trio.current_time()
        secret = m.new_secret()
        lease = _Lease(
            id=m.lease_id(),
            secret_hash=m.secret_hash(secret),
            ttl=ttl,
            labels=labels,
            state=LeaseState.IDLE,
            clone=clone,
            created_wall=self._wall(),
            lifetime_deadline=now + self._settings.lease.max_lifetime,
            idle_deadline=now + ttl,
            started=now,
        )
        await self._claim(clone, lease)
        self._leases[lease.id] = lease
        self._wake(self._lease_wakeup)
        return lease, secret

    async def _claim(self, clone: _Clone, lease: _Lease) -> None:
        """Persist ``clone`` as leased to ``lease`` (compare-and-set); raise :class:`_Lost` if not."""
        assert clone.state is CloneState.WARM, clone
        assert clone.lease is None, clone
        meta = self._clone_meta(clone, CloneState.LEASED, lease)
        clone.writes += 1
        try:
            async with clone.lock:
                resource = await self._provider.set_meta(
                    Kind.CLONE, clone.name, meta, expect_version=clone.version
                )
        except ConflictError as exc:
            # Another broker replica claimed it first: the clone is now ITS lease. Forget
            # it here (never destroy it) and let the caller try the next warm clone.
            log.info("clone.claim_lost", clone=clone.name, error=str(exc))
            self._forget_clone(clone)
            raise _Lost from exc
        except ProviderError as exc:
            log.warning("clone.claim_failed", clone=clone.name, error=str(exc))
            self._report_error("lease", exc)
            self._break(clone, f"claiming it failed: {exc}", lease.id)
            raise _Lost from exc
        except BaseException:
            # Cancelled mid-write: we cannot know whether the write landed, so the
            # clone must never be offered again (a clone is handed out at most once).
            self._break(clone, "a hand-out was cancelled while claiming it", lease.id)
            raise
        clone.version = resource.version
        lease.persisted_idle = self._from_wall(float(meta[m.LEASE_IDLE_DEADLINE]))
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.HANDED_OUT)
        clone.lease = lease
        lease.clone = clone

    def _forget_clone(self, clone: _Clone) -> None:
        """Drop a clone from this pool's view without touching it (another replica owns it now)."""
        self._warm.pop(clone.name, None)
        if self._clones.get(clone.name) is clone:
            del self._clones[clone.name]
        self._wake(self._keeper_wakeup)

    def _checked_ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return min(self._settings.lease.ttl, self._settings.lease.max_ttl)
        if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
            raise InvalidRequestError(
                f"lease TTL {ttl!r} is not a positive number of seconds; pass e.g. 300."
            )
        return float(min(ttl, self._settings.lease.max_ttl))

    # -- lease life ------------------------------------------------------------------------

    def _active(self, lease_id: str) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.state not in ACTIVE_LEASE_STATES:
            raise self._not_found(lease_id)
        return lease

    @staticmethod
    def _not_found(lease_id: str) -> LeaseNotFoundError:
        shown = lease_id if len(lease_id) <= 64 else lease_id[:64] + "…"
        return LeaseNotFoundError(
            f"no active lease has id {shown!r}; it was released, expired or never existed — "
            "acquire a new one."
        )

    async def _end_lease(self, lease: _Lease, event: LeaseEvent, reason: EndReason) -> None:
        clone = self._finish_lease(lease, event, reason)
        await self._after_lease(clone)

    def _finish_lease(self, lease: _Lease, event: LeaseEvent, reason: EndReason) -> _Clone:
        """End the lease in memory (synchronously, so no second path can end it too)."""
        lease.state = lease_transition(lease.id, lease.state, event)
        self._leases.pop(lease.id, None)
        self._dirty.discard(lease.id)
        self._dead_leases.discard(lease.id)
        clone = lease.clone
        seconds = trio.current_time() - lease.started
        log.info(
            "lease.ended",
            lease_id=lease.id,
            reason=reason,
            clone=clone.name,
            snapshot=clone.snapshot,
            labels=lease.labels,
            ttl=lease.ttl,
            resets=lease.resets,
            attached=lease.attached,
            created_at=lease.created_wall,
            seconds=round(seconds, 3),
        )
        self._emit(LeaseEnded(lease_id=lease.id, reason=reason, seconds=seconds))
        self._wake(self._lease_wakeup)
        clone.lease = None
        if clone.state is CloneState.LEASED:
            clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
        return clone

    async def _after_lease(self, clone: _Clone) -> None:
        # Persist the end before returning, so a restart cannot bring the lease back;
        # the destroy itself may take a while and runs in the background.
        if clone.state is CloneState.DESTROYING:
            await self._guarded("lease", self._write_clone_meta, clone)
            self._spawn("destroy", self._destroy_clone, clone)

    async def _ttl_loop(self) -> None:
        while True:
            if self._shared and any(
                self._expiry_due(lease, trio.current_time()) for lease in self._leases.values()
            ):
                # Other replicas record attach state and activity in the meta: re-read
                # it before expiring anything.
                await self._refresh_quietly()
            now = trio.current_time()
            next_deadline = math.inf
            for lease in list(self._leases.values()):
                if lease.state not in ACTIVE_LEASE_STATES:
                    continue
                if now >= lease.lifetime_deadline:
                    clone = self._finish_lease(
                        lease, LeaseEvent.EXPIRE_LIFETIME, "expired_lifetime"
                    )
                    self._spawn("lease", self._after_lease, clone)
                    continue
                if lease.state is LeaseState.IDLE and now >= lease.idle_deadline:
                    clone = self._finish_lease(lease, LeaseEvent.EXPIRE_IDLE, "expired_idle")
                    self._spawn("lease", self._after_lease, clone)
                    continue
                next_deadline = min(next_deadline, lease.lifetime_deadline)
                if lease.state is LeaseState.IDLE:
                    next_deadline = min(next_deadline, lease.idle_deadline)
            self._lease_wakeup = trio.Event()
            with trio.move_on_at(next_deadline):
                await self._lease_wakeup.wait()

    @staticmethod
    def _expiry_due(lease: _Lease, now: float) -> bool:
        if lease.state not in ACTIVE_LEASE_STATES:
            return False
        idle_due = lease.state is LeaseState.IDLE and now >= lease.idle_deadline
        return idle_due or now >= lease.lifetime_deadline

    def _mark_dirty(self, lease: _Lease) -> None:
        self._dirty.add(lease.id)
        self._wake(self._persist_wakeup, self._lease_wakeup)

    @staticmethod
    def _heartbeat_due(lease: _Lease, now: float) -> bool:
        """Whether the idle deadline other replicas see lags this replica's by over ``ttl / 3``.

        While clients are attached here, the written deadline is kept at least
        ``2/3 ttl`` ahead, so the leader never expires a lease in use on a follower,
        and a crashed follower's leases expire within one TTL.
        """
        if lease.attached:
            return now >= lease.persisted_idle - 2 * lease.ttl / 3
        return lease.idle_deadline > lease.persisted_idle + lease.ttl / 3

    async def _persist_loop(self) -> None:
        while True:
            wake_at = math.inf
            if self._shared:
                for held in self._leases.values():
                    if held.attached:
                        wake_at = min(wake_at, held.persisted_idle - 2 * held.ttl / 3)
                # A failed write leaves the heartbeat due: retry, but not in a busy loop.
                wake_at = max(wake_at, trio.current_time() + _HEARTBEAT_RETRY_SECONDS)
            with trio.move_on_at(wake_at):
                await self._persist_wakeup.wait()
            self._persist_wakeup = trio.Event()
            if self._shared:
                now = trio.current_time()
                self._dirty |= {
                    held.id for held in self._leases.values() if self._heartbeat_due(held, now)
                }
            while self._dirty:
                lease = self._leases.get(self._dirty.pop())
                if lease is not None:
                    await self._guarded("lease", self._write_clone_meta, lease.clone)

    # -- clone meta --------------------------------------------------------------------------

    def _clone_meta(
        self, clone: _Clone, state: CloneState, lease: _Lease | None = None
    ) -> dict[str, str]:
        meta = {
            m.STATUS: state.value,
            m.SNAPSHOT: clone.snapshot,
            m.CREATED: m.fmt_time(clone.created_wall),
        }
        if lease is not None:
            now = trio.current_time()
            idle = lease.idle_deadline if lease.attached == 0 else now + lease.ttl
            meta |= {
                m.LEASE_ID: lease.id,
                m.LEASE_SECRET_HASH: lease.secret_hash,
                m.LEASE_TTL: repr(lease.ttl),
                m.LEASE_LABELS: m.dump_labels(lease.labels),
                m.LEASE_CREATED: m.fmt_time(lease.created_wall),
                m.LEASE_EXPIRES_AT: m.fmt_time(self._to_wall(lease.lifetime_deadline)),
                m.LEASE_IDLE_DEADLINE: m.fmt_time(self._to_wall(idle)),
                m.LEASE_ATTACHED: "1" if lease.attached else "0",
                m.LEASE_GENERATION: str(lease.generation),
                m.LEASE_RESETS: str(lease.resets),
            }
        return meta

    async def _write_clone_meta(self, clone: _Clone) -> None:
        """Write the clone's current state (and lease) to its meta, compare-and-set."""
        clone.writes += 1
        async with clone.lock:
            meta = self._clone_meta(clone, clone.state, clone.lease)
            try:
                resource = await self._provider.set_meta(
                    Kind.CLONE, clone.name, meta, expect_version=clone.version
                )
            except NotFoundError:
                if not (self._shared and clone.lease is not None):
                    raise
                self._drop_lease(clone.lease, "another replica ended it and destroyed its clone")
                return
            except ConflictError:
                # Someone changed it behind our back (another replica writing the same
                # lease): re-read it and write once more over its version.
                fresh = await self._find(Kind.CLONE, clone.name)
                lease = clone.lease
                if (
                    self._shared
                    and lease is not None
                    and (fresh is None or not _holds(fresh, lease))
                ):
                    # Ended or reset on another replica: never bring it back.
                    self._drop_lease(lease, "it ended or moved on another replica")
                    return
                if fresh is None:
                    raise
                if lease is not None:
                    self._merge_lease_meta(lease, fresh.meta, take_ttl=False)
                    meta = self._clone_meta(clone, clone.state, lease)
                resource = await self._provider.set_meta(
                    Kind.CLONE, clone.name, meta, expect_version=fresh.version
                )
            clone.version = resource.version
            if clone.lease is not None and m.LEASE_IDLE_DEADLINE in meta:
                clone.lease.persisted_idle = self._from_wall(float(meta[m.LEASE_IDLE_DEADLINE]))

    async def _find(self, kind: Kind, name: str) -> Resource | None:
        for resource in await self._provider.list(kind):
            if resource.name == name:
                return resource
        return None

    # -- warm pool -------------------------------------------------------------------------

    async def _keeper_loop(self) -> None:
        while True:
            self._keeper_wakeup = trio.Event()
            self._keep()
            wake_at = math.inf
            if self._provision_not_before > trio.current_time():
                wake_at = self._provision_not_before
            with trio.move_on_at(wake_at):
                await self._keeper_wakeup.wait()

    def _keep(self) -> None:
        """Start making clones of the newest ready snapshot; retire surplus older warm ones."""
        newest = self._newest_ready()
        if newest is None:
            return
        size = self._settings.pool.size
        provisioning = [c for c in self._clones.values() if c.state is CloneState.PROVISIONING]
        current = [c for c in self._warm.values() if c.snapshot == newest.name]
        current_making = [c for c in provisioning if c.snapshot == newest.name]
        if not self._draining and trio.current_time() >= self._provision_not_before:
            wanted = size + len(self._waiters) - len(current) - len(current_making)
            room = self._settings.pool.max_provisioning - len(provisioning)
            for _ in range(max(0, min(wanted, room))):
                self._start_provisioning(newest)
        # Roll-over: once clones of the newest snapshot are warm, older idle ones go.
        surplus = len(self._warm) - size if not self._waiters else 0
        for clone in [c for c in self._warm.values() if c.snapshot != newest.name][:surplus]:
            del self._warm[clone.name]
            clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
            log.info("clone.rolled_over", clone=clone.name, snapshot=clone.snapshot, to=newest.name)
            self._spawn("destroy", self._retire_published, clone, None)
        surplus = len(self._warm) - size if not self._waiters else 0
        if self._shared and surplus > 0 and not provisioning:
            # Replicas: a clone whose publishing or retiring failed is forgotten and comes
            # back through the view once the API answers, after a replacement was made.
            for clone in list(self._warm.values())[-surplus:]:
                del self._warm[clone.name]
                clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
                log.info("clone.surplus", clone=clone.name, snapshot=clone.snapshot, size=size)
                self._spawn("destroy", self._retire_published, clone, None)

    def _start_provisioning(self, snapshot: _Snapshot) -> None:
        clone = _Clone(
            name=m.clone_name(),
            snapshot=snapshot.name,
            state=CloneState.PROVISIONING,
            created_wall=self._wall(),
        )
        self._clones[clone.name] = clone
        assert self._lead_nursery is not None, "provisioning is leader work"
        self._lead_nursery.start_soon(self._guarded, "provision", self._provision, clone)

    async def _provision(self, clone: _Clone) -> None:
        started = trio.current_time()
        published = False
        try:
            clone.endpoint = await self._provider.clone(
                clone.snapshot, clone.name, self._clone_meta(clone, CloneState.PROVISIONING)
            )
            warm = clone_transition(clone.name, clone.state, CloneEvent.PROVISIONED)
            clone.writes += 1
            made: str | None = None
            if self._shared:
                # Publish by compare-and-set over the version as made: once `warm` has
                # landed (even if its answer was lost), another replica may claim it, and
                # a blind retry of this write would hand that lease's clone out again.
                found = await self._find(Kind.CLONE, clone.name)
                if found is None:
                    raise NotFoundError(f"clone {clone.name!r} vanished while being made.")
                made = found.version
            published = True  # from here on the `warm` meta may have landed, whatever we hear
            resource = await self._provider.set_meta(
                Kind.CLONE, clone.name, self._clone_meta(clone, warm), expect_version=made
            )
            clone.version = resource.version
            clone.state = warm
        except ProviderError as exc:
            self._provisioning_failures += 1
            delay = min(_BACKOFF_MAX, 2.0 ** min(self._provisioning_failures, 6))
            if isinstance(exc, TemporaryProviderError):
                delay = max(delay, exc.delay)
            self._provision_not_before = trio.current_time() + delay
            log.warning(
                "clone.provision_failed",
                clone=clone.name,
                snapshot=clone.snapshot,
                error=str(exc),
                retry_in=delay,
            )
            self._report_error("provision", exc)
            # If the warm write landed but its answer was lost, another replica may have
            # claimed the clone already: retire it by compare-and-set, never blindly.
            self._break(clone, str(exc), maybe_published=published)
            return
        seconds = trio.current_time() - started
        self._provisioning_failures = 0
        self._provision_seconds = (
            seconds
            if self._provision_seconds is None
            else 0.7 * self._provision_seconds + 0.3 * seconds
        )
        self._emit(CloneProvisioned(clone=clone.name, snapshot=clone.snapshot, seconds=seconds))
        log.info("clone.warm", clone=clone.name, snapshot=clone.snapshot, seconds=round(seconds, 3))
        self._warm[clone.name] = clone
        self._dispatch()
        self._wake(self._keeper_wakeup)

    def _break(
        self,
        clone: _Clone,
        reason: str,
        lease_id: str | None = None,
        *,
        maybe_published: bool = False,
    ) -> None:
        """Mark a clone broken (it is never handed out) and destroy it in the background.

        A clone that was warm may have been claimed by another replica meanwhile:
        it is retired by compare-and-set (:meth:`_retire_published`), so that
        replica's lease survives; ``lease_id`` names this pool's own claim, if any.
        ``maybe_published``: a write of ``warm`` was sent, its outcome unknown.
        """
        published = clone.state is CloneState.WARM or (maybe_published and self._shared)
        self._warm.pop(clone.name, None)
        if clone.state in (CloneState.PROVISIONING, CloneState.WARM, CloneState.LEASED):
            clone.state = clone_transition(clone.name, clone.state, CloneEvent.BROKE)
            self._emit(CloneFailed(clone=clone.name, snapshot=clone.snapshot, reason=reason))
        if clone.state is CloneState.BROKEN:
            clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
            if published:
                self._spawn("destroy", self._retire_published, clone, lease_id)
            else:
                self._spawn("destroy", self._destroy_clone, clone)
        self._wake(self._keeper_wakeup)

    async def _retire_published(self, clone: _Clone, lease_id: str | None) -> None:
        """Write ``destroying`` over the warm version this pool saw, then destroy the clone.

        If the write conflicts, someone wrote the clone since: when that is a
        lease other than ``lease_id`` (another replica's hand-out), the clone is
        only forgotten here — never destroyed under a live lease.
        """
        assert clone.state is CloneState.DESTROYING, clone
        clone.writes += 1
        meta = self._clone_meta(clone, clone.state)
        try:
            async with clone.lock:
                try:
                    await self._provider.set_meta(
                        Kind.CLONE, clone.name, meta, expect_version=clone.version
                    )
                except ConflictError:
                    fresh = await self._find(Kind.CLONE, clone.name)
                    holder = None if fresh is None else fresh.meta.get(m.LEASE_ID)
                    if fresh is None or (holder is not None and holder != lease_id):
                        log.info("clone.claimed_elsewhere", clone=clone.name)
                        self._forget_clone(clone)
                        return
                    await self._provider.set_meta(
                        Kind.CLONE, clone.name, meta, expect_version=fresh.version
                    )
        except NotFoundError:
            self._forget_clone(clone)
            return
        except ProviderError:
            if self._shared:
                # Unsure who holds it now: leave it rather than destroy a lease. Forget it,
                # so the next view refresh takes it back as what the cluster says it is.
                self._forget_clone(clone)
                raise
        await self._destroy_clone(clone)

    async def _retire_clone(self, clone: _Clone, why: str) -> None:
        """Persist ``destroying`` (so a restart never revives it), then destroy it."""
        if clone.state in (CloneState.WARM, CloneState.LEASED, CloneState.PROVISIONING):
            clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
        self._warm.pop(clone.name, None)
        log.info("clone.retired", clone=clone.name, snapshot=clone.snapshot, why=why)
        await self._guarded("destroy", self._write_clone_meta, clone)
        await self._destroy_clone(clone)

    async def _destroy_clone(self, clone: _Clone) -> None:
        assert clone.state is CloneState.DESTROYING, clone
        try:
            await self._provider.destroy(Kind.CLONE, clone.name)
        except ProviderError as exc:
            log.warning("clone.destroy_failed", clone=clone.name, error=str(exc))
            self._report_error("destroy", exc)
            self._doomed[(Kind.CLONE, clone.name)] = str(exc)
            return
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.DESTROYED)
        self._clones.pop(clone.name, None)
        self._wake(self._prune_wakeup, self._keeper_wakeup)

    async def _health_loop(self) -> None:
        while True:
            await trio.sleep(self._settings.pool.health_check_interval)
            for clone in list(self._warm.values()):
                try:
                    healthy = await self._provider.is_healthy(clone.name)
                except ProviderError as exc:
                    self._report_error("health", exc)
                    continue
                if not healthy and self._warm.get(clone.name) is clone:
                    log.warning("clone.unhealthy", clone=clone.name, snapshot=clone.snapshot)
                    self._break(clone, "its database stopped answering")
            await self._check_leased()
            await self._retry_doomed()

    async def _follower_health_loop(self) -> None:
        """While not leading, still check the leases in view (reads only, destroys nothing).

        A lease's client may talk to any replica: its ``healthy`` flag must turn
        false there too, not only on the leader, whose health loop does this itself.
        """
        while True:
            await trio.sleep(self._settings.pool.health_check_interval)
            if not self.leading:
                await self._check_leased()

    async def _check_leased(self) -> None:
        """Find leases whose database died: reported (statistics, log, event) until reset."""
        for lease in list(self._leases.values()):
            clone = lease.clone
            try:
                healthy = await self._provider.is_healthy(clone.name)
            except ProviderError as exc:
                self._report_error("health", exc)
                continue
            if self._leases.get(lease.id) is not lease or lease.clone is not clone:
                continue  # ended or reset meanwhile
            if healthy:
                self._dead_leases.discard(lease.id)
            elif lease.id not in self._dead_leases:
                self._dead_leases.add(lease.id)
                reason = "its database stopped answering during the lease; reset the lease"
                log.warning("lease.database_died", lease_id=lease.id, clone=clone.name)
                self._emit(CloneFailed(clone=clone.name, snapshot=clone.snapshot, reason=reason))

    async def _retry_doomed(self) -> None:
        for (kind, name), _why in list(self._doomed.items()):
            try:
                await self._provider.destroy(kind, name)
            except ProviderError as exc:
                self._report_error("destroy", exc)
                continue
            del self._doomed[(kind, name)]
            if kind is Kind.CLONE:
                clone = self._clones.pop(name, None)
                if clone is not None and clone.state is CloneState.DESTROYING:
                    clone.state = clone_transition(clone.name, clone.state, CloneEvent.DESTROYED)
            self._wake(self._prune_wakeup, self._keeper_wakeup)

    # -- snapshot pipeline -----------------------------------------------------------------

    async def _source_loop(self) -> None:
        while True:
            self._refresh_wakeup = trio.Event()
            pending, self._to_verify = self._to_verify, []
            for snap in pending:
                await self._guarded("pipeline", self._resume_verification, snap)
            await self._guarded("source", self._poll_once)
            next_poll = trio.current_time() + self._settings.source.poll_interval
            now = trio.current_time()
            retry_at = min((at for _, at in self._temporary.values() if at > now), default=math.inf)
            with trio.move_on_at(min(next_poll, retry_at)):
                await self._refresh_wakeup.wait()

    async def _poll_once(self) -> None:
        backups = await self._source.list_backups()
        if not backups:
            log.info("source.empty", source=self._source.description)
            return
        newest = max(backups, key=lambda b: (b.modified, b.key))
        for snap in self._snapshots.values():
            if snap.backup_key == newest.key and snap.backup_etag == newest.etag:
                return
        known = [m.parse_float(s.meta, m.BACKUP_MODIFIED) or 0.0 for s in self._snapshots.values()]
        if known and newest.modified < max(known):
            # The newer backup was deleted from the source: never roll back to older data.
            log.info("source.only_older_backups", backup_key=newest.key)
            return
        # Back-off state is only kept for the backup that is newest now.
        self._temporary = {
            k: v for k, v in self._temporary.items() if k == (newest.key, newest.etag)
        }
        _, retry_at = self._temporary.get((newest.key, newest.etag), (0, 0.0))
        if trio.current_time() < retry_at:
            return  # backing off after a temporary failure
        await self._pipeline(newest)

    async def _pipeline(self, backup: Backup) -> None:
        created = self._wall()
        name = m.snapshot_name(created)
        meta = {
            m.STATUS: SnapshotState.RESTORING.value,
            m.SNAPSHOT: name,
            m.BACKUP_KEY: backup.key,
            m.BACKUP_ETAG: backup.etag,
            m.BACKUP_SIZE: str(backup.size),
            m.BACKUP_MODIFIED: m.fmt_time(backup.modified),
            m.CREATED: m.fmt_time(created),
        }
        snap = _Snapshot(
            name=name,
            state=SnapshotState.RESTORING,
            backup_key=backup.key,
            backup_etag=backup.etag,
            created_wall=created,
            meta=meta,
        )
        self._snapshots[name] = snap
        self._pipeline_snapshot = snap
        with structlog.contextvars.bound_contextvars(snapshot=name):
            log.info(
                "snapshot.restoring",
                backup_key=backup.key,
                backup_size=backup.size,
                source=self._source.description,
            )
            try:
                await self._restore_and_seal(snap, backup)
                await self._verify(snap)
                self._temporary.pop((backup.key, backup.etag), None)
            except TemporaryProviderError as exc:
                # Retried with exponential back-off; after a few failures in a row it is
                # recorded as failed with the reason (a new backup or ETag starts afresh).
                attempts = self._temporary.get((backup.key, backup.etag), (0, 0.0))[0] + 1
                self._report_error("pipeline", exc)
                if attempts >= _TEMPORARY_ATTEMPTS:
                    self._temporary.pop((backup.key, backup.etag), None)
                    await self._fail(snap, f"gave up after {attempts} attempts: {exc}")
                else:
                    delay = min(_BACKOFF_MAX, max(exc.delay, 1.0) * 2.0 ** (attempts - 1))
                    self._temporary[(backup.key, backup.etag)] = (
                        attempts,
                        trio.current_time() + delay,
                    )
                    log.warning(
                        "snapshot.retry_later", error=str(exc), attempt=attempts, retry_in=delay
                    )
                    await self._clean_artefacts(snap)
                    self._snapshots.pop(name, None)
            except ProviderError as exc:
                self._temporary.pop((backup.key, backup.etag), None)
                await self._fail(snap, str(exc))
            except Exception as exc:
                log.exception("snapshot.pipeline_crashed")
                await self._fail(snap, f"unexpected {type(exc).__name__} in the pipeline: {exc}")
            finally:
                self._pipeline_snapshot = None
                self._restore = None
                self._wake(self._prune_wakeup)

    async def _restore_and_seal(self, snap: _Snapshot, backup: Backup) -> None:
        command = self._settings.restore_command(backup)
        if command is None:
            raise ProviderError(
                f"backup {backup.key!r} has no known suffix (.sql, .sql.gz, .dump, .pgdump); "
                "rename it or set restore.argv."
            )
        await self._provider.create_volume(snap.name, snap.meta)
        started = trio.current_time()
        last_log = -math.inf
        latest = RestoreProgress(done_bytes=0, total_bytes=backup.size, elapsed_seconds=0.0)
        self._restore = RestoreStatus(snapshot=snap.name, backup_key=backup.key, progress=latest)

        def on_progress(progress: RestoreProgress) -> None:
            nonlocal last_log, latest
            latest = progress
            self._restore = RestoreStatus(
                snapshot=snap.name, backup_key=backup.key, progress=progress
            )
            now = trio.current_time()
            if now - last_log >= _PROGRESS_LOG_SECONDS:
                last_log = now
                _log_progress("snapshot.restore_progress", progress)

        succeeded = False
        try:
            await self._provider.restore(snap.name, backup, self._source, command, on_progress)
            succeeded = True
        finally:
            seconds = trio.current_time() - started
            self._emit(
                RestoreFinished(
                    snapshot=snap.name,
                    backup_key=backup.key,
                    seconds=seconds,
                    bytes=latest.done_bytes,
                    succeeded=succeeded,
                )
            )
            if succeeded:
                _log_progress("snapshot.restored", latest)
        snap.meta |= {
            m.STATUS: SnapshotState.VERIFYING.value,
            m.RESTORE_SECONDS: f"{seconds:.3f}",
            m.RESTORED_BYTES: str(latest.done_bytes),
        }
        resource = await self._provider.seal(snap.name, snap.name, snap.meta)
        snap.version = resource.version
        snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.SEALED)
        log.info("snapshot.sealed", size_bytes=resource.size_bytes)

    async def _resume_verification(self, snap: _Snapshot) -> None:
        self._pipeline_snapshot = snap
        with structlog.contextvars.bound_contextvars(snapshot=snap.name):
            log.info("snapshot.resuming_verification", backup_key=snap.backup_key)
            try:
                await self._verify(snap)
            except TemporaryProviderError as exc:
                # Leave it `verifying`: the next start (or the next poll, which sees its
                # backup as known) must not restore it again; retry verification later.
                self._report_error("pipeline", exc)
                self._to_verify.append(snap)
            except ProviderError as exc:
                await self._fail(snap, str(exc))
            finally:
                self._pipeline_snapshot = None

    async def _verify(self, snap: _Snapshot) -> None:
        name = m.verify_clone_name()
        started = trio.current_time()
        meta = {
            m.STATUS: CloneState.PROVISIONING.value,
            m.ROLE: m.ROLE_VERIFY,
            m.SNAPSHOT: snap.name,
            m.CREATED: m.fmt_time(self._wall()),
        }
        try:
            await self._provider.clone(snap.name, name, meta)
            await self._provider.check(name, self._settings.check_command())
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
                await self._destroy_quietly(Kind.CLONE, name)
        snap.meta |= {m.STATUS: SnapshotState.READY.value, m.READY_AT: m.fmt_time(self._wall())}
        resource = await self._provider.set_meta(
            Kind.SNAPSHOT, snap.name, snap.meta, expect_version=snap.version or None
        )
        snap.version = resource.version
        snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.VERIFIED)
        snap.ready_wall = self._wall()
        self._emit(SnapshotReady(snapshot=snap.name, backup_key=snap.backup_key))
        log.info(
            "snapshot.ready",
            backup_key=snap.backup_key,
            verify_seconds=round(trio.current_time() - started, 3),
        )
        self._wake(self._keeper_wakeup, self._prune_wakeup)

    async def _fail(self, snap: _Snapshot, reason: str) -> None:
        reason = reason[: m.MAX_REASON_CHARS]
        snap.reason = reason
        log.error("snapshot.failed", backup_key=snap.backup_key, reason=reason)
        await self._clean_artefacts(snap)
        snap.meta |= {
            m.STATUS: SnapshotState.FAILED.value,
            m.REASON: reason,
            m.FAILED_AT: m.fmt_time(self._wall()),
        }
        snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.FAILED)
        # After the state changed: whoever hears the event sees the snapshot as failed.
        self._emit(SnapshotFailed(snapshot=snap.name, backup_key=snap.backup_key, reason=reason))
        try:
            resource = await self._provider.record_failed_snapshot(snap.name, snap.meta)
        except ProviderError as exc:
            # Without the record a restart would try this backup again; say so and go on.
            log.warning("snapshot.failure_not_recorded", error=str(exc))
            self._report_error("pipeline", exc)
            return
        snap.version = resource.version

    async def _clean_artefacts(self, snap: _Snapshot) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
            await self._destroy_quietly(Kind.VOLUME, snap.name)
            await self._destroy_quietly(Kind.SNAPSHOT, snap.name)

    async def _destroy_quietly(self, kind: Kind, name: str) -> None:
        try:
            await self._provider.destroy(kind, name)
        except ProviderError as exc:
            log.warning("destroy_failed", kind=kind.value, name=name, error=str(exc))
            self._report_error("destroy", exc)
            self._doomed[(kind, name)] = str(exc)

    # -- pruning ---------------------------------------------------------------------------

    async def _prune_loop(self) -> None:
        while True:
            self._prune_wakeup = trio.Event()
            await self._guarded("prune", self._prune_once)
            with trio.move_on_after(self._settings.pool.health_check_interval):
                await self._prune_wakeup.wait()

    def _pinned(self) -> set[str]:
        pinned = {c.snapshot for c in self._clones.values() if c.state in LIVE_CLONE_STATES}
        pinned |= {lease.clone.snapshot for lease in self._leases.values()}
        if self._pipeline_snapshot is not None:
            pinned.add(self._pipeline_snapshot.name)
        return pinned

    async def _prune_once(self) -> None:
        ready = sorted(
            (s for s in self._snapshots.values() if s.state is SnapshotState.READY),
            key=lambda s: s.created_wall,
            reverse=True,
        )
        pinned = self._pinned()
        now_wall = self._wall()
        victims = [s for s in ready[self._settings.snapshots.keep :] if s.name not in pinned]
        for snap in self._snapshots.values():
            if snap.state is SnapshotState.FAILED and snap.name not in pinned:
                failed_at = m.parse_float(snap.meta, m.FAILED_AT) or snap.created_wall
                if now_wall - failed_at >= self._settings.snapshots.failed_grace:
                    victims.append(snap)
        for snap in victims:
            if snap.name in self._pinned():
                continue
            await self._provider.destroy(Kind.SNAPSHOT, snap.name)
            snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.PRUNED)
            self._snapshots.pop(snap.name, None)
            log.info("snapshot.pruned", snapshot=snap.name, backup_key=snap.backup_key)

    # -- adoption after a restart ----------------------------------------------------------

    async def _adopt_with_retries(self) -> None:
        """Adopt; while the provider cannot even list its resources, retry with backoff."""
        delay = 1.0
        while True:
            try:
                await self._adopt()
            except ProviderError as exc:
                log.error("pool.adopt_failed", error=str(exc), retry_in=delay)
                self._report_error("adopt", exc)
                await trio.sleep(delay)
                delay = min(_BACKOFF_MAX, delay * 2)
            else:
                return

    async def _adopt(self) -> None:
        resources = await self._provider.list()
        now = trio.current_time()
        now_wall = self._wall()
        doomed: list[tuple[Kind, str, str]] = []
        for r in resources:
            if r.kind is Kind.VOLUME:
                doomed.append((r.kind, r.name, "half-made restore"))
        for r in resources:
            if r.kind is not Kind.SNAPSHOT:
                continue
            status = r.meta.get(m.STATUS)
            state = {
                SnapshotState.READY.value: SnapshotState.READY,
                SnapshotState.FAILED.value: SnapshotState.FAILED,
                SnapshotState.VERIFYING.value: SnapshotState.VERIFYING,
            }.get(status or "")
            if state is None:
                doomed.append((r.kind, r.name, f"snapshot with status {status!r}"))
                continue
            snap = _Snapshot(
                name=r.name,
                state=state,
                backup_key=r.meta.get(m.BACKUP_KEY, ""),
                backup_etag=r.meta.get(m.BACKUP_ETAG, ""),
                created_wall=m.parse_float(r.meta, m.CREATED) or now_wall,
                meta=dict(r.meta),
                version=r.version,
                ready_wall=m.parse_float(r.meta, m.READY_AT),
                reason=r.meta.get(m.REASON),
            )
            self._snapshots[r.name] = snap
            if state is SnapshotState.VERIFYING:
                self._to_verify.append(snap)
        by_lease: dict[str, list[tuple[Resource, _Lease]]] = collections.defaultdict(list)
        for r in resources:
            if r.kind is not Kind.CLONE:
                continue
            status = r.meta.get(m.STATUS)
            origin = self._snapshots.get(r.meta.get(m.SNAPSHOT, ""))
            if r.meta.get(m.ROLE) == m.ROLE_VERIFY:
                doomed.append((r.kind, r.name, "verify clone of an interrupted pipeline"))
            elif status == CloneState.WARM.value:
                if r.endpoint is None or origin is None or origin.state is not SnapshotState.READY:
                    doomed.append((r.kind, r.name, "warm clone without a running database"))
                    continue
                clone = self._adopted_clone(r, CloneState.WARM)
                self._warm[clone.name] = clone
            elif status == CloneState.LEASED.value:
                lease = self._adopted_lease(r, now)
                if lease is None:
                    doomed.append((r.kind, r.name, "leased clone with unreadable lease meta"))
                else:
                    by_lease[lease.id].append((r, lease))
            else:
                doomed.append((r.kind, r.name, f"clone with status {status!r}"))
        for lease_id, claims in by_lease.items():
            # A reset interrupted between claiming the new clone and retiring the old one
            # leaves two clones with one lease: the newer generation wins.
            claims.sort(key=lambda pair: pair[1].generation, reverse=True)
            (resource, lease), *losers = claims
            for r, _ in losers:
                doomed.append((r.kind, r.name, f"older clone of reset lease {lease_id}"))
            if resource.endpoint is None:
                doomed.append((resource.kind, resource.name, "leased clone is not running"))
                log.warning("lease.lost", lease_id=lease_id, clone=resource.name)
                self._emit(LeaseEnded(lease_id=lease_id, reason="lost", seconds=0.0))
                continue
            self._clones[lease.clone.name] = lease.clone
            self._leases[lease_id] = lease
        for kind, name, why in doomed:
            log.info("adopt.destroying", kind=kind.value, name=name, why=why)
            await self._destroy_quietly(kind, name)
        log.info(
            "pool.adopted",
            provider=self._provider.name,
            snapshots=len(self._snapshots),
            warm=len(self._warm),
            leases=len(self._leases),
            destroyed=len(doomed),
        )

    def _adopted_clone(self, r: Resource, state: CloneState) -> _Clone:
        clone = _Clone(
            name=r.name,
            snapshot=r.meta.get(m.SNAPSHOT, ""),
            state=state,
            created_wall=m.parse_float(r.meta, m.CREATED) or self._wall(),
            endpoint=r.endpoint,
            version=r.version,
        )
        self._clones[clone.name] = clone
        return clone

    def _adopted_lease(self, r: Resource, now: float) -> _Lease | None:
        meta = r.meta
        lease_id = meta.get(m.LEASE_ID)
        secret_hash = meta.get(m.LEASE_SECRET_HASH)
        ttl = m.parse_float(meta, m.LEASE_TTL)
        expires = m.parse_float(meta, m.LEASE_EXPIRES_AT)
        idle = m.parse_float(meta, m.LEASE_IDLE_DEADLINE)
        labels = m.load_labels(meta.get(m.LEASE_LABELS, "{}"))
        if not (lease_id and secret_hash and ttl and expires is not None and idle is not None):
            return None
        if labels is None:
            return None
        clone = _Clone(
            name=r.name,
            snapshot=meta.get(m.SNAPSHOT, ""),
            state=CloneState.LEASED,
            created_wall=m.parse_float(meta, m.CREATED) or self._wall(),
            endpoint=r.endpoint,
            version=r.version,
        )
        # Clients attached at the crash (or on another replica) were cut off by it or still
        # use it: give them a full TTL.
        attached = meta.get(m.LEASE_ATTACHED) == "1"
        idle_deadline = now + ttl if attached else self._from_wall(idle)
        lease = _Lease(
            id=lease_id,
            secret_hash=secret_hash,
            ttl=ttl,
            labels=labels,
            state=LeaseState.IDLE,
            clone=clone,
            created_wall=m.parse_float(meta, m.LEASE_CREATED) or self._wall(),
            lifetime_deadline=self._from_wall(expires),
            idle_deadline=idle_deadline,
            started=now - max(0.0, self._wall() - (m.parse_float(meta, m.LEASE_CREATED) or 0.0)),
            generation=m.parse_int(meta, m.LEASE_GENERATION),
            resets=m.parse_int(meta, m.LEASE_RESETS),
            persisted_idle=self._from_wall(idle),
        )
        clone.lease = lease
        return lease

    # -- several replicas: view refresh, take-over, step-down ----------------------------

    def _start_leader_loops(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._source_loop)
        nursery.start_soon(self._keeper_loop)
        nursery.start_soon(self._health_loop)
        nursery.start_soon(self._ttl_loop)
        nursery.start_soon(self._prune_loop)

    async def _with_retries(self, component: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn``; while the provider cannot even list its resources, retry with backoff."""
        delay = 1.0
        while True:
            try:
                await fn()
            except ProviderError as exc:
                log.error("pool.list_failed", component=component, error=str(exc), retry_in=delay)
                self._report_error(component, exc)
                await trio.sleep(delay)
                delay = min(_BACKOFF_MAX, delay * 2)
            else:
                return

    async def _view_loop(self) -> None:
        while True:
            self._view_wakeup = trio.Event()
            with trio.move_on_after(self._settings.pool.refresh_interval):
                await self._view_wakeup.wait()
            await self._guarded("refresh", self.refresh_view)

    async def _refresh_quietly(self) -> None:
        """Refresh the view before answering "no"; a provider failure only logs (bounded)."""
        with trio.move_on_after(_CLEANUP_SECONDS):
            await self._guarded("refresh", self.refresh_view)

    async def _lookup(self, lease_id: str) -> _Lease:
        """The active lease; a follower that does not know it re-reads the provider first."""
        lease = self._leases.get(lease_id)
        if self._shared and (lease is None or lease.state not in ACTIVE_LEASE_STATES):
            await self._refresh_quietly()
        return self._active(lease_id)

    def _merge(self, resources: Iterable[Resource], writes: Mapping[str, int]) -> None:
        """Merge a listing into this pool's view (never destroys anything).

        ``writes`` holds each local clone's write count from before the listing:
        a clone this pool wrote (or made) meanwhile is newer here than listed.
        """
        now = trio.current_time()
        listed = {(r.kind, r.name): r for r in resources}
        # Clones this pool dropped while the listing ran (destroyed, forgotten): the listing
        # is older than that for them, and must not bring them back as warm or leased.
        dropped = writes.keys() - self._clones.keys()
        for r in listed.values():
            state = _SNAPSHOT_STATES.get(r.meta.get(m.STATUS, ""))
            if r.kind is not Kind.SNAPSHOT or state is None:
                continue
            snap = self._snapshots.get(r.name)
            finished_elsewhere = (
                snap is not None
                and snap.state is SnapshotState.VERIFYING
                and state is not SnapshotState.VERIFYING
                and snap is not self._pipeline_snapshot
            )
            if snap is None or finished_elsewhere:
                self._snapshots[r.name] = self._snapshot_from(r, state)
        if not self.leading:  # only a leader prunes, and it knows what it pruned
            for name, snap in list(self._snapshots.items()):
                gone = (Kind.SNAPSHOT, name) not in listed
                if gone and snap.state in (SnapshotState.READY, SnapshotState.FAILED):
                    del self._snapshots[name]
        # Which clone holds each lease now: the highest generation (a reset moves it).
        holders: dict[str, Resource] = {}
        for r in listed.values():
            if r.kind is not Kind.CLONE or r.meta.get(m.STATUS) != CloneState.LEASED.value:
                continue
            lease_id = r.meta.get(m.LEASE_ID, "")
            known = holders.get(lease_id)
            if lease_id and (known is None or _generation(r) > _generation(known)):
                holders[lease_id] = r
        for name, clone in list(self._clones.items()):
            if writes.get(name) != clone.writes or clone.lock.locked():
                continue  # written (or made) here since the listing began: ours is newer
            seen = listed.get((Kind.CLONE, name))
            if clone.state is CloneState.WARM and name in self._warm:
                if seen and seen.meta.get(m.STATUS) == CloneState.WARM.value and seen.endpoint:
                    clone.version = seen.version
                else:
                    self._forget_clone(clone)  # claimed or retired by another replica
            elif clone.state is CloneState.LEASED and clone.lease is not None:
                lease = clone.lease
                holder = holders.get(lease.id)
                if lease.lock.locked():
                    continue
                if holder is None:
                    self._drop_lease(lease, "it ended on another replica")
                elif holder.name == name:
                    clone.version = holder.version
                    self._merge_lease_meta(lease, holder.meta, take_ttl=True)
                elif _generation(holder) > lease.generation and holder.endpoint is not None:
                    # Reset on another replica: the lease moved to a fresh clone.
                    self._forget_clone(clone)
                    fresh = self._adopted_clone(holder, CloneState.LEASED)
                    fresh.lease, lease.clone = lease, fresh
                    lease.generation = _generation(holder)
                    self._merge_lease_meta(lease, holder.meta, take_ttl=True)
        for lease_id, r in holders.items():
            if lease_id in self._leases or r.name in self._clones or r.endpoint is None:
                continue
            if r.name in dropped:
                continue
            adopted = self._adopted_lease(r, now)
            if adopted is not None:
                self._clones[r.name] = adopted.clone
                self._leases[lease_id] = adopted
                self._wake(self._lease_wakeup)
        for r in listed.values():
            if r.kind is not Kind.CLONE or r.name in self._clones or r.endpoint is None:
                continue
            if r.name in dropped:
                continue
            origin = self._snapshots.get(r.meta.get(m.SNAPSHOT, ""))
            if (
                r.meta.get(m.STATUS) == CloneState.WARM.value
                and r.meta.get(m.ROLE) != m.ROLE_VERIFY
                and origin is not None
                and origin.state is SnapshotState.READY
            ):
                self._warm[r.name] = self._adopted_clone(r, CloneState.WARM)
                self._wake(self._keeper_wakeup)  # a leader may hold more warm than pool.size now
        if self.leading and self._shared:
            # Half-made or half-destroyed clones no pool holds (a step whose API calls gave up
            # and whose clone was forgotten): nobody can claim them, so the leader ends them.
            for r in listed.values():
                status = r.meta.get(m.STATUS)
                if (
                    r.kind is Kind.CLONE
                    and r.name not in self._clones
                    and r.name not in dropped
                    and status in (CloneState.PROVISIONING.value, CloneState.DESTROYING.value)
                    and r.meta.get(m.ROLE) != m.ROLE_VERIFY
                ):
                    self._spawn("destroy", self._destroy_listed_clone, r, f"left {status}")
        self._dispatch()

    def _merge_lease_meta(self, lease: _Lease, meta: Mapping[str, str], *, take_ttl: bool) -> None:
        """Take another replica's writes: a later idle deadline, and (``take_ttl``) its TTL."""
        ttl = m.parse_float(meta, m.LEASE_TTL)
        if take_ttl and ttl:
            lease.ttl = ttl
        idle = m.parse_float(meta, m.LEASE_IDLE_DEADLINE)
        if idle is not None:
            theirs = self._from_wall(idle)
            lease.idle_deadline = max(lease.idle_deadline, theirs)
            lease.persisted_idle = max(lease.persisted_idle, theirs)
        lease.resets = max(lease.resets, m.parse_int(meta, m.LEASE_RESETS))

    def _drop_lease(self, lease: _Lease, why: str) -> None:
        """Forget a lease another replica ended (that replica logged and counted its end)."""
        if self._leases.get(lease.id) is lease:
            del self._leases[lease.id]
        self._dirty.discard(lease.id)
        self._dead_leases.discard(lease.id)
        if lease.state in ACTIVE_LEASE_STATES:
            lease.state = lease_transition(lease.id, lease.state, LeaseEvent.RELEASE)
        self._forget_clone(lease.clone)
        log.info("lease.forgotten", lease_id=lease.id, clone=lease.clone.name, why=why)

    async def _take_over(self) -> None:
        """Become leader: merge the provider's state, then clean what a former leader left."""
        async with self._view_lock:
            writes = {name: clone.writes for name, clone in self._clones.items()}
            resources = await self._provider.list()
            self._merge(resources, writes)
        doomed: list[tuple[Kind, str, str]] = []
        nobodys: list[tuple[Resource, str]] = []
        for r in resources:
            if r.kind is Kind.VOLUME:
                doomed.append((r.kind, r.name, "half-made restore"))
            elif r.kind is Kind.SNAPSHOT:
                snap = self._snapshots.get(r.name)
                if snap is None:
                    doomed.append(
                        (r.kind, r.name, f"snapshot with status {r.meta.get(m.STATUS)!r}")
                    )
                elif snap.state is SnapshotState.VERIFYING and snap not in self._to_verify:
                    self._to_verify.append(snap)
            elif r.name not in self._clones and r.name not in writes:
                # (A clone this pool dropped while the listing ran is not "nobody's": the
                # merge skipped it for now, and it may hold another replica's lease.)
                status = r.meta.get(m.STATUS)
                if status == CloneState.LEASED.value and r.endpoint is None:
                    log.warning("lease.lost", lease_id=r.meta.get(m.LEASE_ID), clone=r.name)
                nobodys.append((r, f"clone with status {status!r} nobody holds"))
        for kind, name, why in doomed:
            log.info("adopt.destroying", kind=kind.value, name=name, why=why)
            await self._destroy_quietly(kind, name)
        for r, why in nobodys:
            await self._destroy_listed_clone(r, why)

    async def _destroy_listed_clone(self, r: Resource, why: str) -> None:
        """Destroy a clone nobody holds, as listed: ``destroying`` by compare-and-set first.

        Between the listing and the destroy, a write of a former leader still in
        flight may publish it and another replica may claim it: then the
        compare-and-set fails and the clone (now a lease) is left alone.
        """
        meta = {**r.meta, m.STATUS: CloneState.DESTROYING.value}
        try:
            await self._provider.set_meta(Kind.CLONE, r.name, meta, expect_version=r.version)
        except NotFoundError:
            return
        except ConflictError:
            log.info("adopt.spared", clone=r.name, why="changed since it was listed")
            return
        except ProviderError as exc:
            log.warning("destroy_failed", kind=Kind.CLONE.value, name=r.name, error=str(exc))
            self._report_error("destroy", exc)
            return
        log.info("adopt.destroying", kind=Kind.CLONE.value, name=r.name, why=why)
        await self._destroy_quietly(Kind.CLONE, r.name)

    def _step_down(self) -> None:
        """Leadership ended: forget leader-only work in flight; the next leader cleans it up."""
        self._to_verify.clear()
        self._pipeline_snapshot = None
        self._restore = None
        for name, snap in list(self._snapshots.items()):
            if snap.state is SnapshotState.RESTORING:
                del self._snapshots[name]
        for name, clone in list(self._clones.items()):
            if clone.state is CloneState.PROVISIONING:
                del self._clones[name]
        log.info("pool.stepped_down", warm=len(self._warm), leases=len(self._leases))

    def _snapshot_from(self, r: Resource, state: SnapshotState) -> _Snapshot:
        return _Snapshot(
            name=r.name,
            state=state,
            backup_key=r.meta.get(m.BACKUP_KEY, ""),
            backup_etag=r.meta.get(m.BACKUP_ETAG, ""),
            created_wall=m.parse_float(r.meta, m.CREATED) or self._wall(),
            meta=dict(r.meta),
            version=r.version,
            ready_wall=m.parse_float(r.meta, m.READY_AT),
            reason=r.meta.get(m.REASON),
        )

    # -- helpers ---------------------------------------------------------------------------

    def _newest_ready(self) -> _Snapshot | None:
        ready = [s for s in self._snapshots.values() if s.state is SnapshotState.READY]
        return max(ready, key=lambda s: s.created_wall) if ready else None

    def _wall(self) -> float:
        return self._wall_clock()

    def _to_wall(self, trio_time: float) -> float:
        return self._wall() + (trio_time - trio.current_time())

    def _from_wall(self, wall: float) -> float:
        return trio.current_time() + (wall - self._wall())

    def _public_lease(self, lease: _Lease, *, secret: str | None = None) -> Lease:
        endpoint = lease.clone.endpoint
        assert endpoint is not None, lease.clone
        return Lease(
            id=lease.id,
            secret=secret,
            endpoint=endpoint,
            clone=lease.clone.name,
            snapshot=lease.clone.snapshot,
            ttl=lease.ttl,
            labels=dict(lease.labels),
            created_at=lease.created_wall,
            expires_at=self._to_wall(lease.lifetime_deadline),
            idle_deadline=None if lease.attached else self._to_wall(lease.idle_deadline),
            attached=lease.attached,
            resets=lease.resets,
        )

    def _lease_info(self, lease: _Lease) -> LeaseInfo:
        return LeaseInfo(
            id=lease.id,
            clone=lease.clone.name,
            snapshot=lease.clone.snapshot,
            state=lease.state.value,
            attached=lease.attached,
            ttl=lease.ttl,
            labels=dict(lease.labels),
            created_at=lease.created_wall,
            expires_at=self._to_wall(lease.lifetime_deadline),
            idle_deadline=None if lease.attached else self._to_wall(lease.idle_deadline),
            resets=lease.resets,
            healthy=lease.id not in self._dead_leases,
        )

    def _emit(self, event: PoolEvent) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                log.exception("pool.observer_failed", event_type=type(event).__name__)

    def _report_error(self, component: str, exc: BaseException) -> None:
        self._emit(PoolErrorEvent(component=component, message=str(exc)))

    @staticmethod
    def _wake(*events: trio.Event) -> None:
        for event in events:
            event.set()

    def _spawn(self, component: str, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in the background; ``component`` labels its errors (metrics)."""
        assert self._nursery is not None, "the pool is not running; start Pool.run() first"
        self._nursery.start_soon(self._guarded, component, fn, *args)

    async def _guarded(
        self, component: str, fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        """Run one background step; a provider failure is logged and counted, never fatal.

        Steps about one clone bind ``clone`` and ``snapshot`` for every log line
        inside them (the provider's included).
        """
        bound: dict[str, str] = {}
        if args and isinstance(args[0], _Clone):
            bound = {"clone": args[0].name, "snapshot": args[0].snapshot}
        try:
            with structlog.contextvars.bound_contextvars(**bound):
                await fn(*args)
        except ProviderError as exc:
            log.warning("pool.step_failed", component=component, error=str(exc))
            self._report_error(component, exc)
        except Exception as exc:
            # A bug or an error the provider did not wrap: keep the pool serving, but loudly.
            log.exception("pool.step_crashed", component=component)
            self._emit(
                PoolErrorEvent(
                    component=component, message=f"unexpected {type(exc).__name__}: {exc}"
                )
            )


_SNAPSHOT_STATES = {
    s.value: s for s in (SnapshotState.READY, SnapshotState.FAILED, SnapshotState.VERIFYING)
}


def _generation(r: Resource) -> int:
    return m.parse_int(r.meta, m.LEASE_GENERATION)


def _holds(r: Resource, lease: _Lease) -> bool:
    """Whether clone resource ``r`` still carries ``lease`` at its current generation."""
    return (
        r.meta.get(m.STATUS) == CloneState.LEASED.value
        and r.meta.get(m.LEASE_ID) == lease.id
        and _generation(r) == lease.generation
    )


def _checked_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidRequestError(
            f"labels must be a mapping of strings to strings, not {type(labels).__name__}."
        )
    if len(labels) > _MAX_LABELS:
        raise InvalidRequestError(f"{len(labels)} labels is too many; pass at most {_MAX_LABELS}.")
    clean: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequestError(
                f"label {key!r}: {value!r} is not a string pair; labels map strings to strings."
            )
        if not key or len(key) > _MAX_LABEL_CHARS or len(value) > _MAX_LABEL_CHARS:
            raise InvalidRequestError(
                f"label {key[:40]!r} is empty or longer than {_MAX_LABEL_CHARS} characters; "
                "shorten it."
            )
        clean[key] = value
    return clean


def _log_progress(event: str, p: RestoreProgress) -> None:
    eta = p.eta_seconds
    log.info(
        event,
        done_mb=round(p.done_bytes / 1e6, 1),
        total_mb=round(p.total_bytes / 1e6, 1),
        mb_per_s=round(p.rate_bytes_per_second / 1e6, 2),
        eta_seconds=None if eta is None else round(eta, 1),
        elapsed_seconds=round(p.elapsed_seconds, 1),
    )
