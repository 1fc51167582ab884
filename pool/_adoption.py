"""Taking what the provider lists into this pool's view: adoption after a restart, the merge of
other replicas' work, and a leader's take-over and step-down.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable, Mapping

import structlog
import trio

from . import _handout, _lease_life, _warm
from . import _meta as m
from ._lease import LeaseEnded
from ._provider import ConflictError, Kind, NotFoundError, ProviderError, Resource
from ._shared import BACKOFF_MAX, CLEANUP_SECONDS, CloneEntry, LeaseEntry, PoolState, SnapshotEntry
from ._states import CloneState, LeaseState, SnapshotState

log = structlog.get_logger("aldaas.pool")

_SNAPSHOT_STATES = {
    s.value: s for s in (SnapshotState.READY, SnapshotState.FAILED, SnapshotState.VERIFYING)
}


async def refresh_view(st: PoolState) -> None:
    """Re-read the provider and merge what other replicas did (warm clones, leases, snapshots).

    A follower calls it by itself; call it when :meth:`verify_secret` or
    :meth:`lease` do not know an id that another replica may have handed out.
    """
    async with st.view_lock:
        writes = {name: clone.writes for name, clone in st.clones.items()}
        resources = await st.provider.list()
        merge(st, resources, writes)


async def adopt_with_retries(st: PoolState) -> None:
    """Adopt; while the provider cannot even list its resources, retry with backoff."""
    delay = 1.0
    while True:
        try:
            await adopt(st)
        except ProviderError as exc:
            log.error("pool.adopt_failed", error=str(exc), retry_in=delay)
            st.report_error("adopt", exc)
            await trio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)
        else:
            return


async def adopt(st: PoolState) -> None:
    resources = await st.provider.list()
    now = trio.current_time()
    now_wall = st.wall()
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
        snap = SnapshotEntry(
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
        st.snapshots[r.name] = snap
        if state is SnapshotState.VERIFYING:
            st.to_verify.append(snap)
    by_lease: dict[str, list[tuple[Resource, LeaseEntry]]] = collections.defaultdict(list)
    for r in resources:
        if r.kind is not Kind.CLONE:
            continue
        status = r.meta.get(m.STATUS)
        origin = st.snapshots.get(r.meta.get(m.SNAPSHOT, ""))
        if r.meta.get(m.ROLE) == m.ROLE_VERIFY:
            doomed.append((r.kind, r.name, "verify clone of an interrupted pipeline"))
        elif status == CloneState.WARM.value:
            if r.endpoint is None or origin is None or origin.state is not SnapshotState.READY:
                doomed.append((r.kind, r.name, "warm clone without a running database"))
                continue
            clone = adopted_clone(st, r, CloneState.WARM)
            st.warm[clone.name] = clone
        elif status == CloneState.LEASED.value:
            lease = adopted_lease(st, r, now)
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
        if resource.endpoint is None and st.restartable is None:
            doomed.append((resource.kind, resource.name, "leased clone is not running"))
            log.warning("lease.lost", lease_id=lease_id, clone=resource.name)
            st.emit(LeaseEnded(lease_id=lease_id, reason="lost", seconds=0.0))
            continue
        st.clones[lease.clone.name] = lease.clone
        st.leases[lease_id] = lease
    for kind, name, why in doomed:
        log.info("adopt.destroying", kind=kind.value, name=name, why=why)
        await _warm.destroy_quietly(st, kind, name)
    log.info(
        "pool.adopted",
        provider=st.provider.name,
        snapshots=len(st.snapshots),
        warm=len(st.warm),
        leases=len(st.leases),
        destroyed=len(doomed),
    )


def adopted_clone(st: PoolState, r: Resource, state: CloneState) -> CloneEntry:
    clone = CloneEntry(
        name=r.name,
        snapshot=r.meta.get(m.SNAPSHOT, ""),
        state=state,
        created_wall=m.parse_float(r.meta, m.CREATED) or st.wall(),
        endpoint=r.endpoint,
        version=r.version,
    )
    st.clones[clone.name] = clone
    return clone


def adopted_lease(st: PoolState, r: Resource, now: float) -> LeaseEntry | None:
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
    clone = CloneEntry(
        name=r.name,
        snapshot=meta.get(m.SNAPSHOT, ""),
        state=CloneState.LEASED,
        created_wall=m.parse_float(meta, m.CREATED) or st.wall(),
        endpoint=r.endpoint,
        version=r.version,
    )
    # Clients attached at the crash (or on another replica) were cut off by it or still
    # use it: give them a full TTL.
    attached = meta.get(m.LEASE_ATTACHED) == "1"
    idle_deadline = now + ttl if attached else st.from_wall(idle)
    lease = LeaseEntry(
        id=lease_id,
        secret_hash=secret_hash,
        ttl=ttl,
        labels=labels,
        state=LeaseState.IDLE,
        clone=clone,
        created_wall=m.parse_float(meta, m.LEASE_CREATED) or st.wall(),
        lifetime_deadline=st.from_wall(expires),
        idle_deadline=idle_deadline,
        started=now - max(0.0, st.wall() - (m.parse_float(meta, m.LEASE_CREATED) or 0.0)),
        generation=m.parse_int(meta, m.LEASE_GENERATION),
        resets=m.parse_int(meta, m.LEASE_RESETS),
        persisted_idle=st.from_wall(idle),
    )
    clone.lease = lease
    return lease


async def with_retries(
    st: PoolState, component: str, step: Callable[[PoolState], Awaitable[None]]
) -> None:
    """Run ``step(st)``; while the provider cannot even list its resources, retry with backoff."""
    delay = 1.0
    while True:
        try:
            await step(st)
        except ProviderError as exc:
            log.error("pool.list_failed", component=component, error=str(exc), retry_in=delay)
            st.report_error(component, exc)
            await trio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)
        else:
            return


async def view_loop(st: PoolState) -> None:
    while True:
        st.view_wakeup = trio.Event()
        with trio.move_on_after(st.settings.pool.refresh_interval):
            await st.view_wakeup.wait()
        await st.guarded("refresh", refresh_view)


async def refresh_quietly(st: PoolState) -> None:
    """Refresh the view before answering "no"; a provider failure only logs (bounded)."""
    with trio.move_on_after(CLEANUP_SECONDS):
        await st.guarded("refresh", refresh_view)


def merge(st: PoolState, resources: Iterable[Resource], writes: Mapping[str, int]) -> None:
    """Merge a listing into this pool's view (never destroys anything).

    ``writes`` holds each local clone's write count from before the listing:
    a clone this pool wrote (or made) meanwhile is newer here than listed.
    """
    now = trio.current_time()
    listed = {(r.kind, r.name): r for r in resources}
    # Clones this pool dropped while the listing ran (destroyed, forgotten): the listing
    # is older than that for them, and must not bring them back as warm or leased.
    dropped = writes.keys() - st.clones.keys()
    for r in listed.values():
        state = _SNAPSHOT_STATES.get(r.meta.get(m.STATUS, ""))
        if r.kind is not Kind.SNAPSHOT or state is None:
            continue
        snap = st.snapshots.get(r.name)
        finished_elsewhere = (
            snap is not None
            and snap.state is SnapshotState.VERIFYING
            and state is not SnapshotState.VERIFYING
            and snap is not st.pipeline_snapshot
        )
        if snap is None or finished_elsewhere:
            st.snapshots[r.name] = snapshot_from(st, r, state)
    if not st.leading:  # only a leader prunes, and it knows what it pruned
        for name, snap in list(st.snapshots.items()):
            gone = (Kind.SNAPSHOT, name) not in listed
            if gone and snap.state in (SnapshotState.READY, SnapshotState.FAILED):
                del st.snapshots[name]
    # Which clone holds each lease now: the highest generation (a reset moves it).
    holders: dict[str, Resource] = {}
    for r in listed.values():
        if r.kind is not Kind.CLONE or r.meta.get(m.STATUS) != CloneState.LEASED.value:
            continue
        lease_id = r.meta.get(m.LEASE_ID, "")
        known = holders.get(lease_id)
        if lease_id and (
            known is None or _lease_life.generation(r) > _lease_life.generation(known)
        ):
            holders[lease_id] = r
    for name, clone in list(st.clones.items()):
        if writes.get(name) != clone.writes or clone.lock.locked():
            continue  # written (or made) here since the listing began: ours is newer
        seen = listed.get((Kind.CLONE, name))
        if clone.state is CloneState.WARM and name in st.warm:
            still_warm = seen is not None and seen.meta.get(m.STATUS) == CloneState.WARM.value
            if still_warm and seen is not None and seen.endpoint:
                clone.version = seen.version
            elif still_warm and seen is not None and st.leading:
                # Its database is gone (pod evicted or deleted): forgetting it would leave
                # its volume behind for good, as nobody else destroys a clone still warm.
                clone.version = seen.version
                _warm.break_clone(st, clone, "its database is not running")
            else:
                st.forget_clone(clone)  # claimed or retired by another replica
        elif clone.state is CloneState.LEASED and clone.lease is not None:
            lease = clone.lease
            holder = holders.get(lease.id)
            if lease.lock.locked():
                continue
            if holder is None:
                _lease_life.drop_lease(st, lease, "it ended on another replica")
            elif holder.name == name:
                clone.version = holder.version
                if holder.endpoint is not None:
                    clone.endpoint = holder.endpoint  # its pod may have been started again
                elif st.restartable is not None and name not in st.restarts:
                    clone.endpoint = None  # its pod is gone, and pod IPs are reused
                _lease_life.merge_lease_meta(st, lease, holder.meta, take_ttl=True)
            elif _lease_life.generation(holder) > lease.generation and holder.endpoint is not None:
                # Reset on another replica: the lease moved to a fresh clone.
                st.forget_clone(clone)
                fresh = adopted_clone(st, holder, CloneState.LEASED)
                fresh.lease, lease.clone = lease, fresh
                lease.generation = _lease_life.generation(holder)
                _lease_life.merge_lease_meta(st, lease, holder.meta, take_ttl=True)
    for lease_id, r in holders.items():
        if lease_id in st.leases or r.name in st.clones:
            continue
        if r.endpoint is None and st.restartable is None:
            continue  # lost with its database (a restartable one's leader starts it again)
        if r.name in dropped:
            continue
        adopted = adopted_lease(st, r, now)
        if adopted is not None:
            st.clones[r.name] = adopted.clone
            st.leases[lease_id] = adopted
            st.wake(st.lease_wakeup)
    for r in listed.values():
        if r.kind is not Kind.CLONE or r.name in st.clones or r.endpoint is None:
            continue
        if r.name in dropped:
            continue
        origin = st.snapshots.get(r.meta.get(m.SNAPSHOT, ""))
        if (
            r.meta.get(m.STATUS) == CloneState.WARM.value
            and r.meta.get(m.ROLE) != m.ROLE_VERIFY
            and origin is not None
            and origin.state is SnapshotState.READY
        ):
            st.warm[r.name] = adopted_clone(st, r, CloneState.WARM)
            st.wake(st.keeper_wakeup)  # a leader may hold more warm than pool.size now
    if st.leading and st.shared:
        # Half-made or half-destroyed clones no pool holds (a step whose API calls gave up
        # and whose clone was forgotten): nobody can claim them, so the leader ends them.
        for r in listed.values():
            status = r.meta.get(m.STATUS)
            if (
                r.kind is not Kind.CLONE
                or r.name in st.clones
                or r.name in dropped
                or r.meta.get(m.ROLE) == m.ROLE_VERIFY
            ):
                continue
            if status in (CloneState.PROVISIONING.value, CloneState.DESTROYING.value):
                st.spawn("destroy", destroy_listed_clone, r, f"left {status}")
            elif status == CloneState.WARM.value and r.endpoint is None:
                # Another replica's warm clone whose database is gone: no health loop sees it.
                st.spawn(
                    "destroy", destroy_listed_clone, r, "warm clone without a running database"
                )
    _handout.dispatch(st)


async def take_over(st: PoolState) -> None:
    """Become leader: merge the provider's state, then clean what a former leader left."""
    async with st.view_lock:
        writes = {name: clone.writes for name, clone in st.clones.items()}
        resources = await st.provider.list()
        merge(st, resources, writes)
    doomed: list[tuple[Kind, str, str]] = []
    nobodys: list[tuple[Resource, str]] = []
    for r in resources:
        if r.kind is Kind.VOLUME:
            doomed.append((r.kind, r.name, "half-made restore"))
        elif r.kind is Kind.SNAPSHOT:
            snap = st.snapshots.get(r.name)
            if snap is None:
                doomed.append((r.kind, r.name, f"snapshot with status {r.meta.get(m.STATUS)!r}"))
            elif snap.state is SnapshotState.VERIFYING and snap not in st.to_verify:
                st.to_verify.append(snap)
        elif r.name not in st.clones and r.name not in writes:
            # (A clone this pool dropped while the listing ran is not "nobody's": the
            # merge skipped it for now, and it may hold another replica's lease.)
            status = r.meta.get(m.STATUS)
            if status == CloneState.LEASED.value and r.endpoint is None:
                log.warning("lease.lost", lease_id=r.meta.get(m.LEASE_ID), clone=r.name)
            nobodys.append((r, f"clone with status {status!r} nobody holds"))
    for kind, name, why in doomed:
        log.info("adopt.destroying", kind=kind.value, name=name, why=why)
        await _warm.destroy_quietly(st, kind, name)
    for r, why in nobodys:
        await destroy_listed_clone(st, r, why)


