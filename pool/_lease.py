"""What the pool hands out and reports: leases, queue progress, statistics, errors, events.

All value objects are frozen; secrets appear only in the :class:`Lease`
returned by :meth:`pool.Pool.acquire` (and never in its ``repr``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import attrs

from ._provider import Endpoint, RestoreProgress


class PoolError(Exception):
    """A pool request cannot be served; ``str()`` is one sentence saying what to do."""


class InvalidRequestError(PoolError, ValueError):
    """The caller passed a value the pool does not accept (a bad TTL, labels, timeout)."""


class NoSnapshotReadyError(PoolError):
    """No snapshot has been verified yet, so there is nothing to clone."""


class QueueTimeoutError(PoolError):
    """No clone became free within the caller's queue timeout."""


class PoolDrainingError(PoolError):
    """The pool is draining and hands out nothing new."""


class LeaseLimitError(PoolError):
    """``lease.max_active`` leases are active: a hand-out is refused until one ends."""


class LeaseNotFoundError(PoolError, KeyError):
    """No active lease has this id (unknown, released or expired)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@attrs.frozen(kw_only=True)
class Lease:
    """One database handed out to one holder."""

    id: str
    """Lease id: public, safe to log."""
    secret: str | None = attrs.field(default=None, repr=False)
    """The lease's secret; only set in the value :meth:`Pool.acquire` returns (stored as a hash)."""
    endpoint: Endpoint | None
    """Where the clone answers (host, port, user, database); ``None`` while its database is
    being started again after it died (a provider that keeps the data, e.g. Kubernetes)."""
    clone: str
    """Name of the clone currently behind the lease (changes on reset)."""
    snapshot: str
    """Name of the snapshot the clone was made from."""
    ttl: float
    """Idle TTL in seconds: how long the lease lives with nobody attached."""
    labels: Mapping[str, str] = attrs.field(factory=dict)
    """Caller-chosen labels (e.g. CI job, user), for status pages and logs."""
    created_at: float
    """Wall-clock epoch seconds when the lease was acquired."""
    expires_at: float
    """Wall-clock epoch seconds of the lease's maximum lifetime."""
    idle_deadline: float | None
    """Wall-clock epoch seconds when the idle TTL runs out; ``None`` while a client is attached."""
    attached: int = 0
    """Clients attached right now."""
    resets: int = 0
    """How many times the clone was swapped for a fresh one."""


@attrs.frozen(kw_only=True)
class QueueProgress:
    """Where a waiting acquire stands in the FIFO queue."""

    position: int
    """1 = next to get a clone."""
    queue_length: int
    eta_seconds: float | None
    """Rough estimate from recent provisioning times; ``None`` before any clone was made."""


QueueProgressCallback = Callable[[QueueProgress], None]


@attrs.frozen(kw_only=True)
class SnapshotInfo:
    """One snapshot as statistics report it."""

    name: str
    status: str
    """``restoring``, ``verifying``, ``ready`` or ``failed``."""
    backup_key: str
    backup_etag: str
    created_at: float
    """Wall-clock epoch seconds when its restore started."""
    ready_at: float | None
    age_seconds: float
    """Seconds since ``created_at``."""
    reason: str | None = None
    """Why it failed (one sentence), for failed snapshots."""
    database: str | None = None
    """The database its leases get, when the restore chose it (a pg_dumpall backup)."""
    tolerated: str | None = None
    """What the restore dropped or rewrote because every dump does it on a fresh cluster
    (``CREATE ROLE`` of an existing role, ...), ``; ``-separated; ``None`` when nothing.
    """


@attrs.frozen(kw_only=True)
class LeaseInfo:
    """One active lease as statistics report it (never its secret)."""

    id: str
    clone: str
    snapshot: str
    state: str
    """``idle`` or ``attached``."""
    attached: int
    ttl: float
    labels: Mapping[str, str]
    created_at: float
    expires_at: float
    idle_deadline: float | None
    resets: int
    healthy: bool = True
    """False once the health loop found the lease's database dead (``reset`` gives a fresh one)."""


@attrs.frozen(kw_only=True)
class RestoreStatus:
    """The restore in progress."""

    snapshot: str
    backup_key: str
    progress: RestoreProgress
    """As of the moment the statistics were taken: while no bytes arrive, the elapsed time
    still grows, so the rate falls and the ETA rises."""
    stalled_seconds: float = 0.0
    """Seconds since the last byte arrived, once that is at least 5 s; 0 while bytes flow."""
    started_at: float = 0.0
    """Trio time at which the restore started."""
    bytes_at: float = 0.0
    """Trio time at which ``progress.done_bytes`` last grew."""


