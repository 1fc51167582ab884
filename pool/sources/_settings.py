"""Settings of the two backup sources: a folder of files and an S3 bucket."""

from __future__ import annotations

import ipaddress
import pathlib
import re
import urllib.parse
from typing import Any, Literal

import attrs


def redact_url(url: str | None) -> str:
    """``url`` without any ``user:password@`` part (for reprs, logs and messages)."""
    if not url:
        return repr(url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<not a URL>"
    # Everything after the last "@" of the host part: never a password, even in a broken URL.
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_endpoint_url(_: Any, __: Any, url: str | None) -> None:
    if url is None:
        return
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise ValueError(
            f"s3.endpoint_url {shown} is not a URL; expected scheme://host[:port], "
            "e.g. https://minio.example:9000"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"s3.endpoint_url {shown} needs a scheme and a host (http:// or https:// then the "
            "host, e.g. http://127.0.0.1:9000), or leave it unset for AWS S3"
        )
    if parts.query or parts.fragment:
        raise ValueError(
            f"s3.endpoint_url {shown} has a query or fragment; give scheme://host[:port] and "
            "put the key's leading folders in s3.prefix"
        )


_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _check_region(_: Any, __: Any, region: str | None) -> None:
    if region is not None and not _REGION.fullmatch(region):
        raise ValueError(
            f"s3.region {region[:64]!r} is not a region name; expected lowercase letters, digits "
            "and dashes such as 'us-east-1', or leave it unset for the standard AWS configuration"
        )


def _check_prefix(_: Any, __: Any, prefix: str) -> None:
    if prefix.startswith("s3://"):
        raise ValueError(
            f"s3.prefix {prefix[:200]!r} is a URL; give the bucket in s3.bucket and only the "
            "key prefix here (e.g. 'spilo/acid/logical_backups/')"
        )
    if prefix.startswith("/"):
        raise ValueError(
            f"s3.prefix {prefix[:200]!r} starts with '/', which S3 keys do not; write "
            f"{prefix.lstrip('/')[:200]!r}"
        )


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def _check_bucket(_: Any, __: Any, bucket: str) -> None:
    if bucket and not _BUCKET.fullmatch(bucket):
        raise ValueError(
            f"s3.bucket {bucket[:100]!r} is not a bucket name; expected up to 255 letters, "
            "digits, dots, dashes or underscores, without 's3://' or a '/'"
        )


def is_ip_host(url: str | None) -> bool:
    """Whether ``url``'s host is an IP address (virtual-host addressing cannot work there)."""
    host = urllib.parse.urlsplit(url).hostname if url else None
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


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

    bucket: str = attrs.field(default="", validator=_check_bucket)
    """Bucket holding the backups; must exist."""

    prefix: str = attrs.field(default="", validator=_check_prefix)
    """Only keys starting with this are considered (the original's ``s3.prefix``); no leading
    ``/``.
    """

    suffix: str = ".sql.gz"
    """Only keys ending with this are backups (the original's ``s3.suffix``)."""

    endpoint_url: str | None = attrs.field(
        default=None, repr=redact_url, validator=_check_endpoint_url
    )
    """``None`` for AWS; e.g. ``http://minio.server:80`` (plain HTTP allowed) for S3-compatibles.
    Checked at start: ``http`` or ``https``, a host, an optional port, nothing else.
    """

    region: str | None = attrs.field(default=None, validator=_check_region)
    """Region name; ``None`` lets boto3 use the standard AWS configuration (env, config file)."""

    access_key_id: str | None = attrs.field(default=None, repr=False)
    """``None`` uses the standard AWS credential chain (``AWS_ACCESS_KEY_ID``, profiles, roles)."""

    secret_access_key: str | None = attrs.field(default=None, repr=False)
    """Secret key paired with ``access_key_id``; never logged."""

    session_token: str | None = attrs.field(default=None, repr=False)
    """Session token of temporary credentials (STS), paired with the two keys above; ``None``
    for long-lived keys. Never logged.
    """

    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` suits most self-hosted S3 servers, whose buckets are not DNS names."""

    verify_tls: bool = True
    """Whether to verify the server's TLS certificate for ``https`` endpoints. Turning it off
    is logged once at start (``source.tls_unverified``); prefer ``ca_bundle`` for a private CA.
    """

    ca_bundle: pathlib.Path | None = None
    """PEM file of the CA certificates that ``https`` endpoints are verified against (a private
    CA of MinIO or SeaweedFS). ``None`` keeps botocore's default: the ``AWS_CA_BUNDLE``
    environment variable if set, else the bundled public CAs.
    """

    order: Literal["last_modified", "key_timestamp"] = "last_modified"
    """What "newest backup" means. ``last_modified``: the object's S3 LastModified, which works
    with any naming but moves when an old dump is re-uploaded or mirrored (``mc mirror``, a bucket
    copy). ``key_timestamp``: the time in the key's file name, either epoch seconds as
    postgres-operator writes them (``logical_backups/1717200000.sql.gz``) or an ISO 8601 time
    (``2024-06-01T02:00:00Z.sql.gz``); keys without one are skipped. Either way, a backup whose
    content (ETag) is already restored is never restored again as "newest".
    """

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
