"""The two small interfaces the pool logic is written against.

A :class:`Provider` makes database volumes, seals them into immutable
snapshots, clones snapshots into running databases and destroys things. A
:class:`Source` lists backups and streams their bytes. The pool (pipeline,
warm pool, leases, TTL, pruning) only ever talks to these two; the local
provider (data folder + PostgreSQL processes) and the Kubernetes provider
(PVCs, VolumeSnapshots, pods) implement :class:`Provider`, the directory and
S3 sources implement :class:`Source`.

State lives with the resources: every volume, snapshot and clone carries a
flat ``meta`` mapping of strings (a JSON file in its folder locally, labels and
annotations on Kubernetes). The pool keeps no state that the provider does
not also hold, so a restarted broker rebuilds itself from ``list()``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs


class Kind(enum.Enum):
    """What a provider resource is."""

    VOLUME = "volume"
    """A writable database being restored into (not yet a snapshot)."""
    SNAPSHOT = "snapshot"
    """An immutable, sealed copy of a restored volume."""
    CLONE = "clone"
    """A running database made from a snapshot (warm, leased or verifying)."""


@attrs.frozen(kw_only=True)
class Endpoint:
    """Where a running database answers, and how to log in."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = attrs.field(default=None, repr=False)

    def environ(self) -> dict[str, str]:
        """The environment the restore and check commands see (as the original's values.yaml)."""
        env = {
            "ALDAAS_HOST_DAEMON": self.host,
            "ALDAAS_PORT_DAEMON": str(self.port),
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": self.database,
            "POSTGRES_USER": self.user,
            "POSTGRES_DB": self.database,
        }
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env


@attrs.frozen(kw_only=True)
class Resource:
    """One volume, snapshot or clone as the provider sees it now."""

    kind: Kind
    name: str
    meta: Mapping[str, str] = attrs.field(factory=dict)
    """Flat string metadata written by the pool (status, lease, deadlines, ...)."""
    version: str = ""
    """Opaque version of ``meta``; pass it back to :meth:`Provider.set_meta` for compare-and-set."""
    endpoint: Endpoint | None = None
    """Set for running databases (volumes being restored, clones)."""
    size_bytes: int | None = None
    """On-disk size where the provider knows it."""


@attrs.frozen(kw_only=True)
class Backup:
    """One backup object in a source, identified by key and content version."""

    key: str
    etag: str
    """ETag (S3) or a size+mtime digest (directory): changes when the content changes."""
    size: int
    modified: float
    """Wall-clock seconds since the epoch, for display and ordering only."""


@attrs.frozen(kw_only=True)
class RestoreProgress:
    """How far a streamed restore has got."""

    done_bytes: int
    total_bytes: int
    elapsed_seconds: float

    @property
    def rate_bytes_per_second(self) -> float:
        return self.done_bytes / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate_bytes_per_second
        if rate <= 0 or self.total_bytes <= 0:
            return None
        return max(0.0, (self.total_bytes - self.done_bytes) / rate)


@attrs.frozen(kw_only=True)
class Command:
    """A configurable restore or check step: argv, run without a shell unless argv says so.

    The database's address and credentials reach it through the environment
    (:meth:`Endpoint.environ`), and the backup through standard input for
    restores; values are never interpolated into a command string.
    """

    argv: Sequence[str]
    env: Mapping[str, str] = attrs.field(factory=dict)
    timeout_seconds: float = 3600.0
    builtin: bool = False
    """The default restore (``restore.argv`` unset): a provider with its own restore (the local
    one: every format by magic bytes, roles, no shell from the backup) uses it instead of argv.
    """


class ProviderError(Exception):
    """A provider step failed; ``str()`` is one sentence a user can act on."""


class TemporaryProviderError(ProviderError):
    """Worth retrying after ``delay`` seconds (API hiccup, 5xx, timeout)."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class ConflictError(ProviderError):
    """A compare-and-set on ``meta`` lost: someone else changed the resource first."""


class NotFoundError(ProviderError):
    """The named resource does not exist (any more)."""


ProgressCallback = Callable[[RestoreProgress], None]


class Source(Protocol):
    """Where backups come from (a directory, an S3 bucket)."""

    @property
    def description(self) -> str:
        """Human-readable location without secrets, e.g. ``s3://bucket/prefix``."""
        ...

    async def list_backups(self) -> Sequence[Backup]:
        """Every backup currently present, any order; raises :class:`ProviderError` if unreachable."""
        ...

    def open(self, backup: Backup) -> AsyncIterator[bytes]:
        """Stream a backup's bytes in chunks, never the whole object in memory."""
        ...


