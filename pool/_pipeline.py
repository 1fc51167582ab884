"""The snapshot pipeline: source poll → restore → verify → ready, and pruning of old
snapshots.
"""

from __future__ import annotations

import math

import attrs
import structlog
import trio

from . import _meta as m
from . import _warm
from ._lease import (
    RestoreFinished,
    RestoreStatus,
    SnapshotFailed,
    SnapshotReady,
    SourceHealth,
)
from ._provider import Backup, Kind, ProviderError, RestoreProgress, TemporaryProviderError
from ._shared import BACKOFF_MAX, CLEANUP_SECONDS, MIB, PoolState, SnapshotEntry
from ._states import (
    LIVE_CLONE_STATES,
    CloneState,
    SnapshotEvent,
    SnapshotState,
    snapshot_transition,
)

log = structlog.get_logger("aldaas.pool")

_PROGRESS_LOG_SECONDS = 5.0
_TEMPORARY_ATTEMPTS = 3
"""A backup whose pipeline fails temporarily this many times in a row is recorded as failed."""


async def source_loop(st: PoolState) -> None:
    while True:
        st.refresh_wakeup = trio.Event()
        pending, st.to_verify = st.to_verify, []
        for snap in pending:
            await st.guarded("pipeline", resume_verification, snap)
        await st.guarded("source", poll_once)
        next_poll = trio.current_time() + st.settings.source.poll_interval
        now = trio.current_time()
        retry_at = min((at for _, at in st.temporary.values() if at > now), default=math.inf)
        with trio.move_on_at(min(next_poll, retry_at)):
            await st.refresh_wakeup.wait()


async def poll_once(st: PoolState) -> None:
    health = st.source_health
    try:
        backups = await st.source.list_backups()
    except ProviderError as exc:
        st.source_health = attrs.evolve(
            health,
            description=st.source.description,
            last_error=str(exc)[: m.MAX_REASON_CHARS],
            last_error_at=st.wall(),
        )
        raise
    st.source_health = SourceHealth(
        description=st.source.description,
        last_success_at=st.wall(),
        backups_found=len(backups),
    )
    if not backups:
        log.info("source.empty", source=st.source.description)
        return
    newest = max(backups, key=lambda b: (b.modified, b.key))
    for snap in st.snapshots.values():
        if snap.backup_key == newest.key and snap.backup_etag == newest.etag:
            return
    restored = st.restored_etags | {s.backup_etag for s in st.snapshots.values()}
    if newest.etag and newest.etag in restored:
        # The same content as a backup restored before, now newest only by its date: an old
        # dump re-uploaded or mirrored. Restoring it would roll back.
        log.info("source.reuploaded_backup", backup_key=newest.key, backup_etag=newest.etag)
        return
    known = [m.parse_float(s.meta, m.BACKUP_MODIFIED) or 0.0 for s in st.snapshots.values()]
    if known and newest.modified < max(known):
        # The newer backup was deleted from the source: never roll back to older data.
        log.info("source.only_older_backups", backup_key=newest.key)
        return
    # Back-off state is only kept for the backup that is newest now.
    st.temporary = {k: v for k, v in st.temporary.items() if k == (newest.key, newest.etag)}
    _, retry_at = st.temporary.get((newest.key, newest.etag), (0, 0.0))
    if trio.current_time() < retry_at:
        return  # backing off after a temporary failure
    await pipeline(st, newest)


async def pipeline(st: PoolState, backup: Backup) -> None:
    created = st.wall()
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
    snap = SnapshotEntry(
        name=name,
        state=SnapshotState.RESTORING,
        backup_key=backup.key,
        backup_etag=backup.etag,
        created_wall=created,
        meta=meta,
    )
    st.snapshots[name] = snap
    st.pipeline_snapshot = snap
    with structlog.contextvars.bound_contextvars(snapshot=name):
        log.info(
            "snapshot.restoring",
            backup_key=backup.key,
            backup_size=backup.size,
            source=st.source.description,
        )
        try:
            await restore_and_seal(st, snap, backup)
            await verify(st, snap)
            st.temporary.pop((backup.key, backup.etag), None)
        except TemporaryProviderError as exc:
            # Retried with exponential back-off; after a few failures in a row it is
            # recorded as failed with the reason (a new backup or ETag starts afresh).
            attempts = st.temporary.get((backup.key, backup.etag), (0, 0.0))[0] + 1
            st.report_error("pipeline", exc)
            if attempts >= _TEMPORARY_ATTEMPTS:
                st.temporary.pop((backup.key, backup.etag), None)
                await fail(st, snap, f"gave up after {attempts} attempts: {exc}")
            else:
                delay = min(BACKOFF_MAX, max(exc.delay, 1.0) * 2.0 ** (attempts - 1))
                st.temporary[(backup.key, backup.etag)] = (
                    attempts,
                    trio.current_time() + delay,
                )
                log.warning(
                    "snapshot.retry_later", error=str(exc), attempt=attempts, retry_in=delay
                )
                await clean_artefacts(st, snap)
                st.snapshots.pop(name, None)
        except ProviderError as exc:
            st.temporary.pop((backup.key, backup.etag), None)
            await fail(st, snap, str(exc))
        except Exception as exc:
            log.exception("snapshot.pipeline_crashed")
            await fail(st, snap, f"unexpected {type(exc).__name__} in the pipeline: {exc}")
        finally:
            st.pipeline_snapshot = None
            st.restore = None
            st.wake(st.prune_wakeup)


