"""The :class:`Pool` facade: its public API, over one state shared by one module per concern.

The pool turns backups into verified snapshots, warm clones and leases.

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

import time
from collections.abc import Callable, Iterable, Mapping

import structlog
import trio

from . import _adoption, _handout, _lease_life, _pipeline, _warm
from ._lease import Lease, Observer, PoolStatistics, QueueProgressCallback, SnapshotInfo
from ._provider import Liveness, Provider, Source
from ._settings import PoolSettings
from ._shared import PoolState, restore_now
from ._states import CloneState, LeaseEvent, SnapshotState

log = structlog.get_logger("aldaas.pool")


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
        self._st = PoolState(
            settings=settings,
            provider=provider,
            source=source,
            wall_clock=wall_clock,
            observers=list(observers),
            alive=provider.alive if isinstance(provider, Liveness) else None,
        )
        self._running = False
        self._leading = False

    @property
    def settings(self) -> PoolSettings:
        return self._st.settings

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer`` with every :data:`PoolEvent`; returns a function that removes it."""
        self._st.observers.append(observer)
        return lambda: self._st.observers.remove(observer)

    # -- running: one replica, or several over one provider --------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt what the provider holds, then run the background loops until cancelled.

        ``task_status.started()`` is called once adoption is done, so acquires
        made after ``await nursery.start(pool.run)`` see every adopted lease.
        Cancelling leaves clones and leases running: the next pool adopts them.
        """
        if self._running:
            raise RuntimeError("Pool.run() is already running; a pool runs once at a time.")
        self._running = True
        st = self._st
        try:
            await _adoption.adopt_with_retries(st)
            async with trio.open_nursery() as nursery:
                st.nursery = st.lead_nursery = nursery
                self._start_leader_loops(nursery)
                nursery.start_soon(_lease_life.persist_loop, st)
                task_status.started()
        finally:
            st.nursery = st.lead_nursery = None
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
        st = self._st
        st.shared = True
        try:
            await _adoption.with_retries(st, "refresh", _adoption.refresh_view)
            async with trio.open_nursery() as nursery:
                st.nursery = nursery
                nursery.start_soon(_lease_life.persist_loop, st)
                nursery.start_soon(_adoption.view_loop, st)
                nursery.start_soon(_warm.follower_health_loop, st)
                task_status.started()
        finally:
            st.nursery = None
            self._running = False

    async def lead(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the background work while this replica leads; cancel it to step down.

        Needs :meth:`serve` running. Takes over first: merges the provider's
        current state, resumes an interrupted verification and destroys what a
        previous leader left half-made (volumes, provisioning or verify clones,
        unreadable leases); then runs the source/pipeline, keeper, health, TTL
        and prune loops. Pass it to ``LeaderElector.serve(pool.lead)``.
        """
        st = self._st
        if st.nursery is None or not st.shared:
            raise RuntimeError("Pool.lead() needs Pool.serve() running first.")
        if self._leading:
            raise RuntimeError("Pool.lead() is already running; a pool leads once at a time.")
        self._leading = True
        try:
            await _adoption.with_retries(st, "adopt", _adoption.take_over)
            async with trio.open_nursery() as nursery:
                st.lead_nursery = nursery
                self._start_leader_loops(nursery)
                log.info("pool.leading", warm=len(st.warm), leases=len(st.leases))
                task_status.started()
        finally:
            st.lead_nursery = None
            self._leading = False
            _adoption.step_down(st)

    @property
    def leading(self) -> bool:
        """Whether background work runs here (:meth:`run`, or :meth:`lead` running)."""
        return self._st.leading

    def _start_leader_loops(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(_pipeline.source_loop, self._st)
        nursery.start_soon(_warm.keeper_loop, self._st)
        nursery.start_soon(_warm.health_loop, self._st)
        nursery.start_soon(_lease_life.ttl_loop, self._st)
        nursery.start_soon(_pipeline.prune_loop, self._st)

    async def refresh_view(self) -> None:
        """Re-read the provider and merge what other replicas did (warm clones, leases, snapshots).

        A follower calls it by itself; call it when :meth:`verify_secret` or
        :meth:`lease` do not know an id that another replica may have handed out.
        """
        await _adoption.refresh_view(self._st)

    # -- hand-out ----------------------------------------------------------------------------

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
        return await _handout.acquire(
            self._st, ttl=ttl, labels=labels, timeout=timeout, on_progress=on_progress
        )

    async def reset(
        self,
        lease_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a queue timeout, not an I/O one
        on_progress: QueueProgressCallback | None = None,
    ) -> Lease:
        """Swap the lease's clone for a fresh one of the newest snapshot; the lease id stays."""
        return await _handout.reset(self._st, lease_id, timeout=timeout, on_progress=on_progress)

    def drain(self) -> None:
        """Stop handing out (queued acquires fail) and stop making clones; leases keep running."""
        _handout.drain(self._st)

    # -- leases ------------------------------------------------------------------------------

    def lease(self, lease_id: str) -> Lease:
        """The active lease ``lease_id`` (without its secret); raises :class:`LeaseNotFoundError`."""
        return _lease_life.public_lease(self._st, _lease_life.active(self._st, lease_id))

    def leases(self) -> tuple[Lease, ...]:
        """Every active lease (without secrets)."""
        return tuple(
            _lease_life.public_lease(self._st, lease) for lease in self._st.leases.values()
        )

    def verify_secret(self, lease_id: str, secret: str) -> bool:
        """Whether ``secret`` is the active lease's secret; compares hashes in constant time."""
        return _lease_life.verify_secret(self._st, lease_id, secret)

    async def release(self, lease_id: str) -> None:
        """End the lease now and destroy its clone."""
        lease = await _lease_life.lookup(self._st, lease_id)
        await _lease_life.end_lease(self._st, lease, LeaseEvent.RELEASE, "released")

    async def kill(self, lease_id: str) -> None:
        """End the lease now on an admin's request and destroy its clone."""
        lease = await _lease_life.lookup(self._st, lease_id)
        await _lease_life.end_lease(self._st, lease, LeaseEvent.RELEASE, "killed")

    async def extend(self, lease_id: str, *, ttl: float | None = None) -> Lease:
        """Restart the idle TTL (optionally with a new ``ttl``); the maximum lifetime stays."""
        return await _lease_life.extend(self._st, lease_id, ttl=ttl)

    def attached(self, lease_id: str) -> None:
        """A client attached to the lease: its idle TTL pauses."""
        _lease_life.attached(self._st, lease_id)

    def detached(self, lease_id: str) -> None:
        """A client detached; when none is left the idle TTL restarts from now."""
        _lease_life.detached(self._st, lease_id)

    def traffic(self, lease_id: str) -> None:
        """Bytes flowed for the lease: the idle TTL counts from now.

        Kept in memory; with several replicas it is also written (at most every
        ``ttl / 3``) so that the leader's TTL sees it.
        """
        _lease_life.traffic(self._st, lease_id)

    # -- snapshots and statistics ----------------------------------------------------------

    def trigger_refresh(self) -> None:
        """Look at the backup source now instead of at the next poll."""
        self._st.wake(self._st.refresh_wakeup)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of clones, queue, leases, snapshots and restore progress.

        Call it from the trio thread (it reads ``trio.current_time()``).
        """
        st = self._st
        now_wall = st.wall()
        clones = {s.value: 0 for s in CloneState if s is not CloneState.GONE}
        for clone in st.clones.values():
            if clone.state is not CloneState.GONE:
                clones[clone.state.value] += 1
        snapshots = sorted(st.snapshots.values(), key=lambda s: s.created_wall, reverse=True)
        by_status = {s.value: 0 for s in SnapshotState if s is not SnapshotState.PRUNED}
        for snap in snapshots:
            if snap.state is not SnapshotState.PRUNED:
                by_status[snap.state.value] += 1
        newest = st.newest_ready()
        return PoolStatistics(
            clones=clones,
            queue_length=len(st.waiters),
            leases_active=len(st.leases),
            leases_max_active=st.settings.lease.max_active,
            leases=tuple(_lease_life.lease_info(st, lease) for lease in st.leases.values()),
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
                    database=s.meta.get("restore_database"),
                    tolerated=s.meta.get("restore_tolerated"),
                )
                for s in snapshots
                if s.state is not SnapshotState.PRUNED
            ),
            snapshots_by_status=by_status,
            newest_ready_snapshot=newest.name if newest else None,
            snapshot_age_seconds=max(0.0, now_wall - newest.created_wall) if newest else None,
            restore=None if st.restore is None else restore_now(st.restore, trio.current_time()),
            draining=st.draining,
            source=st.source_health,
        )
