"""Backups from an S3 bucket (AWS or S3-compatible such as MinIO). The only module importing boto3.

boto3 is synchronous: every call runs in a worker thread
(``trio.to_thread.run_sync``), and an object's body is read a chunk per call,
so a backup is never held in memory whole.
"""

from __future__ import annotations

import datetime
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import structlog
import trio
import urllib3.exceptions

from .._provider import Backup, ProviderError, Source, TemporaryProviderError
from ._settings import S3Settings, is_ip_host, redact_url

log = structlog.get_logger("aldaas.pool")

_TEMPORARY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
)


def _safe_endpoint(url: str | None) -> str:
    """The endpoint for messages: ``AWS S3`` or the URL without any user:password@ part."""
    return redact_url(url) if url else "AWS S3"


def key_timestamp(key: str, suffix: str) -> float | None:
    """The time in ``key``'s file name: epoch seconds (postgres-operator) or ISO 8601; or None."""
    name = key.rsplit("/", 1)[-1]
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    if name.isdigit() and len(name) <= 12:
        return float(name)
    try:
        when = datetime.datetime.fromisoformat(name)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


class S3Source:
    """A :class:`~pool.Source` over ``s3://bucket/prefix`` keys ending with ``suffix``.

    Credentials come from the settings or, when those are unset, from boto3's
    standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
    instance roles). They never appear in ``repr``, logs or errors.
    """

    def __init__(self, settings: S3Settings) -> None:
        if not settings.bucket:
            raise ProviderError("the S3 source has no bucket; set s3.bucket")
        if settings.addressing_style == "virtual" and is_ip_host(settings.endpoint_url):
            raise ProviderError(
                f"s3.addressing_style is 'virtual' but s3.endpoint_url "
                f"{redact_url(settings.endpoint_url)} is an IP address, which cannot carry the "
                "bucket as a host name; set s3.addressing_style: path"
            )
        if settings.addressing_style == "virtual" and "." in settings.bucket:
            raise ProviderError(
                f"s3.addressing_style is 'virtual' but bucket {settings.bucket!r} has dots, which "
                "break the host name and its TLS certificate; set s3.addressing_style: path"
            )
        if settings.session_token and not settings.access_key_id:
            raise ProviderError(
                "s3.session_token is set without s3.access_key_id and s3.secret_access_key; "
                "set the three together (temporary credentials come as a set)"
            )
        if bool(settings.access_key_id) != bool(settings.secret_access_key):
            raise ProviderError(
                "only one of s3.access_key_id and s3.secret_access_key is set; set both, or "
                "neither to use the standard AWS credential chain"
            )
        if settings.ca_bundle is not None and not settings.ca_bundle.is_file():
            raise ProviderError(
                f"s3.ca_bundle {str(settings.ca_bundle)!r} is not a readable file; mount the "
                "PEM file of the CA there or unset s3.ca_bundle"
            )
        self._settings = settings
        self._client: Any = None
        self._client_lock = trio.Lock()
        if not settings.verify_tls:
            # urllib3 would print a two-line warning per request into the JSON log: say it
            # once, here, as an event.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
            log.warning(
                "source.tls_unverified",
                source=self.description,
                hint="s3.verify_tls is false: anyone on the path can serve backups; set "
                "s3.ca_bundle for a private CA instead",
            )

    def __repr__(self) -> str:
        return f"S3Source({self.description!r})"

    @property
    def description(self) -> str:
        where = _safe_endpoint(self._settings.endpoint_url)
        s = self._settings
        return f"s3://{s.bucket}/{s.prefix}*{s.suffix} at {where}"

    def _make_client(self) -> Any:
        s = self._settings
        session = boto3.session.Session(
            aws_access_key_id=s.access_key_id,
            aws_secret_access_key=s.secret_access_key,
            aws_session_token=s.session_token,
            region_name=s.region,
        )
        config = botocore.config.Config(
            s3={"addressing_style": s.addressing_style},
            retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )
        # verify=None (not True) leaves botocore's own choice: AWS_CA_BUNDLE, the profile's
        # ca_bundle, else the bundled CAs.
        verify: bool | str | None = None
        if not s.verify_tls:
            verify = False
        elif s.ca_bundle is not None:
            verify = str(s.ca_bundle)
        return session.client("s3", endpoint_url=s.endpoint_url, verify=verify, config=config)

    async def _get_client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(self._make_client)
        return self._client

    async def list_backups(self) -> Sequence[Backup]:
        client = await self._get_client()
        return await trio.to_thread.run_sync(self._list, client)

    def _list(self, client: Any) -> list[Backup]:
        s = self._settings
        found: list[Backup] = []
        skipped: list[str] = []
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=s.bucket, Prefix=s.prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    if key.endswith("/") or not key.endswith(s.suffix):
                        continue
                    modified = item["LastModified"].timestamp()
                    if s.order == "key_timestamp":
                        stamped = key_timestamp(key, s.suffix)
                        if stamped is None:
                            skipped.append(key)
                            continue
                        modified = stamped
                    found.append(
                        Backup(
                            key=key,
                            etag=str(item.get("ETag", "")).strip('"'),
                            size=int(item["Size"]),
                            modified=modified,
                        )
                    )
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error("listing", None, exc) from None
        except botocore.exceptions.ClientError as exc:
            raise self._error("listing", None, exc) from None
        if skipped:
            log.warning(
                "source.keys_without_timestamp",
                count=len(skipped),
                example=skipped[0][:200],
                hint="s3.order is key_timestamp: only keys named by epoch seconds or an ISO 8601 "
                "time count",
            )
        return found

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        """Stream the object (only the version listed: ``IfMatch`` its ETag) in chunks."""
        client = await self._get_client()
        s = self._settings

        def get() -> Any:
            kwargs: dict[str, str] = {"Bucket": s.bucket, "Key": backup.key}
            if backup.etag:
                kwargs["IfMatch"] = f'"{backup.etag}"'
            return client.get_object(**kwargs)["Body"]

        try:
            body = await trio.to_thread.run_sync(get)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._error("reading", backup.key, exc) from None
        try:
            while True:
                try:
                    chunk = await trio.to_thread.run_sync(body.read, s.chunk_bytes)
                except botocore.exceptions.ReadTimeoutError:
                    raise TemporaryProviderError(
                        f"reading backup {backup.key!r} from {self.description} stalled: no "
                        f"data for s3.read_timeout ({s.read_timeout:g} s); it will be retried "
                        "(raise s3.read_timeout if S3 is only slow)",
                        delay=5.0,
                    ) from None
                except (botocore.exceptions.BotoCoreError, OSError) as exc:
                    raise TemporaryProviderError(
                        f"reading backup {backup.key!r} from {self.description} broke off "
                        f"({type(exc).__name__}); it will be retried",
                        delay=5.0,
                    ) from None
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def _tried(self, exc: Exception) -> str:
        """The host botocore tried and why: ``backup.localhost:18333 (virtual-host
        addressing of s3.endpoint_url http://localhost:18333)``.
        """
        s = self._settings
        url = getattr(exc, "kwargs", {}).get("endpoint_url")
        parts = urllib.parse.urlsplit(str(url)) if url else None
        if parts is None or not parts.hostname:
            return _safe_endpoint(s.endpoint_url)
        host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        configured = urllib.parse.urlsplit(s.endpoint_url).hostname if s.endpoint_url else None
        virtual = parts.hostname != configured and parts.hostname.startswith(f"{s.bucket}.")
        style = "virtual-host" if virtual else "path"
        origin = f"s3.endpoint_url {_safe_endpoint(s.endpoint_url)}" if s.endpoint_url else "AWS"
        return f"{parts.scheme}://{host} ({style} addressing of {origin})"

    def _error(self, doing: str, key: str | None, exc: Exception) -> ProviderError:
        s = self._settings
        where = _safe_endpoint(s.endpoint_url)
        what = f"backup {key!r} in bucket {s.bucket!r}" if key else f"bucket {s.bucket!r}"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return ProviderError(
                f"no S3 credentials for {where}; set s3.access_key_id and s3.secret_access_key "
                "or the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables"
            )
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket":
                return ProviderError(
                    f"the S3 bucket {s.bucket!r} does not exist at {where}; "
                    "create it or fix s3.bucket"
                )
            if code in ("NoSuchKey", "404"):
                return TemporaryProviderError(f"{what} is gone from {where}; it will be skipped")
            if code in ("PreconditionFailed", "412"):
                return TemporaryProviderError(
                    f"{what} changed after it was listed; it will be picked up again at the "
                    "next poll"
                )
            if code in _ACCESS_CODES:
                return ProviderError(
                    f"S3 at {where} refused {doing} {what} ({code}); check the credentials "
                    "and the bucket policy"
                )
            if code in _TEMPORARY_CODES or status >= 500:
                return TemporaryProviderError(
                    f"S3 at {where} failed {doing} {what} ({code or status}); will retry",
                    delay=5.0,
                )
            return ProviderError(f"S3 at {where} failed {doing} {what} ({code or status})")
        tries = f"{s.max_attempts} attempt{'s' if s.max_attempts != 1 else ''}"
        tried = self._tried(exc)
        if isinstance(exc, botocore.exceptions.SSLError):
            reason = " ".join(str(getattr(exc, "kwargs", {}).get("error", "")).split())[:200]
            return TemporaryProviderError(
                f"the TLS certificate of {tried} was not accepted while {doing} {what} "
                f"({reason or 'certificate verify failed'}); set s3.ca_bundle (or AWS_CA_BUNDLE) "
                "to the PEM file of the CA that signed it",
                delay=5.0,
            )
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return TemporaryProviderError(
                f"S3 at {tried} did not answer within s3.read_timeout ({s.read_timeout:g} s, "
                f"{tries}) while {doing} {what}; will retry (raise s3.read_timeout if S3 is "
                "only slow)",
                delay=5.0,
            )
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
            return TemporaryProviderError(
                f"cannot connect to S3 at {tried} within s3.connect_timeout "
                f"({s.connect_timeout:g} s, {tries}) while {doing} {what}; check "
                "s3.endpoint_url and the network",
                delay=5.0,
            )
        if isinstance(
            exc,
            # Refused, reset, closed mid-response or timed out: the network, not the settings.
            botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError,
        ):
            return TemporaryProviderError(
                f"cannot reach S3 at {tried} while {doing} {what}; check s3.endpoint_url, "
                "s3.addressing_style and the network",
                delay=5.0,
            )
        return ProviderError(
            f"S3 at {where} failed {doing} {what} ({type(exc).__name__}); check the s3 settings"
        )


def _implements_source(source: S3Source) -> Source:
    return source  # mypy proves S3Source satisfies the Source protocol