async def restore_and_seal(st: PoolState, snap: SnapshotEntry, backup: Backup) -> None:
    command = st.settings.restore_command(backup)
    await st.provider.create_volume(snap.name, snap.meta)
    started = trio.current_time()
    last_log = -math.inf
    latest = RestoreProgress(done_bytes=0, total_bytes=backup.size, elapsed_seconds=0.0)
    st.restore = RestoreStatus(
        snapshot=snap.name,
        backup_key=backup.key,
        progress=latest,
        started_at=started,
        bytes_at=started,
    )

    def on_progress(progress: RestoreProgress) -> None:
        nonlocal last_log, latest
        now = trio.current_time()
        grew = progress.done_bytes > latest.done_bytes
        latest = progress
        bytes_at = now if grew or st.restore is None else st.restore.bytes_at
        st.restore = RestoreStatus(
            snapshot=snap.name,
            backup_key=backup.key,
            progress=progress,
            started_at=started,
            bytes_at=bytes_at,
        )
        if now - last_log >= _PROGRESS_LOG_SECONDS:
            last_log = now
            log_progress("snapshot.restore_progress", progress)

    succeeded = False
    try:
        notes = await st.provider.restore(snap.name, backup, st.source, command, on_progress)
        snap.meta |= dict(notes or {})
        await transform(st, snap)
        succeeded = True
    finally:
        seconds = trio.current_time() - started
        st.emit(
            RestoreFinished(
                snapshot=snap.name,
                backup_key=backup.key,
                seconds=seconds,
                bytes=latest.done_bytes,
                succeeded=succeeded,
            )
        )
        if succeeded:
            log_progress("snapshot.restored", latest)
    snap.meta |= {
        m.STATUS: SnapshotState.VERIFYING.value,
        m.RESTORE_SECONDS: f"{seconds:.3f}",
        m.RESTORED_BYTES: str(latest.done_bytes),
    }
    resource = await st.provider.seal(snap.name, snap.name, snap.meta)
    snap.version = resource.version
    snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.SEALED)
    log.info("snapshot.sealed", size_bytes=resource.size_bytes)


async def transform(st: PoolState, snap: SnapshotEntry) -> None:
    """Run the masking step on the restored volume, if one is configured."""
    command = st.settings.transform_command()
    if command is None:
        return
    try:
        await st.provider.check(snap.name, command)
    except TemporaryProviderError:
        raise
    except ProviderError as exc:
        raise ProviderError(f"the masking step (transform) failed: {exc}") from None
    log.info("snapshot.transformed")


async def resume_verification(st: PoolState, snap: SnapshotEntry) -> None:
    st.pipeline_snapshot = snap
    with structlog.contextvars.bound_contextvars(snapshot=snap.name):
        log.info("snapshot.resuming_verification", backup_key=snap.backup_key)
        try:
            await verify(st, snap)
        except TemporaryProviderError as exc:
            # Leave it `verifying`: the next start (or the next poll, which sees its
            # backup as known) must not restore it again; retry verification later.
            st.report_error("pipeline", exc)
            st.to_verify.append(snap)
        except ProviderError as exc:
            await fail(st, snap, str(exc))
        finally:
            st.pipeline_snapshot = None


