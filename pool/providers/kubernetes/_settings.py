"""Settings of the Kubernetes provider and of leader election (no ``kubernetes`` import here).

The broker's configuration tree nests :class:`KubernetesSettings` (YAML keys are
the field names). The Helm chart maps the original's values onto it:
``application.*`` → :attr:`KubernetesSettings.application`, ``restore.*`` →
:attr:`KubernetesSettings.restore`, ``check.*`` → :attr:`KubernetesSettings.check`,
``rook.storageClassName`` → :attr:`KubernetesSettings.storage_class`,
``rook.volumeSnapshotClassName`` → :attr:`KubernetesSettings.snapshot_class`,
``application.storage`` → :attr:`KubernetesSettings.storage_size`.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class ResourceSettings:
    """Container resources, as a pod spec's ``resources`` (string quantities)."""

    requests: dict[str, str] = attrs.field(factory=lambda: {"cpu": "100m", "memory": "256Mi"})
    """Requests; small because warm clones mostly idle."""
    limits: dict[str, str] = attrs.field(factory=lambda: {"memory": "1Gi"})
    """Limits; memory only, so a busy database is not CPU-throttled (the original gave 1Gi)."""


@attrs.frozen(kw_only=True)
class ApplicationSettings:
    """The database container every volume and clone runs (engine-agnostic, as the original)."""

    image: str = "postgres:17"
    """Image with the database server; the original's default was ``postgres:latest``, pinned."""
    pull_policy: str | None = None
    """imagePullPolicy; None leaves Kubernetes' default (IfNotPresent for a tagged image)."""
    port: int = 5432
    """Port the database listens on in the pod; the gateway connects to the pod IP and this port."""
    mount: str = "/var/lib/postgresql/data"
    """Where the volume is mounted: the official postgres image's PGDATA, as the original."""
    sub_path: str = "pgdata"
    """Sub-folder of the volume that is mounted (initdb refuses a volume root with lost+found)."""
    command: tuple[str, ...] = ()
    """Container command override; empty keeps the image's entrypoint."""
    args: tuple[str, ...] = ()
    """Container args override; empty keeps the image's default."""
    env: dict[str, str] = attrs.field(factory=dict)
    """Plain environment, e.g. POSTGRES_USER/POSTGRES_DB; secrets belong in env_from_secret."""
    env_from_secret: str | None = None
    """Name of a Secret whose keys become environment (e.g. POSTGRES_PASSWORD); none by default."""
    resources: ResourceSettings = ResourceSettings()
    """Requests and limits of every database pod."""
    logins: str = "per-clone"
    """How lease holders log in. ``per-clone`` (the role model, docs/security.md): the volume's
    bootstrap superuser is the admin ``aldaas_admin`` with a random password in the volume's
    Secret (the image's POSTGRES_USER/POSTGRES_PASSWORD), the restore Job seals the roles, and
    each clone gets its own random passwords in its own Secret, set by an init container running
    the image's ``postgres --single`` before the database starts. ``static``: every clone logs in
    as ``user`` with ``password`` as the image made it (for images that are not PostgreSQL's); all
    leases then share that password."""
    user: str = "aldaas"
    """The lease login the Endpoint names (``per-clone``: made by the restore's seal step, not a
    superuser unless ``lease.superuser``; ``static``: the image's user)."""
    database: str = "postgres"
    """Database name the Endpoint names (``per-clone``: also the volume's POSTGRES_DB)."""
    password: str | None = attrs.field(default=None, repr=False)
    """``static`` only: the password of ``user``, which the restore/check steps get as
    PGPASSWORD; never logged. ``per-clone`` ignores it."""
    readiness_command: tuple[str, ...] = ()
    """Exec readiness probe (e.g. ``pg_isready -U postgres``); empty means TCP on ``port``."""
    service_account: str | None = None
    """ServiceAccount of database pods; None keeps the namespace default (no API token mounted)."""


