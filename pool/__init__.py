"""The warm pool: backups → verified snapshots → warm clones → leases.

Pure pool logic written against two small interfaces (:class:`Provider`,
:class:`Source`); the local and Kubernetes providers and the directory and S3
sources are its I/O edges.
"""

from ._directory import DirectorySource
from ._formats import BackupFormat, default_check_command, default_restore_command, format_of
from ._local import LocalProvider
from ._local_settings import DirectorySettings, LocalSettings, S3Settings
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
from ._s3 import S3Source

__all__ = [
    "Backup",
    "BackupFormat",
    "Command",
    "ConflictError",
    "DirectorySettings",
    "DirectorySource",
    "Endpoint",
    "Kind",
    "LocalProvider",
    "LocalSettings",
    "NotFoundError",
    "ProgressCallback",
    "Provider",
    "ProviderError",
    "Resource",
    "RestoreProgress",
    "S3Settings",
    "S3Source",
    "Source",
    "TemporaryProviderError",
    "default_check_command",
    "default_restore_command",
    "format_of",
]
