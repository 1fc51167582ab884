"""The warm clones: the keeper that makes ``pool.size`` of them, their health checks, and retiring
and destroying clones.
"""

from __future__ import annotations

import math

import structlog
import trio

from . import _handout, _lease_life
from . import _meta as m
from ._lease import CloneFailed, CloneProvisioned
from ._provider import ConflictError, Kind, NotFoundError, ProviderError, TemporaryProviderError
from ._shared import BACKOFF_MAX, CloneEntry, LeaseEntry, PoolState, SnapshotEntry
from ._states import CloneEvent, CloneState, clone_transition

log = structlog.get_logger("aldaas.pool")

RESTART_RETRY_SECONDS = 10.0
"""After a failed restart of a leased clone's database, wait this long before the next one."""


async def keeper_loop(st: PoolState) -> None:
    while True:
        st.keeper_wakeup = trio.Event()
        keep(st)
        wake_at = math.inf
        if st.provision_not_before > trio.current_time():
            wake_at = st.provision_not_before
        with trio.move_on_at(wake_at):
            await st.keeper_wakeup.wait()


def keep(st: PoolState) -> None:
    """Start making clones of the newest ready snapshot; retire surplus older warm ones."""
    newest = st.newest_ready()
    if newest is None:
        return
    size = st.settings.pool.size
    provisioning = [c for c in st.clones.values() if c.state is CloneState.PROVISIONING]
    current = [c for c in st.warm.values() if c.snapshot == newest.name]
    current_making = [c for c in provisioning if c.snapshot == newest.name]
    if not st.draining and trio.current_time() >= st.provision_not_before:
        wanted = size + len(st.waiters) - len(current) - len(current_making)
        room = st.settings.pool.max_provisioning - len(provisioning)
        for _ in range(max(0, min(wanted, room))):
            start_provisioning(st, newest)
    # Roll-over: once clones of the newest snapshot are warm, older idle ones go.
    surplus = len(st.warm) - size if not st.waiters else 0
    for clone in [c for c in st.warm.values() if c.snapshot != newest.name][:surplus]:
        del st.warm[clone.name]
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
        log.info("clone.rolled_over", clone=clone.name, snapshot=clone.snapshot, to=newest.name)
        st.spawn("destroy", retire_published, clone, None)
    surplus = len(st.warm) - size if not st.waiters else 0
    if st.shared and surplus > 0 and not provisioning:
        # Replicas: a clone whose publishing or retiring failed is forgotten and comes
        # back through the view once the API answers, after a replacement was made.
        for clone in list(st.warm.values())[-surplus:]:
            del st.warm[clone.name]
            clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
            log.info("clone.surplus", clone=clone.name, snapshot=clone.snapshot, size=size)
            st.spawn("destroy", retire_published, clone, None)


def start_provisioning(st: PoolState, snapshot: SnapshotEntry) -> None:
    clone = CloneEntry(
        name=m.clone_name(),
        snapshot=snapshot.name,
        state=CloneState.PROVISIONING,
        created_wall=st.wall(),
        provision_started=trio.current_time(),
    )
    st.clones[clone.name] = clone
    assert st.lead_nursery is not None, "provisioning is leader work"
    st.lead_nursery.start_soon(st.guarded, "provision", provision, clone)


async def provision(st: PoolState, clone: CloneEntry) -> None:
    started = trio.current_time()
    published = False
    try:
        clone.endpoint = await st.provider.clone(
            clone.snapshot, clone.name, _lease_life.clone_meta(st, clone, CloneState.PROVISIONING)
        )
        warm = clone_transition(clone.name, clone.state, CloneEvent.PROVISIONED)
        clone.writes += 1
        made: str | None = None
        if st.shared:
            # Publish by compare-and-set over the version as made: once `warm` has
            # landed (even if its answer was lost), another replica may claim it, and
            # a blind retry of this write would hand that lease's clone out again.
            found = await st.find(Kind.CLONE, clone.name)
            if found is None:
                raise NotFoundError(f"clone {clone.name!r} vanished while being made.")
            made = found.version
        published = True  # from here on the `warm` meta may have landed, whatever we hear
        resource = await st.provider.set_meta(
            Kind.CLONE, clone.name, _lease_life.clone_meta(st, clone, warm), expect_version=made
        )
        clone.version = resource.version
        clone.state = warm
    except ProviderError as exc:
        st.provisioning_failures += 1
        delay = min(BACKOFF_MAX, 2.0 ** min(st.provisioning_failures, 6))
        if isinstance(exc, TemporaryProviderError):
            delay = max(delay, exc.delay)
        st.provision_not_before = trio.current_time() + delay
        log.warning(
            "clone.provision_failed",
            clone=clone.name,
            snapshot=clone.snapshot,
            error=str(exc),
            retry_in=delay,
        )
        st.report_error("provision", exc)
        # If the warm write landed but its answer was lost, another replica may have
        # claimed the clone already: retire it by compare-and-set, never blindly.
        break_clone(st, clone, str(exc), maybe_published=published)
        return
    seconds = trio.current_time() - started
    st.provisioning_failures = 0
    st.provision_seconds = (
        seconds if st.provision_seconds is None else 0.7 * st.provision_seconds + 0.3 * seconds
    )
    st.emit(CloneProvisioned(clone=clone.name, snapshot=clone.snapshot, seconds=seconds))
    log.info("clone.warm", clone=clone.name, snapshot=clone.snapshot, seconds=round(seconds, 3))
    st.warm[clone.name] = clone
    _handout.dispatch(st)
    st.wake(st.keeper_wakeup)


