"""Backups from an S3 bucket (AWS or S3-compatible such as MinIO). The only module importing boto3.

boto3 is synchronous: every call runs in a worker thread
(``trio.to_thread.run_sync``), and an object's body is read a chunk per call,
so a backup is never held in memory whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import trio

from .._provider import Backup, ProviderError, Source, TemporaryProviderError
from ._settings import S3Settings, redact_url

_TEMPORARY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
)


def _safe_endpoint(url: str | None) -> str:
    """The endpoint for messages: ``AWS S3`` or the URL without any user:password@ part."""
    return redact_url(url) if url else "AWS S3"


class S3Source:
    """A :class:`~pool.Source` over ``s3://bucket/prefix`` keys ending with ``suffix``.

    Credentials come from the settings or, when those are unset, from boto3's
    standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
    instance roles). They never appear in ``repr``, logs or errors.
    """

    def __init__(self, settings: S3Settings) -> None:
        if not settings.bucket:
            raise ProviderError("the S3 source has no bucket; set s3.bucket")
        self._settings = settings
        self._client: Any = None
        self._client_lock = trio.Lock()

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
            region_name=s.region,
        )
        config = botocore.config.Config(
            s3={"addressing_style": s.addressing_style},
            retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )
        return session.client("s3", endpoint_url=s.endpoint_url, verify=s.verify_tls, config=config)

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
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=s.bucket, Prefix=s.prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    if key.endswith("/") or not key.endswith(s.suffix):
                        continue
                    found.append(
                        Backup(
                            key=key,
                            etag=str(item.get("ETag", "")).strip('"'),
                            size=int(item["Size"]),
                            modified=item["LastModified"].timestamp(),
                        )
                    )
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error("listing", None, exc) from None
        except botocore.exceptions.ClientError as exc:
            raise self._error("listing", None, exc) from None
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
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return TemporaryProviderError(
                f"S3 at {where} did not answer within s3.read_timeout ({s.read_timeout:g} s, "
                f"{tries}) while {doing} {what}; will retry (raise s3.read_timeout if S3 is "
                "only slow)",
                delay=5.0,
            )
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
            return TemporaryProviderError(
                f"cannot connect to S3 at {where} within s3.connect_timeout "
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
                f"cannot reach S3 at {where} while {doing} {what}; check s3.endpoint_url and "
                "the network",
                delay=5.0,
            )
        return ProviderError(
            f"S3 at {where} failed {doing} {what} ({type(exc).__name__}); check the s3 settings"
        )


def _implements_source(source: S3Source) -> Source:
    return source  # mypy proves S3Source satisfies the Source protocol