async def destroy_listed_clone(st: PoolState, r: Resource, why: str) -> None:
    """Destroy a clone nobody holds, as listed: ``destroying`` by compare-and-set first.

    Between the listing and the destroy, a write of a former leader still in
    flight may publish it and another replica may claim it: then the
    compare-and-set fails and the clone (now a lease) is left alone.
    """
    meta = {**r.meta, m.STATUS: CloneState.DESTROYING.value}
    try:
        await st.provider.set_meta(Kind.CLONE, r.name, meta, expect_version=r.version)
    except NotFoundError:
        return
    except ConflictError:
        log.info("adopt.spared", clone=r.name, why="changed since it was listed")
        return
    except ProviderError as exc:
        log.warning("destroy_failed", kind=Kind.CLONE.value, name=r.name, error=str(exc))
        st.report_error("destroy", exc)
        return
    log.info("adopt.destroying", kind=Kind.CLONE.value, name=r.name, why=why)
    await _warm.destroy_quietly(st, Kind.CLONE, r.name)


def step_down(st: PoolState) -> None:
    """Leadership ended: forget leader-only work in flight; the next leader cleans it up."""
    st.to_verify.clear()
    st.protected.clear()  # a later term protects again what may have changed meanwhile
    st.pipeline_snapshot = None
    st.restore = None
    for name, snap in list(st.snapshots.items()):
        if snap.state is SnapshotState.RESTORING:
            del st.snapshots[name]
    for name, clone in list(st.clones.items()):
        if clone.state is CloneState.PROVISIONING:
            del st.clones[name]
    log.info("pool.stepped_down", warm=len(st.warm), leases=len(st.leases))


def snapshot_from(st: PoolState, r: Resource, state: SnapshotState) -> SnapshotEntry:
    return SnapshotEntry(
        name=r.name,
        state=state,
        backup_key=r.meta.get(m.BACKUP_KEY, ""),
        backup_etag=r.meta.get(m.BACKUP_ETAG, ""),
        created_wall=m.parse_float(r.meta, m.CREATED) or st.wall(),
        meta=dict(r.meta),
        version=r.version,
        ready_wall=m.parse_float(r.meta, m.READY_AT),
        reason=r.meta.get(m.REASON),
    )
