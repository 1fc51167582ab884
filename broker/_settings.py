"""The root of the settings tree: one section per part of the broker.

Each package owns its sections (pool/_settings.py, tunnel/_settings.py); this
module only assembles them and adds the broker's own (``admin``, ``log``).
:func:`broker._config.load_settings` fills the tree from YAML, the
environment (``ALDAAS_<SECTION>_<FIELD>``) and ``--set`` flags.
"""

from __future__ import annotations

from typing import Literal

import attrs

import aldaas.pool as _pool
import aldaas.tunnel as _tunnel


@attrs.frozen(kw_only=True)
class AdminSettings:
    """The admin/health HTTP listener (probes, metrics, admin API)."""

    listen: str = "127.0.0.1"
    """Address the admin listener binds; loopback by default because the admin API can kill leases.

    Set ``0.0.0.0`` in a container so that probes and Prometheus reach it.
    """

    port: int = 9090
    """Port of the admin listener; 9090 is the usual metrics port and never the gateway's."""

    token: str | None = attrs.field(default=None, repr=False)
    """Bearer token for ``/api/*``; ``None`` disables the admin API (probes and metrics stay open)."""


@attrs.frozen(kw_only=True)
class LogSettings:
    """Structured logging (structlog)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written; ``info`` logs one line per lease event, which is what operators read."""

    format: Literal["auto", "json", "console"] = "auto"
    """``auto`` writes console lines on a terminal and JSON lines otherwise (containers, files)."""


@attrs.frozen(kw_only=True)
class Settings:
    """Everything ``aldaas serve`` reads, built once and passed explicitly."""

    provider: Literal["local", "kubernetes"] = "local"
    """Where databases run: ``local`` (PostgreSQL processes on this machine, the embedded default,
    no cluster needed) or ``kubernetes`` (PVCs from VolumeSnapshots, one pod per clone).
    """

    local: _pool.LocalSettings = attrs.field(factory=_pool.LocalSettings)
    """The local provider: data folder, PostgreSQL binaries, ports, clone method."""

    kubernetes: _pool.KubernetesSettings = attrs.field(factory=_pool.KubernetesSettings)
    """The Kubernetes provider (``provider: kubernetes``): namespace, storage and snapshot classes,
    the application/restore/check pods, leader election among replicas. See
    docs/kubernetes-provider.md.
    """

    source: _pool.SourceSettings = attrs.field(factory=_pool.SourceSettings)
    """Which backup source (``directory`` or ``s3``) and how often it is polled."""

    directory: _pool.DirectorySettings = attrs.field(factory=_pool.DirectorySettings)
    """The directory source (``source.kind: directory``)."""

    s3: _pool.S3Settings = attrs.field(factory=_pool.S3Settings)
    """The S3 source (``source.kind: s3``)."""

    pool: _pool.WarmPoolSettings = attrs.field(factory=_pool.WarmPoolSettings)
    """The warm pool: how many clones are kept ready."""

    lease: _pool.LeaseSettings = attrs.field(factory=_pool.LeaseSettings)
    """Leases: idle TTL, caps, queue timeout."""

    snapshots: _pool.SnapshotSettings = attrs.field(factory=_pool.SnapshotSettings)
    """Snapshot retention."""

    restore: _pool.CommandSettings = attrs.field(factory=_pool.CommandSettings)
    """The restore command (empty argv: the built-in restore, any pg_dump/pg_dumpall format)."""

    transform: _pool.TransformSettings = attrs.field(factory=_pool.TransformSettings)
    """The masking step run on each restored backup before it is verified (none by default)."""

    check: _pool.CommandSettings = attrs.field(factory=lambda: _pool.PoolSettings().check)
    """The check command run on a throwaway clone of each new snapshot."""

    gateway: _tunnel.GatewaySettings = attrs.field(factory=_tunnel.GatewaySettings)
    """The websocket gateway clients connect to (instance token, TLS, limits)."""

    admin: AdminSettings = attrs.field(factory=AdminSettings)
    """The admin/health HTTP listener."""

    log: LogSettings = attrs.field(factory=LogSettings)
    """Structured logging."""

    def pool_settings(self) -> _pool.PoolSettings:
        """The pool's own tree, assembled from the sections it reads."""
        return _pool.PoolSettings(
            pool=self.pool,
            lease=self.lease,
            snapshots=self.snapshots,
            source=self.source,
            directory=self.directory,
            s3=self.s3,
            local=self.local,
            restore=self.restore,
            check=self.check,
            transform=self.transform,
        )
