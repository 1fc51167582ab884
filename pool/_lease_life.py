"""A lease's life once handed out: its idle TTL and lifetime, and its attach state persisted in
its clone's meta for restarts and other replicas.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping

import structlog
import trio

from . import _adoption, _warm
from . import _meta as m
from ._lease import InvalidRequestError, Lease, LeaseEnded, LeaseInfo, LeaseNotFoundError
from ._provider import ConflictError, Kind, NotFoundError, Resource
from ._shared import CloneEntry, EndReason, LeaseEntry, PoolState
from ._states import (
    ACTIVE_LEASE_STATES,
    CloneEvent,
    CloneState,
    LeaseEvent,
    LeaseState,
    clone_transition,
    lease_transition,
)

log = structlog.get_logger("aldaas.pool")

_HEARTBEAT_RETRY_SECONDS = 1.0
_DUMMY_HASH = m.secret_hash("not a lease secret")


def verify_secret(st: PoolState, lease_id: str, secret: str) -> bool:
    """Whether ``secret`` is the active lease's secret; compares hashes in constant time."""
    lease = st.leases.get(lease_id)
    expected = lease.secret_hash if lease is not None else _DUMMY_HASH
    matches = hmac.compare_digest(m.secret_hash(secret), expected)
    return matches and lease is not None and lease.state in ACTIVE_LEASE_STATES


async def extend(st: PoolState, lease_id: str, *, ttl: float | None = None) -> Lease:
    """Restart the idle TTL (optionally with a new ``ttl``); the maximum lifetime stays."""
    lease = await lookup(st, lease_id)
    if ttl is not None:
        lease.ttl = checked_ttl(st, ttl)
    lease.idle_deadline = trio.current_time() + lease.ttl
    await write_clone_meta(st, lease.clone)
    lease = active(st, lease_id)  # still ours (another replica may have ended it)
    st.wake(st.lease_wakeup)
    log.info("lease.extended", lease_id=lease.id, clone=lease.clone.name, ttl=lease.ttl)
    return public_lease(st, lease)


def attached(st: PoolState, lease_id: str) -> None:
    """A client attached to the lease: its idle TTL pauses."""
    lease = active(st, lease_id)
    lease.attached += 1
    if lease.attached == 1:
        lease.state = lease_transition(lease.id, lease.state, LeaseEvent.ATTACH)
        mark_dirty(st, lease)


def detached(st: PoolState, lease_id: str) -> None:
    """A client detached; when none is left the idle TTL restarts from now."""
    lease = st.leases.get(lease_id)
    if lease is None or lease.attached == 0:
        return
    lease.attached -= 1
    if lease.attached == 0:
        lease.state = lease_transition(lease.id, lease.state, LeaseEvent.DETACH)
        lease.idle_deadline = trio.current_time() + lease.ttl
        mark_dirty(st, lease)


def traffic(st: PoolState, lease_id: str) -> None:
    """Bytes flowed for the lease: the idle TTL counts from now.

    Kept in memory; with several replicas it is also written (at most every
    ``ttl / 3``) so that the leader's TTL sees it.
    """
    lease = st.leases.get(lease_id)
    if lease is not None:
        lease.idle_deadline = max(lease.idle_deadline, trio.current_time() + lease.ttl)
        if st.shared and heartbeat_due(lease, trio.current_time()):
            mark_dirty(st, lease)  # so the leader's TTL sees this replica's traffic


def checked_ttl(st: PoolState, ttl: float | None) -> float:
    if ttl is None:
        return min(st.settings.lease.ttl, st.settings.lease.max_ttl)
    if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
        raise InvalidRequestError(
            f"lease TTL {ttl!r} is not a positive number of seconds; pass e.g. 300."
        )
    return float(min(ttl, st.settings.lease.max_ttl))


def active(st: PoolState, lease_id: str) -> LeaseEntry:
    lease = st.leases.get(lease_id)
    if lease is None or lease.state not in ACTIVE_LEASE_STATES:
        raise not_found(lease_id)
    return lease


def not_found(lease_id: str) -> LeaseNotFoundError:
    shown = lease_id if len(lease_id) <= 64 else lease_id[:64] + "…"
    return LeaseNotFoundError(
        f"no active lease has id {shown!r}; it was released, expired or never existed — "
        "acquire a new one."
    )


async def end_lease(st: PoolState, lease: LeaseEntry, event: LeaseEvent, reason: EndReason) -> None:
    clone = finish_lease(st, lease, event, reason)
    await after_lease(st, clone)


