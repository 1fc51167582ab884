"""Handing out warm clones: acquire and reset, the FIFO queue, and claiming a clone by
compare-and-set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import structlog
import trio

from . import _adoption, _lease_life, _warm
from . import _meta as m
from ._eta import queue_etas
from ._lease import (
    InvalidRequestError,
    Lease,
    LeaseHandedOut,
    LeaseLimitError,
    LeaseRefused,
    LeaseReset,
    NoSnapshotReadyError,
    PoolDrainingError,
    QueueLeft,
    QueueProgress,
    QueueProgressCallback,
    QueueTimeoutError,
)
from ._provider import ConflictError, Kind, ProviderError
from ._shared import MIB, CloneEntry, LeaseEntry, Lost, PoolState, Waiter, restore_now
from ._states import (
    ACTIVE_LEASE_STATES,
    CloneEvent,
    CloneState,
    LeaseEvent,
    LeaseState,
    SnapshotState,
    clone_transition,
    lease_transition,
)

log = structlog.get_logger("aldaas.pool")

_MAX_LABELS = 32
_MAX_LABEL_CHARS = 256


async def acquire(
    st: PoolState,
    *,
    ttl: float | None = None,
    labels: Mapping[str, str] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - a queue timeout, not an I/O one
    on_progress: QueueProgressCallback | None = None,
) -> Lease:
    """Hand out a warm clone as a new lease, waiting in the FIFO queue if none is free.

    Raises :class:`NoSnapshotReadyError` when there is nothing to clone yet,
    :class:`QueueTimeoutError` after ``timeout`` seconds in the queue
    (default ``lease.queue_timeout``), :class:`PoolDrainingError` while draining,
    :class:`LeaseLimitError` while ``lease.max_active`` leases are active (at once, before
    taking a warm clone or queueing).
    """
    started = trio.current_time()
    ttl = _lease_life.checked_ttl(st, ttl)
    clean_labels = checked_labels(labels)
    if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
        raise InvalidRequestError(
            f"queue timeout {timeout!r} is not a finite number of seconds ≥ 0; pass e.g. 60."
        )
    try:
        check_can_hand_out(st)
    except NoSnapshotReadyError:
        if not st.shared:
            raise
        await _adoption.refresh_quietly(st)
        check_can_hand_out(st)
    if at_lease_limit(st) and st.shared:
        await _adoption.refresh_quietly(st)  # leases other replicas ended may be gone by now
    check_lease_limit(st)
    st.handing_out += 1
    try:
        deadline = started + (st.settings.lease.queue_timeout if timeout is None else timeout)
        lease, secret, clone, queued = await _hand_out_new(
            st, deadline, on_progress, ttl, clean_labels
        )
    finally:
        st.handing_out -= 1
    seconds = trio.current_time() - started
    st.emit(
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
    return _lease_life.public_lease(st, lease, secret=secret)


async def reset(
    st: PoolState,
    lease_id: str,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - a queue timeout, not an I/O one
    on_progress: QueueProgressCallback | None = None,
) -> Lease:
    """Swap the lease's clone for a fresh one of the newest snapshot; the lease id stays."""
    lease = await _lease_life.lookup(st, lease_id)
    check_can_hand_out(st)
    deadline = trio.current_time() + (
        st.settings.lease.queue_timeout if timeout is None else timeout
    )
    # Its holder is waiting for the reset: the idle TTL must not run out meanwhile
    # (in memory, like traffic; the claim persists the deadline the reset sets).
    lease.idle_deadline = max(lease.idle_deadline, deadline + lease.ttl)
    async with lease.lock:
        while True:
            _lease_life.active(st, lease_id)
            clone, _ = await obtain_clone(st, deadline, on_progress)
            if lease.state not in ACTIVE_LEASE_STATES:
                return_clone(st, clone)
                raise _lease_life.not_found(lease_id)
            old = lease.clone
            # The new clone's meta must carry the reset's idle deadline and count: a
            # restart adopts the lease from it (before, it kept the old, earlier deadline).
            undo = (lease.idle_deadline, lease.resets)
            lease.generation += 1
            lease.resets += 1
            lease.idle_deadline = trio.current_time() + lease.ttl
            try:
                await claim(st, clone, lease)
            except Lost:
                lease.generation -= 1
                lease.idle_deadline, lease.resets = undo
                continue
            if lease.state not in ACTIVE_LEASE_STATES:
                # Released while we were claiming: the new clone goes, too.
                clone.lease = None
                st.spawn("destroy", _warm.retire_clone, clone, "lease ended during reset")
                raise _lease_life.not_found(lease_id)
            break
        lease.state = lease_transition(lease.id, lease.state, LeaseEvent.RESET)
        st.dead_leases.discard(lease.id)
        old.lease = None
    st.emit(LeaseReset(lease_id=lease.id, old_clone=old.name, new_clone=clone.name))
    log.info(
        "lease.reset",
        lease_id=lease.id,
        old_clone=old.name,
        clone=clone.name,
        snapshot=clone.snapshot,
    )
    st.spawn("destroy", _warm.retire_clone, old, "lease reset")
    st.wake(st.lease_wakeup, st.keeper_wakeup)
    return _lease_life.public_lease(st, lease)


