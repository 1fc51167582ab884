"""Settings of the Kubernetes provider and of leader election (no ``kubernetes`` import here).

The broker's configuration tree nests :class:`KubernetesSettings` (YAML keys are
the field names). The Helm chart maps the original's values onto it:
``application.*`` → :attr:`KubernetesSettings.application`, ``restore.*`` →
:attr:`KubernetesSettings.restore`, ``check.*`` → :attr:`KubernetesSettings.check`,
``rook.storageClassName`` → :attr:`KubernetesSettings.storage_class`,
``rook.volumeSnapshotClassName`` → :attr:`KubernetesSettings.snapshot_class`.
"""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class ApplicationSettings:
    """The database container every volume and clone runs (engine-agnostic, as the original)."""

    image: str = "postgres:17"
    """Image with the database server; the original's default was ``postgres:latest``, pinned here."""
    port: int = 5432
    """Port the database listens on inside the pod; the gateway connects to pod IP and this port."""
    mount_path: str = "/var/lib/postgresql/data"
    """Where the volume is mounted: the official postgres image's PGDATA, as the original."""
    sub_path: str = "pgdata"
    """Sub-folder of the volume used as the mount (initdb refuses a volume root with lost+found)."""
    command: tuple[str, ...] = ()
    """Container command override; empty keeps the image's entrypoint."""
    args: tuple[str, ...] = ()
    """Container args override; empty keeps the image's default."""
    env: dict[str, str] = attrs.field(factory=dict)
    """Plain environment, e.g. POSTGRES_USER/POSTGRES_DB; secrets belong in ``env_from_secret``."""
    env_from_secret: str | None = None
    """Name of a Secret whose keys become environment (e.g. POSTGRES_PASSWORD); none by default."""
    requests: dict[str, str] = attrs.field(factory=lambda: {"cpu": "100m", "memory": "256Mi"})
    """Resource requests; small because warm clones mostly idle."""
    limits: dict[str, str] = attrs.field(factory=lambda: {"memory": "1Gi"})
    """Resource limits; memory only, so a busy clone is not CPU-throttled."""
    user: str = "postgres"
    """Database user the Endpoint (and restore/check environment) names."""
    database: str = "postgres"
    """Database name the Endpoint names."""
    password: str | None = attrs.field(default=None, repr=False)
    """Password the restore/check steps get as PGPASSWORD; never logged."""
    readiness_command: tuple[str, ...] = ()
    """Exec readiness probe (e.g. ``pg_isready -U postgres``); empty means a TCP probe on ``port``."""
    storage_size: str = "10Gi"
    """Size of every volume PVC (the original's ``application.storage``); clones take the larger of
    this and the snapshot's restoreSize."""
    service_account: str | None = None
    """ServiceAccount for database pods; none keeps the namespace default (they need no API access)."""


@attrs.frozen(kw_only=True)
class CheckSettings:
    """The Job that runs the check command against a verification clone."""

    image: str | None = None
    """Image for the step; None reuses the application image (it has psql/pg_restore), as the original."""
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra plain environment on top of the database's address (ALDAAS_HOST_DAEMON, PG*)."""
    env_from_secret: str | None = None
    """Secret whose keys become environment (PGPASSWORD, S3 credentials for the download)."""
    requests: dict[str, str] = attrs.field(factory=lambda: {"cpu": "100m", "memory": "256Mi"})
    """Resource requests of the step's containers."""
    limits: dict[str, str] = attrs.field(factory=lambda: {"memory": "1Gi"})
    """Resource limits of the step's containers (the original gave restore 1Gi)."""