@attrs.frozen(kw_only=True)
class SourceHealth:
    """How the last listings of the backup source went."""

    description: str = ""
    """Where backups come from, without secrets (``s3://bucket/prefix*.sql.gz at URL``)."""
    last_success_at: float | None = None
    """Wall-clock epoch seconds of the last listing that worked; ``None`` before the first."""
    last_error: str | None = None
    """Why the last listing failed (one sentence); ``None`` when it worked."""
    last_error_at: float | None = None
    backups_found: int | None = None
    """Backups the last successful listing found; ``None`` before the first."""


@attrs.frozen(kw_only=True)
class PoolStatistics:
    """One consistent moment of the pool, for metrics and status pages."""

    clones: Mapping[str, int]
    """Clones per state (every state of :class:`CloneState` except ``gone``, zeros included)."""
    queue_length: int
    leases_active: int
    leases: tuple[LeaseInfo, ...]
    snapshots: tuple[SnapshotInfo, ...]
    """Newest first."""
    snapshots_by_status: Mapping[str, int]
    newest_ready_snapshot: str | None
    snapshot_age_seconds: float | None
    """Age of the newest ready snapshot, ``None`` when none is ready."""
    restore: RestoreStatus | None
    draining: bool
    leases_max_active: int | None = None
    """``lease.max_active``: hand-outs are refused while that many leases are active."""
    source: SourceHealth = attrs.field(factory=SourceHealth)
    """The backup source's last listing: when it last worked, and its last error."""


# -- events for observers (metrics) ----------------------------------------------------------


@attrs.frozen(kw_only=True)
class LeaseHandedOut:
    """An acquire returned a lease."""

    lease_id: str
    clone: str
    snapshot: str
    seconds: float
    """From the acquire call to the lease being returned."""
    queued_seconds: float
    """Part of ``seconds`` spent in the queue (0 when a warm clone was free)."""


@attrs.frozen(kw_only=True)
class LeaseRefused:
    """An acquire was refused because ``lease.max_active`` leases were active."""

    active: int
    limit: int


@attrs.frozen(kw_only=True)
class QueueLeft:
    """An acquirer left the queue."""

    seconds: float
    outcome: Literal["served", "timeout", "cancelled", "draining"]


@attrs.frozen(kw_only=True)
class CloneProvisioned:
    """A clone was made and accepts connections."""

    clone: str
    snapshot: str
    seconds: float


@attrs.frozen(kw_only=True)
class CloneFailed:
    """Making a clone failed, or a warm one was found dead."""

    clone: str
    snapshot: str
    reason: str


@attrs.frozen(kw_only=True)
class RestoreFinished:
    """A restore step ended (successfully or not)."""

    snapshot: str
    backup_key: str
    seconds: float
    bytes: int
    succeeded: bool


@attrs.frozen(kw_only=True)
class SnapshotReady:
    """A snapshot was verified; new clones come from it."""

    snapshot: str
    backup_key: str


@attrs.frozen(kw_only=True)
class SnapshotFailed:
    """A snapshot failed; the previous ready one keeps serving."""

    snapshot: str
    backup_key: str
    reason: str


@attrs.frozen(kw_only=True)
class LeaseEnded:
    """A lease ended and its clone is being destroyed."""

    lease_id: str
    reason: Literal["released", "killed", "expired_idle", "expired_lifetime", "lost"]
    seconds: float
    """How long the lease lived."""


@attrs.frozen(kw_only=True)
class LeaseReset:
    """A lease's clone was swapped for a fresh one."""

    lease_id: str
    old_clone: str
    new_clone: str


@attrs.frozen(kw_only=True)
class PoolErrorEvent:
    """A background step failed (it is retried); for ``aldaas_errors_total{component}``."""

    component: str
    message: str


PoolEvent = (
    LeaseHandedOut
    | LeaseRefused
    | QueueLeft
    | CloneProvisioned
    | CloneFailed
    | RestoreFinished
    | SnapshotReady
    | SnapshotFailed
    | LeaseEnded
    | LeaseReset
    | PoolErrorEvent
)
Observer = Callable[[PoolEvent], None]
"""Called synchronously for every event; must not block. Exceptions are logged and ignored."""
