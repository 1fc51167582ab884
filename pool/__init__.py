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