def break_clone(
    st: PoolState,
    clone: CloneEntry,
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
    published = clone.state is CloneState.WARM or (maybe_published and st.shared)
    st.warm.pop(clone.name, None)
    if clone.state in (CloneState.PROVISIONING, CloneState.WARM, CloneState.LEASED):
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.BROKE)
        st.emit(CloneFailed(clone=clone.name, snapshot=clone.snapshot, reason=reason))
    if clone.state is CloneState.BROKEN:
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
        if published:
            st.spawn("destroy", retire_published, clone, lease_id)
        else:
            st.spawn("destroy", destroy_clone, clone)
    st.wake(st.keeper_wakeup)


async def retire_published(st: PoolState, clone: CloneEntry, lease_id: str | None) -> None:
    """Write ``destroying`` over the warm version this pool saw, then destroy the clone.

    If the write conflicts, someone wrote the clone since: when that is a
    lease other than ``lease_id`` (another replica's hand-out), the clone is
    only forgotten here — never destroyed under a live lease.
    """
    assert clone.state is CloneState.DESTROYING, clone
    clone.writes += 1
    meta = _lease_life.clone_meta(st, clone, clone.state)
    try:
        async with clone.lock:
            try:
                await st.provider.set_meta(
                    Kind.CLONE, clone.name, meta, expect_version=clone.version
                )
            except ConflictError:
                fresh = await st.find(Kind.CLONE, clone.name)
                holder = None if fresh is None else fresh.meta.get(m.LEASE_ID)
                if fresh is None or (holder is not None and holder != lease_id):
                    log.info("clone.claimed_elsewhere", clone=clone.name)
                    st.forget_clone(clone)
                    return
                await st.provider.set_meta(
                    Kind.CLONE, clone.name, meta, expect_version=fresh.version
                )
    except NotFoundError:
        st.forget_clone(clone)
        return
    except ProviderError:
        if st.shared:
            # Unsure who holds it now: leave it rather than destroy a lease. Forget it,
            # so the next view refresh takes it back as what the cluster says it is.
            st.forget_clone(clone)
            raise
    await destroy_clone(st, clone)


async def retire_clone(st: PoolState, clone: CloneEntry, why: str) -> None:
    """Persist ``destroying`` (so a restart never revives it), then destroy it."""
    if clone.state in (CloneState.WARM, CloneState.LEASED, CloneState.PROVISIONING):
        clone.state = clone_transition(clone.name, clone.state, CloneEvent.RETIRED)
    st.warm.pop(clone.name, None)
    log.info("clone.retired", clone=clone.name, snapshot=clone.snapshot, why=why)
    await st.guarded("destroy", _lease_life.write_clone_meta, clone)
    await destroy_clone(st, clone)


async def destroy_clone(st: PoolState, clone: CloneEntry) -> None:
    assert clone.state is CloneState.DESTROYING, clone
    restarting = st.restarts.get(clone.name)
    if restarting is not None:  # else its new database could start after the destroy
        await restarting.wait()
    st.protected.discard(clone.name)
    st.restart_not_before.pop(clone.name, None)
    try:
        await st.provider.destroy(Kind.CLONE, clone.name)
    except ProviderError as exc:
        log.warning("clone.destroy_failed", clone=clone.name, error=str(exc))
        st.report_error("destroy", exc)
        st.doomed[(Kind.CLONE, clone.name)] = str(exc)
        return
    clone.state = clone_transition(clone.name, clone.state, CloneEvent.DESTROYED)
    st.clones.pop(clone.name, None)
    st.wake(st.prune_wakeup, st.keeper_wakeup)


async def health_loop(st: PoolState) -> None:
    while True:
        await trio.sleep(st.settings.pool.health_check_interval)
        for clone in list(st.warm.values()):
            try:
                healthy = await st.provider.is_healthy(clone.name)
            except ProviderError as exc:
                st.report_error("health", exc)
                continue
            if not healthy and st.warm.get(clone.name) is clone:
                log.warning("clone.unhealthy", clone=clone.name, snapshot=clone.snapshot)
                break_clone(st, clone, "its database stopped answering")
        await check_leased(st)
        await retry_doomed(st)