async def verify(st: PoolState, snap: SnapshotEntry) -> None:
    name = m.verify_clone_name()
    started = trio.current_time()
    meta = {
        m.STATUS: CloneState.PROVISIONING.value,
        m.ROLE: m.ROLE_VERIFY,
        m.SNAPSHOT: snap.name,
        m.CREATED: m.fmt_time(st.wall()),
    }
    try:
        await st.provider.clone(snap.name, name, meta)
        await st.provider.check(name, st.settings.check_command())
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_SECONDS):
            await _warm.destroy_quietly(st, Kind.CLONE, name)
    snap.meta |= {m.STATUS: SnapshotState.READY.value, m.READY_AT: m.fmt_time(st.wall())}
    resource = await st.provider.set_meta(
        Kind.SNAPSHOT, snap.name, snap.meta, expect_version=snap.version or None
    )
    snap.version = resource.version
    snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.VERIFIED)
    snap.ready_wall = st.wall()
    st.restored_etags.add(snap.backup_etag)
    st.emit(SnapshotReady(snapshot=snap.name, backup_key=snap.backup_key))
    log.info(
        "snapshot.ready",
        backup_key=snap.backup_key,
        verify_seconds=round(trio.current_time() - started, 3),
    )
    st.wake(st.keeper_wakeup, st.prune_wakeup)


async def fail(st: PoolState, snap: SnapshotEntry, reason: str) -> None:
    reason = reason[: m.MAX_REASON_CHARS]
    snap.reason = reason
    log.error("snapshot.failed", backup_key=snap.backup_key, reason=reason)
    await clean_artefacts(st, snap)
    snap.meta |= {
        m.STATUS: SnapshotState.FAILED.value,
        m.REASON: reason,
        m.FAILED_AT: m.fmt_time(st.wall()),
    }
    snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.FAILED)
    # After the state changed: whoever hears the event sees the snapshot as failed.
    st.emit(SnapshotFailed(snapshot=snap.name, backup_key=snap.backup_key, reason=reason))
    try:
        resource = await st.provider.record_failed_snapshot(snap.name, snap.meta)
    except ProviderError as exc:
        # Without the record a restart would try this backup again; say so and go on.
        log.warning("snapshot.failure_not_recorded", error=str(exc))
        st.report_error("pipeline", exc)
        return
    snap.version = resource.version


async def clean_artefacts(st: PoolState, snap: SnapshotEntry) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_SECONDS):
        await _warm.destroy_quietly(st, Kind.VOLUME, snap.name)
        await _warm.destroy_quietly(st, Kind.SNAPSHOT, snap.name)


async def prune_loop(st: PoolState) -> None:
    while True:
        st.prune_wakeup = trio.Event()
        await st.guarded("prune", prune_once)
        with trio.move_on_after(st.settings.pool.health_check_interval):
            await st.prune_wakeup.wait()


def pinned_snapshots(st: PoolState) -> set[str]:
    pinned = {c.snapshot for c in st.clones.values() if c.state in LIVE_CLONE_STATES}
    pinned |= {lease.clone.snapshot for lease in st.leases.values()}
    if st.pipeline_snapshot is not None:
        pinned.add(st.pipeline_snapshot.name)
    return pinned


async def prune_once(st: PoolState) -> None:
    ready = sorted(
        (s for s in st.snapshots.values() if s.state is SnapshotState.READY),
        key=lambda s: s.created_wall,
        reverse=True,
    )
    pinned = pinned_snapshots(st)
    now_wall = st.wall()
    victims = [s for s in ready[st.settings.snapshots.keep :] if s.name not in pinned]
    for snap in st.snapshots.values():
        if snap.state is SnapshotState.FAILED and snap.name not in pinned:
            failed_at = m.parse_float(snap.meta, m.FAILED_AT) or snap.created_wall
            if now_wall - failed_at >= st.settings.snapshots.failed_grace:
                victims.append(snap)
    for snap in victims:
        if snap.name in pinned_snapshots(st):
            continue
        await st.provider.destroy(Kind.SNAPSHOT, snap.name)
        snap.state = snapshot_transition(snap.name, snap.state, SnapshotEvent.PRUNED)
        st.snapshots.pop(snap.name, None)
        log.info("snapshot.pruned", snapshot=snap.name, backup_key=snap.backup_key)


def log_progress(event: str, p: RestoreProgress) -> None:
    """Progress in the client's units: MiB (1024²) and MiB/s."""
    eta = p.eta_seconds
    log.info(
        event,
        done_mib=round(p.done_bytes / MIB, 1),
        total_mib=round(p.total_bytes / MIB, 1),
        mib_per_s=round(p.rate_bytes_per_second / MIB, 2),
        eta_seconds=None if eta is None else round(eta, 1),
        elapsed_seconds=round(p.elapsed_seconds, 1),
    )