@attrs.frozen(kw_only=True)
class RestoreSettings:
    """The restore Job: an init container downloads the backup, then the restore command runs."""

    image: str | None = None
    """Image of the restore step. None: the built-in restore runs in ``helper_image`` (aldaas's own,
    with PostgreSQL 18's client tools); a configured command (``command``/``args``, or the pool's
    ``restore.argv``) runs in the application image (it has psql), as the original."""
    command: tuple[str, ...] = ()
    """The original's ``restore.command``: when it or ``args`` is set, the Job runs command + args
    as given (reading ``$ALDAAS_BACKUP_FILE`` itself) instead of the pool's restore command."""
    args: tuple[str, ...] = ()
    """The original's ``restore.args`` (e.g. ``gunzip -c /backup.sql.gz | psql ...`` under sh -c)."""
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra plain environment on top of the database's address (ALDAAS_HOST_DAEMON, PG*)."""
    env_from_secret: str | None = None
    """Secret whose keys become the restore container's environment (e.g. PGPASSWORD)."""
    resources: ResourceSettings = ResourceSettings()
    """Requests and limits of the restore and download containers."""
    engine_command: tuple[str, ...] = ("aldaas", "restore-backup")
    """The built-in restore (the local provider's engine: any pg_dump/pg_dumpall format and
    compression, the dump's roles made NOLOGIN, no shell from the backup), run when neither
    ``command``/``args`` nor the pool's ``restore.argv`` is set; ``--file``, ``--key``,
    ``--work-dir``, ``--outcome`` and, as configured, ``--database`` and ``--seal-login`` are
    appended. Its outcome (format, database, what it tolerated) reaches the snapshot through the
    container's termination message."""
    database: str | None = None
    """The database of a pg_dumpall backup that leases get (the original's POSTGRES_DB); None:
    its one non-system database. A plain pg_dump or an archive goes into ``application.database``."""
    fetch_command: tuple[str, ...] = ("aldaas", "fetch-backup")
    """Download command in the helper image; ``--key KEY --to PATH`` is appended."""
    fetch_env: dict[str, str] = attrs.field(factory=dict)
    """Plain environment of the download (S3 bucket, endpoint, region as the broker's settings)."""
    backup_dir: str = "/backup"
    """Where the shared emptyDir is mounted; the file is ``<backup_dir>/<key's basename>``."""
    backup_path: str | None = None
    """Fixed path of the backup in the restore container (the original's ``/backup.sql.gz``);
    None uses the file under ``backup_dir``. Either way ``ALDAAS_BACKUP_FILE`` names it."""
    stdin_from_backup: bool = True
    """Feed the backup to the pool's restore command on stdin (as the local provider does)."""
    service_account: str | None = None
    """ServiceAccount of the restore Job's pod, for cloud workload identity (IRSA, GKE or Azure
    workload identity) in the download container; its token is then mounted. None: the
    namespace default, no token (the download reads S3 keys from ``s3_credentials_secret``)."""
    backup_size_limit: str | None = None
    """sizeLimit of the emptyDir the backup is downloaded into (e.g. ``50Gi``): a larger download
    evicts the Job instead of filling the node's disk. None sets no limit."""


@attrs.frozen(kw_only=True)
class CheckSettings:
    """The Job that runs the check command against a verification clone."""

    image: str | None = None
    """Image of the check step; None reuses the application image, as the original."""
    command: tuple[str, ...] = ()
    """The original's ``check.command``: when it or ``args`` is set, it replaces the pool's check."""
    args: tuple[str, ...] = ()
    """The original's ``check.args`` (e.g. ``psql -h $ALDAAS_HOST_DAEMON ... -c '\\l'``)."""
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra plain environment on top of the database's address."""
    env_from_secret: str | None = None
    """Secret whose keys become the check container's environment (e.g. PGPASSWORD)."""
    resources: ResourceSettings = ResourceSettings()
    """Requests and limits of the check container."""


def _restricted_pod() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 999,
        "runAsGroup": 999,
        "fsGroup": 999,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_container() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@attrs.frozen(kw_only=True)
class PodSettings:
    """Security and scheduling of every pod the provider makes (database pods and Job pods)."""

    security_context: dict[str, Any] = attrs.field(factory=_restricted_pod)
    """Pod securityContext. The default passes Pod Security "restricted": a non-root user (999,
    the official postgres image's ``postgres``), the runtime's seccomp profile, and fsGroup 999 so
    the volume and the restore's emptyDir are writable to it. ``{}`` sends none."""
    container_security_context: dict[str, Any] = attrs.field(factory=_restricted_container)
    """securityContext of every container: no privilege escalation, every capability dropped
    (what "restricted" asks); ``{}`` sends none."""
    node_selector: dict[str, str] = attrs.field(factory=dict)
    """nodeSelector, e.g. ``{"node.kubernetes.io/pool": "databases"}``; empty: any node."""
    tolerations: tuple[dict[str, Any], ...] = ()
    """Tolerations as in a pod spec (to run on tainted database nodes)."""
    affinity: dict[str, Any] = attrs.field(factory=dict)
    """affinity as in a pod spec (node, pod and anti-affinity); empty sends none."""
    priority_class_name: str | None = None
    """priorityClassName; None leaves the cluster's default priority."""
    image_pull_secrets: tuple[str, ...] = ()
    """Names of Secrets to pull the database, restore, check and download images with."""


@attrs.frozen(kw_only=True)
class CaBundleSettings:
    """Where the restore's download finds the PEM bundle of a private CA that signed S3's
    certificate (MinIO or SeaweedFS behind a company CA): a key of a ConfigMap or a Secret."""

    config_map: str | None = None
    """ConfigMap holding the bundle (e.g. one trust-manager distributes); None: not from one."""
    secret: str | None = None
    """Secret holding the bundle (e.g. cert-manager's ``ca.crt``), instead of ``config_map``."""
    key: str = "ca.crt"
    """Key of the ConfigMap or Secret whose value is the PEM bundle (cert-manager's name)."""