def finish_lease(
    st: PoolState, lease: LeaseEntry, event: LeaseEvent, reason: EndReason
) -> CloneEntry:
    """End the lease in memory (synchronously, so no second path can end it too)."""
    lease.state = lease_transition(lease.id, lease.state, event)
    st.leases.pop(lease.id, None)
    st.dirty.discard(lease.id)
    st.dead_leases.discard(lease.id)
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
    st.emit(LeaseEnded(lease_id=lease.id, reason=reason, seconds=seconds))
    st.wake(st.lease_wakeup)
    clone.lease = None
    if clone.state is CloneState.LEASED:
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
    return clone


async def after_lease(st: PoolState, clone: CloneEntry) -> None:
    # Persist the end before returning, so a restart cannot bring the lease back;
    # the destroy itself may take a while and runs in the background.
    if clone.state is CloneState.DESTROYING:
        await st.guarded("lease", write_clone_meta, clone)
        st.spawn("destroy", _warm.destroy_clone, clone)


async def ttl_loop(st: PoolState) -> None:
    while True:
        if st.shared and any(
            expiry_due(lease, trio.current_time()) for lease in st.leases.values()
        ):
            # Other replicas record attach state and activity in the meta: re-read
            # it before expiring anything.
            await _adoption.refresh_quietly(st)
        now = trio.current_time()
        next_deadline = math.inf
        for lease in list(st.leases.values()):
            if lease.state not in ACTIVE_LEASE_STATES:
                continue
            if now >= lease.lifetime_deadline:
                clone = finish_lease(st, lease, LeaseEvent.EXPIRE_LIFETIME, "expired_lifetime")
                st.spawn("lease", after_lease, clone)
                continue
            if lease.state is LeaseState.IDLE and now >= lease.idle_deadline:
                clone = finish_lease(st, lease, LeaseEvent.EXPIRE_IDLE, "expired_idle")
                st.spawn("lease", after_lease, clone)
                continue
            next_deadline = min(next_deadline, lease.lifetime_deadline)
            if lease.state is LeaseState.IDLE:
                next_deadline = min(next_deadline, lease.idle_deadline)
        st.lease_wakeup = trio.Event()
        with trio.move_on_at(next_deadline):
            await st.lease_wakeup.wait()


def expiry_due(lease: LeaseEntry, now: float) -> bool:
    if lease.state not in ACTIVE_LEASE_STATES:
        return False
    idle_due = lease.state is LeaseState.IDLE and now >= lease.idle_deadline
    return idle_due or now >= lease.lifetime_deadline


def mark_dirty(st: PoolState, lease: LeaseEntry) -> None:
    st.dirty.add(lease.id)
    st.wake(st.persist_wakeup, st.lease_wakeup)


def heartbeat_due(lease: LeaseEntry, now: float) -> bool:
    """Whether the idle deadline other replicas see lags this replica's by over ``ttl / 3``.

    While clients are attached here, the written deadline is kept at least
    ``2/3 ttl`` ahead, so the leader never expires a lease in use on a follower,
    and a crashed follower's leases expire within one TTL.
    """
    if lease.attached:
        return now >= lease.persisted_idle - 2 * lease.ttl / 3
    return lease.idle_deadline > lease.persisted_idle + lease.ttl / 3


async def persist_loop(st: PoolState) -> None:
    while True:
        wake_at = math.inf
        if st.shared:
            for held in st.leases.values():
                if held.attached:
                    wake_at = min(wake_at, held.persisted_idle - 2 * held.ttl / 3)
            # A failed write leaves the heartbeat due: retry, but not in a busy loop.
            wake_at = max(wake_at, trio.current_time() + _HEARTBEAT_RETRY_SECONDS)
        with trio.move_on_at(wake_at):
            await st.persist_wakeup.wait()
        st.persist_wakeup = trio.Event()
        if st.shared:
            now = trio.current_time()
            st.dirty |= {held.id for held in st.leases.values() if heartbeat_due(held, now)}
        while st.dirty:
            lease = st.leases.get(st.dirty.pop())
            if lease is not None:
                await st.guarded("lease", write_clone_meta, lease.clone)


def clone_meta(
    st: PoolState, clone: CloneEntry, state: CloneState, lease: LeaseEntry | None = None
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
            m.LEASE_EXPIRES_AT: m.fmt_time(st.to_wall(lease.lifetime_deadline)),
            m.LEASE_IDLE_DEADLINE: m.fmt_time(st.to_wall(idle)),
            m.LEASE_ATTACHED: "1" if lease.attached else "0",
            m.LEASE_GENERATION: str(lease.generation),
            m.LEASE_RESETS: str(lease.resets),
        }
    return meta