async def _hand_out_new(
    st: PoolState,
    deadline: float,
    on_progress: QueueProgressCallback | None,
    ttl: float,
    labels: dict[str, str],
) -> tuple[LeaseEntry, str, CloneEntry, float]:
    """A warm clone (queueing for one if needed) claimed as a new lease; the next one if
    another replica claimed it first."""
    while True:
        clone, queued = await obtain_clone(st, deadline, on_progress)
        try:
            lease, secret = await hand_out(st, clone, ttl, labels)
        except Lost:
            continue
        return lease, secret, clone, queued


def at_lease_limit(st: PoolState) -> bool:
    limit = st.settings.lease.max_active
    return limit is not None and len(st.leases) + st.handing_out >= limit


def check_lease_limit(st: PoolState) -> None:
    """Refuse a hand-out while ``lease.max_active`` leases are active or being handed out."""
    limit = st.settings.lease.max_active
    if limit is None or not at_lease_limit(st):
        return
    active = len(st.leases)
    starting = f" and {st.handing_out} being handed out" if st.handing_out else ""
    st.emit(LeaseRefused(active=active, limit=limit))
    log.info("lease.refused", active=active, handing_out=st.handing_out, limit=limit)
    leases = "lease" if active == 1 else "leases"
    raise LeaseLimitError(
        f"the pool already has {active} active {leases}{starting} (lease.max_active is {limit}); "
        "end one with `aldaas release` or wait until one expires, then retry."
    )


def drain(st: PoolState) -> None:
    """Stop handing out (queued acquires fail) and stop making clones; leases keep running."""
    if st.draining:
        return
    st.draining = True
    error = PoolDrainingError(
        "the pool is draining and hands out no new databases; use another broker."
    )
    while st.waiters:
        waiter = st.waiters.popleft()
        waiter.error = error
        waiter.event.set()
    log.info("pool.draining", leases=len(st.leases))


def check_can_hand_out(st: PoolState) -> None:
    if st.draining:
        raise PoolDrainingError(
            "the pool is draining and hands out no new databases; use another broker."
        )
    if st.newest_ready() is None and not st.warm:
        raise NoSnapshotReadyError(no_snapshot_message(st))


