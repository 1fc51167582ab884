"""The pool's settings: warm pool, leases, snapshots, source polling, restore and check commands.

One frozen tree, built once by the broker (YAML + environment + flags) and
passed to :class:`pool.Pool` explicitly. Every field has a default and a
docstring saying why the default is what it is.
"""

from __future__ import annotations

import pathlib
from typing import Literal

import attrs

from ._provider import Backup, Command, ProviderError
from .providers.local._settings import LocalSettings
from .sources._formats import default_check_command, default_restore_command, format_of
from .sources._settings import DirectorySettings, S3Settings


@attrs.frozen(kw_only=True)
class WarmPoolSettings:
    """How many clones are kept ready, and how they are kept healthy."""

    size: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    """Warm clones kept ready for instant hand-out; 3 covers a burst of CI jobs, as the original's
    wish list asked.
    """
    max_provisioning: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    """Clones made at the same time; 2 refills quickly without starving a 2-core host."""
    health_check_interval: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    """Seconds between health checks of warm clones; a dead one is replaced within this time."""
    refresh_interval: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """With several broker replicas: seconds between re-reads of the provider (warm clones the
    leader made, leases of other replicas); 5 s keeps a follower's view fresh at one list call.
    """


@attrs.frozen(kw_only=True)
class LeaseSettings:
    """Idle TTL, caps and queueing of leases."""

    ttl: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    """Default idle TTL in seconds, counted from the last detach; 300 s is the original's default.
    """
    max_ttl: float = attrs.field(default=86400.0, validator=attrs.validators.gt(0))
    """Largest idle TTL a client may ask for; a day lets a laptop sleep overnight."""
    max_lifetime: float = attrs.field(default=86400.0, validator=attrs.validators.gt(0))
    """Seconds after which a lease ends even while attached; a day bounds a forgotten copy's cost.
    """
    queue_timeout: float = attrs.field(default=120.0, validator=attrs.validators.ge(0))
    """Seconds an acquire waits in the queue for a clone when none is warm; 2 minutes covers a
    refill.
    """
    max_active: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    """How many leases may be active at once (``None``: no limit); a hand-out beyond it is
    refused at once, before it takes a warm clone. Unlimited by default, as the original was;
    set it where each lease costs (a PVC per lease on Kubernetes, disk and memory locally).
    """
    superuser: bool = False
    """Whether the lease login is a PostgreSQL superuser (local provider, and Kubernetes with
    per-clone credentials); off, because a superuser can run programs and read or write files as
    the PostgreSQL OS user (COPY ... TO PROGRAM, pg_read_file), change server settings (ALTER
    SYSTEM), and from there reach every other lease's database on the host (on Kubernetes: its
    own pod, and whatever that pod can reach). Turn it on only when every lease holder may see
    every other's data.
    """


@attrs.frozen(kw_only=True)
class SnapshotSettings:
    """Which snapshots are kept."""

    keep: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    """Ready snapshots kept (newest first); 1, as the original, since each one costs a full copy."""
    failed_grace: float = attrs.field(default=86400.0, validator=attrs.validators.ge(0))
    """Seconds a failed snapshot's record (with its reason) is kept; a day to read why it failed."""


@attrs.frozen(kw_only=True)
class SourceSettings:
    """Which backup source is used, and how often it is looked at."""

    kind: Literal["directory", "s3"] = "directory"
    """``directory`` (settings under ``directory``) or ``s3`` (under ``s3``); a folder needs no
    setup.
    """

    poll_interval: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    """Seconds between listings of the source; backups land nightly, a minute is plenty and cheap.
    """