async def write_clone_meta(st: PoolState, clone: CloneEntry) -> None:
    """Write the clone's current state (and lease) to its meta, compare-and-set."""
    clone.writes += 1
    async with clone.lock:
        meta = clone_meta(st, clone, clone.state, clone.lease)
        try:
            resource = await st.provider.set_meta(
                Kind.CLONE, clone.name, meta, expect_version=clone.version
            )
        except NotFoundError:
            if not (st.shared and clone.lease is not None):
                raise
            drop_lease(st, clone.lease, "another replica ended it and destroyed its clone")
            return
        except ConflictError:
            # Someone changed it behind our back (another replica writing the same
            # lease): re-read it and write once more over its version.
            fresh = await st.find(Kind.CLONE, clone.name)
            lease = clone.lease
            if st.shared and lease is not None and (fresh is None or not holds(fresh, lease)):
                # Ended or reset on another replica: never bring it back.
                drop_lease(st, lease, "it ended or moved on another replica")
                return
            if fresh is None:
                raise
            if lease is not None:
                merge_lease_meta(st, lease, fresh.meta, take_ttl=False)
                meta = clone_meta(st, clone, clone.state, lease)
            resource = await st.provider.set_meta(
                Kind.CLONE, clone.name, meta, expect_version=fresh.version
            )
        clone.version = resource.version
        if clone.lease is not None and m.LEASE_IDLE_DEADLINE in meta:
            clone.lease.persisted_idle = st.from_wall(float(meta[m.LEASE_IDLE_DEADLINE]))


async def lookup(st: PoolState, lease_id: str) -> LeaseEntry:
    """The active lease; a follower that does not know it re-reads the provider first."""
    lease = st.leases.get(lease_id)
    if st.shared and (lease is None or lease.state not in ACTIVE_LEASE_STATES):
        await _adoption.refresh_quietly(st)
    return active(st, lease_id)


def merge_lease_meta(
    st: PoolState, lease: LeaseEntry, meta: Mapping[str, str], *, take_ttl: bool
) -> None:
    """Take another replica's writes: a later idle deadline, and (``take_ttl``) its TTL."""
    ttl = m.parse_float(meta, m.LEASE_TTL)
    if take_ttl and ttl:
        lease.ttl = ttl
    idle = m.parse_float(meta, m.LEASE_IDLE_DEADLINE)
    if idle is not None:
        theirs = st.from_wall(idle)
        lease.idle_deadline = max(lease.idle_deadline, theirs)
        lease.persisted_idle = max(lease.persisted_idle, theirs)
    lease.resets = max(lease.resets, m.parse_int(meta, m.LEASE_RESETS))


def drop_lease(st: PoolState, lease: LeaseEntry, why: str) -> None:
    """Forget a lease another replica ended (that replica logged and counted its end)."""
    if st.leases.get(lease.id) is lease:
        del st.leases[lease.id]
    st.dirty.discard(lease.id)
    st.dead_leases.discard(lease.id)
    if lease.state in ACTIVE_LEASE_STATES:
        lease.state = lease_transition(lease.id, lease.state, LeaseEvent.RELEASE)
    st.forget_clone(lease.clone)
    log.info("lease.forgotten", lease_id=lease.id, clone=lease.clone.name, why=why)


def public_lease(st: PoolState, lease: LeaseEntry, *, secret: str | None = None) -> Lease:
    return Lease(
        id=lease.id,
        secret=secret,
        endpoint=lease.clone.endpoint,
        clone=lease.clone.name,
        snapshot=lease.clone.snapshot,
        ttl=lease.ttl,
        labels=dict(lease.labels),
        created_at=lease.created_wall,
        expires_at=st.to_wall(lease.lifetime_deadline),
        idle_deadline=None if lease.attached else st.to_wall(lease.idle_deadline),
        attached=lease.attached,
        resets=lease.resets,
    )


def lease_info(st: PoolState, lease: LeaseEntry) -> LeaseInfo:
    return LeaseInfo(
        id=lease.id,
        clone=lease.clone.name,
        snapshot=lease.clone.snapshot,
        state=lease.state.value,
        attached=lease.attached,
        ttl=lease.ttl,
        labels=dict(lease.labels),
        created_at=lease.created_wall,
        expires_at=st.to_wall(lease.lifetime_deadline),
        idle_deadline=None if lease.attached else st.to_wall(lease.idle_deadline),
        resets=lease.resets,
        healthy=lease.id not in st.dead_leases,
    )


def generation(r: Resource) -> int:
    return m.parse_int(r.meta, m.LEASE_GENERATION)


def holds(r: Resource, lease: LeaseEntry) -> bool:
    """Whether clone resource ``r`` still carries ``lease`` at its current generation."""
    return (
        r.meta.get(m.STATUS) == CloneState.LEASED.value
        and r.meta.get(m.LEASE_ID) == lease.id
        and generation(r) == lease.generation
    )