def no_snapshot_message(st: PoolState) -> str:
    failed = [s for s in st.snapshots.values() if s.state is SnapshotState.FAILED]
    if st.restore is not None:
        restore = restore_now(st.restore, trio.current_time())
        p = restore.progress
        done = f"{p.done_bytes / MIB:.1f} of {p.total_bytes / MIB:.1f} MiB"
        eta = f", about {p.eta_seconds:.0f} s left" if p.eta_seconds is not None else ""
        if restore.stalled_seconds:
            eta = f", stalled for {restore.stalled_seconds:.0f} s"
        return (
            f"no snapshot is ready yet: backup {st.restore.backup_key!r} is being "
            f"restored ({done}{eta}); retry when it is ready."
        )
    if st.pipeline_snapshot is not None or st.to_verify:
        return "no snapshot is ready yet: a restored backup is being verified; retry shortly."
    health = st.source_health
    if health.last_error is not None:
        seen = (
            f"last listed {max(0.0, st.wall() - health.last_success_at):.0f} s ago"
            if health.last_success_at is not None
            else "never listed"
        )
        return (
            f"no snapshot is ready yet: the backup source fails ({seen}): "
            f"{health.last_error.rstrip('.')}."
        )
    if failed:
        newest = max(failed, key=lambda s: s.created_wall)
        return (
            f"no snapshot is ready yet: the last restore of {newest.backup_key!r} failed "
            f"({newest.reason}); fix the backup and trigger a refresh."
        )
    if health.backups_found == 0:
        return (
            f"no snapshot is ready yet: there is no backup in {st.source.description}; "
            "put one there or fix the source's prefix and suffix."
        )
    return (
        f"no snapshot is ready yet: no backup has been restored from "
        f"{st.source.description}; put a backup there or trigger a refresh."
    )


async def obtain_clone(
    st: PoolState, deadline: float, on_progress: QueueProgressCallback | None
) -> tuple[CloneEntry, float]:
    """Reserve a warm clone (taking it out of the free list), queueing FIFO if none is free."""
    if not st.waiters:
        clone = take_warm(st)
        if clone is not None:
            return clone, 0.0
    check_can_hand_out(st)
    queued_at = trio.current_time()
    waiter = Waiter(on_progress=on_progress)
    st.waiters.append(waiter)
    report_positions(st)
    st.wake(st.keeper_wakeup, st.view_wakeup)
    outcome: Literal["served", "timeout", "cancelled", "draining"] = "cancelled"
    try:
        with trio.move_on_at(deadline):
            await waiter.event.wait()
        if st.shared and waiter.clone is None and waiter.error is None:
            # Another replica's leader may have made clones since the last look.
            await _adoption.refresh_quietly(st)
        if waiter.error is not None:
            outcome = "draining"
            raise waiter.error
        if waiter.clone is None:
            outcome = "timeout"
            position = st.waiters.index(waiter) + 1 if waiter in st.waiters else 1
            raise QueueTimeoutError(
                f"no database became free within {deadline - queued_at:.0f} s "
                f"(still number {position} of {len(st.waiters)} in the queue); "
                "retry later or ask the operator to raise pool.size."
            )
        outcome = "served"
        return waiter.clone, trio.current_time() - queued_at
    finally:
        if outcome != "served":
            abandon(st, waiter)
        st.emit(QueueLeft(seconds=trio.current_time() - queued_at, outcome=outcome))


def abandon(st: PoolState, waiter: Waiter) -> None:
    if waiter in st.waiters:
        st.waiters.remove(waiter)
        report_positions(st)
    if waiter.clone is not None:
        clone, waiter.clone = waiter.clone, None
        return_clone(st, clone)


def take_warm(st: PoolState) -> CloneEntry | None:
    """Reserve a free warm clone, preferring the newest ready snapshot; ``None`` if none.

    A clone the provider knows to be dead (:class:`Liveness`) is broken and
    replaced instead of handed out: its database may have died since the last
    health check.
    """
    newest = st.newest_ready()
    while st.warm:
        chosen = None
        for clone in st.warm.values():
            if newest is not None and clone.snapshot == newest.name:
                chosen = clone
                break
            if chosen is None:
                chosen = clone
        assert chosen is not None
        if not is_alive(st, chosen):
            log.warning("clone.dead_at_hand_out", clone=chosen.name, snapshot=chosen.snapshot)
            _warm.break_clone(st, chosen, "its database was found dead at hand-out")
            continue
        del st.warm[chosen.name]
        st.wake(st.keeper_wakeup)
        return chosen
    return None


def is_alive(st: PoolState, clone: CloneEntry) -> bool:
    if st.alive is None:
        return True
    try:
        return st.alive(clone.name)
    except Exception:  # a liveness probe must never stop a hand-out
        log.exception("clone.liveness_check_failed", clone=clone.name)
        return True


