"""Settings of the two backup sources: a folder of files and an S3 bucket."""

from __future__ import annotations

import pathlib
import urllib.parse
from typing import Literal

import attrs


def redact_url(url: str | None) -> str:
    """``url`` without any ``user:password@`` part (for reprs, logs and messages)."""
    if not url:
        return repr(url)
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@attrs.frozen(kw_only=True)
class DirectorySettings:
    """A folder of backup files."""

    path: pathlib.Path = pathlib.Path("backups")
    """Folder scanned (recursively) for backups; relative to the broker's working directory."""

    suffix: str = ".sql.gz"
    """Only files whose names end with this are backups (the original's ``s3.suffix``)."""


@attrs.frozen(kw_only=True)
class S3Settings:
    """An S3 (or S3-compatible, e.g. MinIO) bucket of backups, read through boto3."""

    bucket: str = ""
    """Bucket holding the backups; must exist."""

    prefix: str = ""
    """Only keys starting with this are considered (the original's ``s3.prefix``)."""

    suffix: str = ".sql.gz"
    """Only keys ending with this are backups (the original's ``s3.suffix``)."""

    endpoint_url: str | None = attrs.field(default=None, repr=redact_url)
    """``None`` for AWS; e.g. ``http://minio.server:80`` (plain HTTP allowed) for S3-compatibles."""

    region: str | None = None
    """Region name; ``None`` lets boto3 use the standard AWS configuration (env, config file)."""

    access_key_id: str | None = attrs.field(default=None, repr=False)
    """``None`` uses the standard AWS credential chain (``AWS_ACCESS_KEY_ID``, profiles, roles)."""

    secret_access_key: str | None = attrs.field(default=None, repr=False)
    """Secret key paired with ``access_key_id``; never logged."""

    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` suits most self-hosted S3 servers, whose buckets are not DNS names."""

    verify_tls: bool = True
    """Whether to verify the server's TLS certificate for ``https`` endpoints."""

    chunk_bytes: int = 1024 * 1024
    """Bytes per read while streaming a backup: small enough to stay lean, big enough to be fast."""

    connect_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    """Seconds to wait for a connection to S3 to open; 10 s is ample for AWS or a LAN MinIO and
    still notices an unreachable endpoint quickly.
    """

    read_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    """Seconds to wait for the next bytes of an answer (headers or the next piece of a download);
    30 s rides out a slow S3 and still gives up on a black-holed connection within a minute or two.
    """

    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    """Attempts per S3 request, the first included, before the pool sees the error (and retries
    the whole download with back-off); 3 is botocore's standard. A black-holed S3 thus fails a
    request after about ``max_attempts`` times ``read_timeout`` plus botocore's short back-off.
    """