@attrs.frozen(kw_only=True)
class RestoreSettings:
    """The restore Job: an init container downloads the backup, then the restore command runs."""

    image: str | None = None
    """Image for the step; None reuses the application image (it has psql/pg_restore), as the original."""
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra plain environment on top of the database's address (ALDAAS_HOST_DAEMON, PG*)."""
    env_from_secret: str | None = None
    """Secret whose keys become environment (PGPASSWORD, S3 credentials for the download)."""
    requests: dict[str, str] = attrs.field(factory=lambda: {"cpu": "100m", "memory": "256Mi"})
    """Resource requests of the step's containers."""
    limits: dict[str, str] = attrs.field(factory=lambda: {"memory": "1Gi"})
    """Resource limits of the step's containers (the original gave restore 1Gi)."""

    fetch_image: str = "ghcr.io/aldaas/aldaas:latest"
    """Image with the ``aldaas`` CLI (the broker's own image) for the download init container."""
    fetch_command: tuple[str, ...] = ("aldaas", "fetch-backup")
    """Download command; the provider appends ``--key KEY --to PATH``; S3 settings come from env."""
    fetch_env: dict[str, str] = attrs.field(factory=dict)
    """Plain environment of the download (bucket, endpoint, region); credentials via env_from_secret."""
    backup_dir: str = "/backup"
    """Shared emptyDir where the backup lands; the restore command gets ``ALDAAS_BACKUP_FILE``."""
    stdin_from_backup: bool = True
    """Feed the backup file to the command's stdin (as the local provider does), via ``sh -c``."""


@attrs.frozen(kw_only=True)
class LeaderElectionSettings:
    """Who among several broker replicas runs the background work (client-go's defaults)."""

    lease_name: str = "aldaas-leader"
    """Name of the coordination.k8s.io/v1 Lease; one per installation."""
    lease_duration_seconds: float = 15.0
    """How long followers wait after the last observed renewal before taking over (client-go: 15)."""
    renew_deadline_seconds: float = 10.0
    """A leader that could not renew for this long steps down before others may take over."""
    retry_period_seconds: float = 2.0
    """How often the leader renews and followers retry (client-go: 2)."""


@attrs.frozen(kw_only=True)
class KubernetesSettings:
    """Where and how the Kubernetes provider makes volumes, snapshots and clones."""

    namespace: str = "default"
    """Namespace of every object; the chart sets the release namespace."""
    kubeconfig: str | None = None
    """Path of a kubeconfig; None uses the in-cluster service account, then ~/.kube/config."""
    instance: str = "aldaas"
    """Installation name: prefixes object names and fills the ``aldaas`` label (several per namespace)."""
    identity: str = "aldaas"
    """This broker replica's identity (the chart sets the pod name); recorded on what it creates."""
    label_prefix: str = "aldaas.io/"
    """Prefix of every label and annotation key the provider writes."""
    label_meta_keys: tuple[str, ...] = ("status", "state", "snapshot", "owner", "backup")
    """Meta keys stored as labels (selectable with kubectl) when the value is a valid label value;
    every other key, and any value a label cannot hold, goes to an annotation."""
    storage_class: str | None = None
    """storageClassName of volume and clone PVCs (the original's ``rook.storageClassName``)."""
    snapshot_class: str | None = None
    """volumeSnapshotClassName (the original's ``rook.volumeSnapshotClassName``)."""
    application: ApplicationSettings = ApplicationSettings()
    """The database container."""
    restore: RestoreSettings = RestoreSettings()
    """The restore Job."""
    check: CheckSettings = CheckSettings()
    """The check Job run against a verification clone."""
    leader_election: LeaderElectionSettings = LeaderElectionSettings()
    """Lease-based leader election among broker replicas."""
    api_connections: int = 8
    """Size of the HTTP connection pool and of the thread limiter in front of it."""
    request_timeout_seconds: float = 30.0
    """Timeout of one non-watch API call; a timeout is a temporary error, retried."""
    api_retries: int = 4
    """Attempts per API call on 5xx/429/timeouts before a TemporaryProviderError reaches the caller."""
    api_retry_delay_seconds: float = 0.5
    """First back-off between attempts (doubling, at most 10 s); short, as API hiccups are brief."""
    watch_timeout_seconds: int = 60
    """Server-side timeout of one watch request (``timeoutSeconds``); the provider re-watches."""
    ready_timeout_seconds: float = 600.0
    """How long a database pod may take to become Ready (image pulls, volume provisioning)."""
    snapshot_timeout_seconds: float = 1800.0
    """How long a VolumeSnapshot may take to become readyToUse (large volumes on slow storage)."""
    stop_grace_seconds: int = 120
    """Grace period when stopping a volume's database before sealing (a clean shutdown matters)."""
    destroy_grace_seconds: int = 5
    """Grace period when destroying a clone (its data is thrown away anyway)."""
    progress_interval_seconds: float = 5.0
    """How often a running restore's download progress is read from its log (one small API call)."""
    log_tail_lines: int = 20
    """Lines of a failed pod's log quoted in the error."""