async def follower_health_loop(st: PoolState) -> None:
    """While not leading, still check the leases in view (reads only, destroys nothing).

    A lease's client may talk to any replica: its ``healthy`` flag must turn
    false there too, not only on the leader, whose health loop does this itself.
    """
    while True:
        await trio.sleep(st.settings.pool.health_check_interval)
        if not st.leading:
            await check_leased(st)


async def check_leased(st: PoolState) -> None:
    """Find leases whose database died: reported (statistics, log, event) until reset.

    On a leader whose provider keeps a clone's data when its database dies
    (:class:`~._provider.Restartable`), a dead lease's database is started
    again on the same data, and healthy leases are protected from drains.
    """
    restartable = st.restartable if st.leading else None
    held = {lease.clone.name for lease in st.leases.values()}
    st.protected &= held  # leases ended or moved on other replicas
    for name in st.restart_not_before.keys() - held:
        del st.restart_not_before[name]
    for lease in list(st.leases.values()):
        clone = lease.clone
        try:
            healthy = await st.provider.is_healthy(clone.name)
        except ProviderError as exc:
            st.report_error("health", exc)
            continue
        if st.leases.get(lease.id) is not lease or lease.clone is not clone:
            continue  # ended or reset meanwhile
        if healthy:
            st.dead_leases.discard(lease.id)
            if restartable is not None and clone.name not in st.protected:
                st.protected.add(clone.name)
                st.spawn("health", protect_clone, clone)
            if restartable is None or clone.endpoint is not None or clone.name in st.restarts:
                continue
            # Running, but its address unknown here (adopted while it was down): ask for it.
        elif lease.id not in st.dead_leases:
            st.dead_leases.add(lease.id)
            reason = "its database stopped answering during the lease; reset the lease"
            if restartable is not None:
                reason = "its database stopped during the lease; it is started again on its data"
            log.warning("lease.database_died", lease_id=lease.id, clone=clone.name)
            st.emit(CloneFailed(clone=clone.name, snapshot=clone.snapshot, reason=reason))
        if restartable is None:
            continue
        if not healthy:
            # Its pod may be gone, and pod IPs are reused: no new connection goes to the old one.
            clone.endpoint = None
        due = st.restart_not_before.get(clone.name, -math.inf) <= trio.current_time()
        if clone.name not in st.restarts and due:
            st.restarts[clone.name] = trio.Event()
            st.spawn("health", restart_database, lease)


async def restart_database(st: PoolState, lease: LeaseEntry) -> None:
    """Start a leased clone's database again on its own data; the lease keeps its id and secret."""
    clone = lease.clone
    restartable = st.restartable
    assert restartable is not None, st.provider
    done = st.restarts[clone.name]
    try:
        log.info("lease.database_restarting", lease_id=lease.id, clone=clone.name)
        endpoint = await restartable.restart(clone.name)
    except ProviderError:
        st.restart_not_before[clone.name] = trio.current_time() + RESTART_RETRY_SECONDS
        raise  # logged and counted by guarded(); the lease stays unhealthy until reset
    finally:
        del st.restarts[clone.name]
        done.set()
    st.restart_not_before.pop(clone.name, None)
    if st.leases.get(lease.id) is not lease or lease.clone is not clone:
        return  # ended or reset meanwhile: its clone is being destroyed, after this restart
    clone.endpoint = endpoint
    st.dead_leases.discard(lease.id)
    log.info("lease.database_restarted", lease_id=lease.id, clone=clone.name)


async def protect_clone(st: PoolState, clone: CloneEntry) -> None:
    restartable = st.restartable
    assert restartable is not None, st.provider
    try:
        await restartable.protect(clone.name)
    except ProviderError:
        st.protected.discard(clone.name)  # the next health check tries again
        raise


async def retry_doomed(st: PoolState) -> None:
    for (kind, name), _why in list(st.doomed.items()):
        try:
            await st.provider.destroy(kind, name)
        except ProviderError as exc:
            st.report_error("destroy", exc)
            continue
        del st.doomed[(kind, name)]
        if kind is Kind.CLONE:
            clone = st.clones.pop(name, None)
            if clone is not None and clone.state is CloneState.DESTROYING:
                clone.state = clone_transition(clone.name, clone.state, CloneEvent.DESTROYED)
        st.wake(st.prune_wakeup, st.keeper_wakeup)


async def destroy_quietly(st: PoolState, kind: Kind, name: str) -> None:
    try:
        await st.provider.destroy(kind, name)
    except ProviderError as exc:
        log.warning("destroy_failed", kind=kind.value, name=name, error=str(exc))
        st.report_error("destroy", exc)
        st.doomed[(kind, name)] = str(exc)