def return_clone(st: PoolState, clone: CloneEntry) -> None:
    """Put a reserved, never-claimed clone back (front of the free list)."""
    if clone.state is CloneState.WARM and clone.name in st.clones:
        st.warm = {clone.name: clone, **st.warm}
        dispatch(st)


def dispatch(st: PoolState) -> None:
    """Give free warm clones to queued acquirers, first come first served."""
    served = False
    while st.waiters and st.warm:
        clone = take_warm(st)
        assert clone is not None
        waiter = st.waiters.popleft()
        waiter.clone = clone
        waiter.event.set()
        served = True
    if served:
        report_positions(st)


def report_positions(st: PoolState) -> None:
    length = len(st.waiters)
    etas = queue_etas(
        waiting=length,
        now=trio.current_time(),
        per_clone=st.provision_seconds,
        started=[
            c.provision_started
            for c in st.clones.values()
            if c.state is CloneState.PROVISIONING and c.provision_started is not None
        ],
        slots=st.settings.pool.max_provisioning,
    )
    for index, waiter in enumerate(st.waiters):
        position = index + 1
        if waiter.on_progress is None or position == waiter.last_position:
            continue
        waiter.last_position = position
        eta = etas[index]
        try:
            waiter.on_progress(
                QueueProgress(position=position, queue_length=length, eta_seconds=eta)
            )
        except Exception:
            log.exception("queue.progress_callback_failed")


async def hand_out(
    st: PoolState, clone: CloneEntry, ttl: float, labels: dict[str, str]
) -> tuple[LeaseEntry, str]:
    """Turn a reserved warm clone into a new lease (one compare-and-set of its meta)."""
    now = trio.current_time()
    secret = m.new_secret()
    lease = LeaseEntry(
        id=m.lease_id(),
        secret_hash=m.secret_hash(secret),
        ttl=ttl,
        labels=labels,
        state=LeaseState.IDLE,
        clone=clone,
        created_wall=st.wall(),
        lifetime_deadline=now + st.settings.lease.max_lifetime,
        idle_deadline=now + ttl,
        started=now,
    )
    await claim(st, clone, lease)
    st.leases[lease.id] = lease
    st.wake(st.lease_wakeup)
    return lease, secret


async def claim(st: PoolState, clone: CloneEntry, lease: LeaseEntry) -> None:
    """Persist ``clone`` as leased to ``lease`` (compare-and-set); raise :class:`Lost` if not."""
    assert clone.state is CloneState.WARM, clone
    assert clone.lease is None, clone
    meta = _lease_life.clone_meta(st, clone, CloneState.LEASED, lease)
    clone.writes += 1
    try:
        async with clone.lock:
            resource = await st.provider.set_meta(
                Kind.CLONE, clone.name, meta, expect_version=clone.version
            )
    except ConflictError as exc:
        # Another broker replica claimed it first: the clone is now ITS lease. Forget
        # it here (never destroy it) and let the caller try the next warm clone.
        log.info("clone.claim_lost", clone=clone.name, error=str(exc))
        st.forget_clone(clone)
        raise Lost from exc
    except ProviderError as exc:
        log.warning("clone.claim_failed", clone=clone.name, error=str(exc))
        st.report_error("lease", exc)
        _warm.break_clone(st, clone, f"claiming it failed: {exc}", lease.id)
        raise Lost from exc
    except BaseException:
        # Cancelled mid-write: we cannot know whether the write landed, so the
        # clone must never be offered again (a clone is handed out at most once).
        _warm.break_clone(st, clone, "a hand-out was cancelled while claiming it", lease.id)
        raise
    clone.version = resource.version
    lease.persisted_idle = st.from_wall(float(meta[m.LEASE_IDLE_DEADLINE]))
    clone.state = clone_transition(clone.name, clone.state, CloneEvent.HANDED_OUT)
    clone.lease = lease
    lease.clone = clone


def checked_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
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
