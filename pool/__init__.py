"""The warm pool: backups → verified snapshots → warm clones → leases.

Pure pool logic written against two small interfaces (:class:`Provider`,
:class:`Source`); the local and Kubernetes providers and the directory and S3
sources are its I/O edges.
"""

from ._provider import (
    Backup,
    Command,
    ConflictError,
    Endpoint,
    Kind,
    NotFoundError,
    ProgressCallback,
    Provider,
    ProviderError,
    Resource,
    RestoreProgress,
    Source,
    TemporaryProviderError,
)

__all__ = [
    "Backup",
    "Command",
    "ConflictError",
    "Endpoint",
    "Kind",
    "NotFoundError",
    "ProgressCallback",
    "Provider",
    "ProviderError",
    "Resource",
    "RestoreProgress",
    "Source",
    "TemporaryProviderError",
]

from typing import TYPE_CHECKING

# Kubernetes provider (branch k8s). Its settings import nothing heavy; the
# provider and the elector load the kubernetes client only when first used,
# so `import pool` stays light for the local provider.
from ._kubernetes_settings import (
    ApplicationSettings,
    CheckSettings,
    KubernetesSettings,
    LeaderElectionSettings,
    ResourceSettings,
    RestoreSettings,
)

__all__ += [
    "ApplicationSettings",
    "CheckSettings",
    "KubernetesProvider",
    "KubernetesSettings",
    "LeaderElectionSettings",
    "LeaderElector",
    "ResourceSettings",
    "RestoreSettings",
]


if TYPE_CHECKING:
    from ._kubernetes import KubernetesProvider, LeaderElector


def __getattr__(name: str) -> object:
    if name in ("KubernetesProvider", "LeaderElector"):
        from . import _kubernetes

        return getattr(_kubernetes, name)
    raise AttributeError(f"module 'pool' has no attribute {name!r}")