@attrs.frozen(kw_only=True)
class LeaderElectionSettings:
    """Who among several broker replicas runs the background work (client-go's defaults)."""

    lease_name: str = "aldaas-leader"
    """Name of the coordination.k8s.io/v1 Lease; one per installation (the chart: <release>-leader)."""
    lease_duration_seconds: float = 15.0
    """How long followers wait after the last renewal they saw before taking over (client-go: 15)."""
    renew_deadline_seconds: float = 10.0
    """A leader that could not renew for this long steps down, before others may take over."""
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
    """Installation name: prefixes object names and fills the ``aldaas`` label (several per ns)."""
    identity: str = "aldaas"
    """This broker replica's identity (the chart sets the pod name); recorded on what it creates."""
    label_prefix: str = "aldaas.io/"
    """Prefix of every label and annotation key the provider writes."""
    label_meta_keys: tuple[str, ...] = ("status", "state", "snapshot", "owner", "backup")
    """Meta keys stored as labels (selectable with kubectl) when the value is a valid label value;
    every other key, and any value a label cannot hold, goes to an annotation."""
    storage_class: str | None = None
    """storageClassName of volume and clone PVCs (the original's ``rook.storageClassName``);
    None uses the cluster's default class."""
    snapshot_class: str | None = None
    """volumeSnapshotClassName (the original's ``rook.volumeSnapshotClassName``); None uses the
    default class of the CSI driver."""
    storage_size: str = "10Gi"
    """Size of every volume PVC (the original's ``application.storage``); a clone takes the larger
    of this and its snapshot's restoreSize."""
    helper_image: str = "ghcr.io/aldaas/aldaas:latest"
    """Image with the ``aldaas`` CLI (the broker's own): the restore Job's download container, and
    its restore container when the built-in restore runs (``restore.engine_command``)."""
    s3_credentials_secret: str | None = None
    """Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the download container only."""
    s3_credentials_env: dict[str, str] = attrs.field(factory=dict)
    """Environment name → key of ``s3_credentials_secret`` for the download container, e.g.
    ``{AWS_ACCESS_KEY_ID: accesskey, AWS_SECRET_ACCESS_KEY: secretkey}`` for the original chart's
    Secret (the chart sets that); empty passes the Secret's keys as they are (``envFrom``)."""
    s3_ca_bundle: CaBundleSettings = CaBundleSettings()
    """PEM bundle of the CA(s) the download container trusts for S3, mounted into it and named
    by ``ALDAAS_S3_CA_BUNDLE`` and ``AWS_CA_BUNDLE``; unset: the helper image's public CAs."""
    application: ApplicationSettings = ApplicationSettings()
    """The database container."""
    restore: RestoreSettings = RestoreSettings()
    """The restore Job."""
    check: CheckSettings = CheckSettings()
    """The check Job run against a verification clone."""
    leader_election: LeaderElectionSettings = LeaderElectionSettings()
    """Lease-based leader election among broker replicas."""
    pods: PodSettings = PodSettings()
    """Security context and scheduling of database and Job pods."""
    api_connections: int = 12
    """Size of the HTTP connection pool; half of it (and of the worker threads) serves watches,
    one per step waiting for a pod, Job or snapshot, half serves calls. Raise it with
    ``pool.max_provisioning`` so that waits do not queue."""
    request_timeout_seconds: float = 30.0
    """Timeout of one non-watch API call; a timeout is a temporary error, retried."""
    api_retries: int = 4
    """Attempts per call on 5xx/429/timeouts before a TemporaryProviderError reaches the caller."""
    api_retry_delay_seconds: float = 0.5
    """First back-off between attempts (doubling, at most 10 s); short, API hiccups are brief."""
    watch_timeout_seconds: int = 60
    """Server-side timeout of one watch request (``timeoutSeconds``); the provider re-watches."""
    ready_timeout_seconds: float = 600.0
    """How long a database pod may take to become Ready (image pulls, volume provisioning)."""
    snapshot_timeout_seconds: float = 1800.0
    """How long a VolumeSnapshot may take to become readyToUse (large volumes, slow storage)."""
    stop_grace_seconds: int = 120
    """Grace period when stopping a volume's database before sealing (a clean shutdown matters)."""
    destroy_grace_seconds: int = 5
    """Grace period when destroying a clone (its data is thrown away anyway)."""
    progress_interval_seconds: float = 5.0
    """How often a running restore's download progress is read from its log (one small call)."""
    log_tail_lines: int = 20
    """Lines of a failed pod's log quoted in the error."""
