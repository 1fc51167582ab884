"""The warm pool: backups → verified snapshots → warm clones → leases.

Pure pool logic written against two small interfaces (:class:`Provider`,
:class:`Source`); the local and Kubernetes providers and the directory and S3
sources are its I/O edges.
"""

from ._lease import (
    CloneFailed,
    CloneProvisioned,
    InvalidRequestError,
    Lease,
    LeaseEnded,
    LeaseHandedOut,
    LeaseInfo,
    LeaseLimitError,
    LeaseNotFoundError,
    LeaseRefused,
    LeaseReset,
    NoSnapshotReadyError,
    Observer,
    PoolDrainingError,
    PoolError,
    PoolErrorEvent,
    PoolEvent,
    PoolStatistics,
    QueueLeft,
    QueueProgress,
    QueueProgressCallback,
    QueueTimeoutError,
    RestoreFinished,
    RestoreStatus,
    SnapshotFailed,
    SnapshotInfo,
    SnapshotReady,
    SourceHealth,
)
from ._pool import Pool
from ._provider import (
    Backup,
    Command,
    ConflictError,
    Endpoint,
    Kind,
    Liveness,
    NotFoundError,
    ProgressCallback,
    Provider,
    ProviderError,
    Resource,
    Restartable,
    RestoreProgress,
    Source,
    TemporaryProviderError,
)
from ._settings import (
    CommandSettings,
    LeaseSettings,
    PoolSettings,
    SnapshotSettings,
    SourceSettings,
    TransformSettings,
    WarmPoolSettings,
)
from ._states import CloneState, IllegalTransition, LeaseState, SnapshotState
from .providers.local._files import DataFolderLock
from .providers.local._postgres import embedded_bin_dir
from .providers.local._provider import LocalProvider
from .providers.local._restore import LocalRestore, RestoreOutcome
from .providers.local._restore import describe as describe_restore
from .providers.local._servers import run_psql, seal_roles
from .providers.local._settings import LocalSettings
from .sources._directory import DirectorySource
from .sources._formats import (
    BackupFormat,
    default_check_command,
    default_restore_command,
    format_of,
)
from .sources._s3 import S3Source
from .sources._settings import DirectorySettings, S3Settings

__all__ = [
    "Backup",
    "BackupFormat",
    "CloneFailed",
    "CloneProvisioned",
    "CloneState",
    "Command",
    "CommandSettings",
    "ConflictError",
    "DataFolderLock",
    "DirectorySettings",
    "DirectorySource",
    "Endpoint",
    "IllegalTransition",
    "InvalidRequestError",
    "Kind",
    "Lease",
    "LeaseEnded",
    "LeaseHandedOut",
    "LeaseInfo",
    "LeaseLimitError",
    "LeaseNotFoundError",
    "LeaseRefused",
    "LeaseReset",
    "LeaseSettings",
    "LeaseState",
    "Liveness",
    "LocalProvider",
    "LocalRestore",
    "LocalSettings",
    "NoSnapshotReadyError",
    "NotFoundError",
    "Observer",
    "Pool",
    "PoolDrainingError",
    "PoolError",
    "PoolErrorEvent",
    "PoolEvent",
    "PoolSettings",
    "PoolStatistics",
    "ProgressCallback",
    "Provider",
    "ProviderError",
    "QueueLeft",
    "QueueProgress",
    "QueueProgressCallback",
    "QueueTimeoutError",
    "Resource",
    "Restartable",
    "RestoreFinished",
    "RestoreOutcome",
    "RestoreProgress",
    "RestoreStatus",
    "S3Settings",
    "S3Source",
    "SnapshotFailed",
    "SnapshotInfo",
    "SnapshotReady",
    "SnapshotSettings",
    "SnapshotState",
    "Source",
    "SourceHealth",
    "SourceSettings",
    "TemporaryProviderError",
    "TransformSettings",
    "WarmPoolSettings",
    "default_check_command",
    "default_restore_command",
    "describe_restore",
    "embedded_bin_dir",
    "format_of",
    "run_psql",
    "seal_roles",
]

from typing import TYPE_CHECKING

# Kubernetes provider (branch k8s). Its settings import nothing heavy; the
# provider and the elector load the kubernetes client only when first used,
# so `import pool` stays light for the local provider.
from .providers.kubernetes._settings import (
    ApplicationSettings,
    CaBundleSettings,
    CheckSettings,
    KubernetesSettings,
    LeaderElectionSettings,
    PodSettings,
    ResourceSettings,
    RestoreSettings,
)

__all__ += [
    "ApplicationSettings",
    "CaBundleSettings",
    "CheckSettings",
    "KubernetesProvider",
    "KubernetesSettings",
    "LeaderElectionSettings",
    "LeaderElector",
    "PodSettings",
    "ResourceSettings",
    "RestoreSettings",
]


if TYPE_CHECKING:
    from .providers.kubernetes._leader import LeaderElector
    from .providers.kubernetes._provider import KubernetesProvider


def __getattr__(name: str) -> object:
    if name == "KubernetesProvider":
        from .providers.kubernetes._provider import KubernetesProvider

        return KubernetesProvider
    if name == "LeaderElector":
        from .providers.kubernetes._leader import LeaderElector

        return LeaderElector
    raise AttributeError(f"module 'pool' has no attribute {name!r}")