class Provider(Protocol):
    """Makes, seals, clones and destroys databases. Every method is idempotent where it can be."""

    @property
    def name(self) -> str:
        """``local`` or ``kubernetes``; used in logs and metrics."""
        ...

    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        """Make an empty writable database volume and start a database on it, ready for restore."""
        ...

    async def restore(
        self,
        name: str,
        backup: Backup,
        source: Source,
        command: Command,
        progress: ProgressCallback,
    ) -> Mapping[str, str] | None:
        """Run the restore command against volume ``name``'s database, streaming ``backup`` in.

        Returns meta to add to the snapshot (what the restore tolerated, the
        database leases get), or ``None``. Raises :class:`ProviderError`
        naming what failed (exit status, log tail).
        """
        ...

    async def seal(self, volume: str, snapshot: str, meta: Mapping[str, str]) -> Resource:
        """Stop the volume's database cleanly and turn the volume into immutable snapshot ``snapshot``.

        The volume no longer exists afterwards.
        """
        ...

    async def record_failed_snapshot(self, name: str, meta: Mapping[str, str]) -> Resource:
        """Create snapshot ``name`` holding no data, only ``meta`` (status, reason, backup key and ETag).

        A failed restore or verification leaves such a record so that the same
        backup is not restored again (also after a restart), while its
        artefacts (volume, sealed data, verify clone) are already destroyed.
        It is listed under :attr:`Kind.SNAPSHOT` and removed with
        ``destroy(Kind.SNAPSHOT, name)``; it cannot be cloned. Idempotent.
        """
        ...

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        """Make clone ``name`` of ``snapshot`` and start it; returns once it accepts connections."""
        ...

    async def check(self, name: str, command: Command) -> None:
        """Run ``command`` against clone ``name``'s database; raise :class:`ProviderError` if it fails."""
        ...

    async def is_healthy(self, name: str) -> bool:
        """Whether clone ``name``'s database is running and accepting connections."""
        ...

    async def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, expect_version: str | None = None
    ) -> Resource:
        """Replace the resource's meta atomically (crash-safe); with ``expect_version``, compare-and-set.

        Raises :class:`ConflictError` when ``expect_version`` is stale,
        :class:`NotFoundError` when the resource is gone.
        """
        ...

    async def destroy(self, kind: Kind, name: str) -> None:
        """Stop and delete the resource; a missing one is not an error."""
        ...

    async def list(self, kind: Kind | None = None) -> Sequence[Resource]:
        """Everything this provider holds (of ``kind``), with meta, for adoption after a restart."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds in this process (not the databases themselves)."""
        ...


@runtime_checkable
class Liveness(Protocol):
    """Optional for a :class:`Provider`: a cheap, synchronous "is this clone's database up?".

    The pool asks it for every warm clone it is about to hand out, on the
    hand-out's hot path, so it must answer from what the provider already has
    (a process table, a cache) in microseconds, without a connection or an API
    call, and never raise. ``False`` means *known dead*: the pool destroys the
    clone and hands out the next one (or queues). A provider that cannot know
    cheaply answers ``True`` and leaves it to :meth:`Provider.is_healthy`, which
    the health loop calls every ``pool.health_check_interval``.
    """

    def alive(self, name: str) -> bool:
        """Whether clone ``name``'s database process is running, as far as is known cheaply."""
        ...


@runtime_checkable
class Restartable(Protocol):
    """Optional for a :class:`Provider` whose clones keep their data when their database dies.

    On Kubernetes a clone's data is its PVC and its database a pod: an
    eviction, a node lost or a ``kubectl delete pod`` takes the pod and leaves
    the data. With this protocol the pool keeps a leased clone whose database
    is gone (a lease is a developer's data), and its leader starts the
    database again on the same data; without it such a lease is lost.
    """

    async def restart(self, name: str) -> Endpoint:
        """Start clone ``name``'s database again on its own data if it is not running any more.

        Returns once it accepts connections (possibly at a new address).
        Raises :class:`NotFoundError` when the clone's data is gone, and
        :class:`ProviderError` when the database does not come up.
        """
        ...

    async def protect(self, name: str) -> None:
        """Keep planned disruptions (node drains) from stopping leased clone ``name``'s database.

        Idempotent; :meth:`Provider.destroy` lifts the protection with the clone.
        """
        ...