@attrs.frozen(kw_only=True)
class CommandSettings:
    """A restore or check command; empty ``argv`` means the default (chosen by the backup's suffix)."""

    argv: tuple[str, ...] = ()
    """Program and arguments, run without a shell unless argv says so (e.g. ``sh -c ...``); empty =
    default.
    """
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra environment; the database's address arrives as PGHOST/PGPORT/... and
    ALDAAS_HOST_DAEMON.
    """
    timeout: float = attrs.field(default=21600.0, validator=attrs.validators.gt(0))
    """Seconds before the command is stopped as failed; 6 h fits a large nightly backup."""


@attrs.frozen(kw_only=True)
class TransformSettings:
    """The masking step: SQL or a command run on a restored volume before it is verified."""

    sql_file: pathlib.Path | None = None
    """A file of SQL run in one transaction as the restore's superuser (e.g. examples/masking.sql);
    read when each snapshot is made, so edits apply to the next backup. ``None``: no SQL step.
    """
    argv: tuple[str, ...] = ()
    """A command instead of ``sql_file``, with the check's environment (PGHOST, PGDATABASE, ...);
    empty = ``sql_file`` or no step.
    """
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra environment of the command."""
    timeout: float = attrs.field(default=3600.0, validator=attrs.validators.gt(0))
    """Seconds before the step is stopped as failed; an hour fits masking a large table."""


def _check_default() -> CommandSettings:
    return CommandSettings(timeout=600.0)


@attrs.frozen(kw_only=True)
class PoolSettings:
    """Everything the pool logic reads (the providers and sources have their own settings)."""

    pool: WarmPoolSettings = attrs.field(factory=WarmPoolSettings)
    """The warm pool."""
    lease: LeaseSettings = attrs.field(factory=LeaseSettings)
    """Leases: idle TTL, caps, queue."""
    snapshots: SnapshotSettings = attrs.field(factory=SnapshotSettings)
    """Snapshot retention."""
    source: SourceSettings = attrs.field(factory=SourceSettings)
    """Which backup source, and how often it is polled."""
    directory: DirectorySettings = attrs.field(factory=DirectorySettings)
    """The directory source (``source.kind: directory``)."""
    s3: S3Settings = attrs.field(factory=S3Settings)
    """The S3 source (``source.kind: s3``)."""
    local: LocalSettings = attrs.field(factory=LocalSettings)
    """The local provider (data folder, PostgreSQL binaries, clone method)."""
    restore: CommandSettings = attrs.field(factory=CommandSettings)
    """Restore command (backup on stdin); empty argv picks psql, gunzip | psql or pg_restore by
    suffix.
    """
    check: CommandSettings = attrs.field(factory=_check_default)
    """Check command run on a throwaway clone; the default needs an answer and ≥ 1 user table."""
    transform: TransformSettings = attrs.field(factory=TransformSettings)
    """Masking step run on each restored volume before it is verified; none by default."""

    def restore_command(self, backup: Backup) -> Command:
        """The restore command for ``backup``: ``restore.argv``, else the built-in restore.

        The built-in one carries the suffix's default argv (empty when the suffix
        is unknown) for providers that run a command (Kubernetes); the local
        provider reads the format from the backup's first bytes instead.
        """
        if self.restore.argv:
            return Command(
                argv=self.restore.argv,
                env=dict(self.restore.env),
                timeout_seconds=self.restore.timeout,
            )
        fmt = format_of(backup.key)
        argv = tuple(default_restore_command(fmt).argv) if fmt is not None else ()
        return Command(
            argv=argv,
            env=dict(self.restore.env),
            timeout_seconds=self.restore.timeout,
            builtin=True,
        )

    def transform_command(self) -> Command | None:
        """The masking step, or ``None`` when none is configured."""
        t = self.transform
        if t.argv:
            return Command(argv=t.argv, env=dict(t.env), timeout_seconds=t.timeout)
        if t.sql_file is None:
            return None
        try:
            sql = t.sql_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProviderError(
                f"transform.sql_file {str(t.sql_file)!r} cannot be read ({exc}); "
                "fix the path or its permissions"
            ) from None
        argv = ("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-c", sql)
        return Command(argv=argv, env=dict(t.env), timeout_seconds=t.timeout)

    def check_command(self) -> Command:
        """The check command run against a throwaway clone of a fresh snapshot."""
        argv = self.check.argv or tuple(default_check_command().argv)
        return Command(argv=argv, env=dict(self.check.env), timeout_seconds=self.check.timeout)
