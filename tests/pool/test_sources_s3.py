"""The S3 source against moto's S3 server over plain HTTP on loopback (boto3 does real requests)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from aldaas.pool import ProviderError, S3Settings, S3Source, TemporaryProviderError

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-never-shown"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bucket(endpoint: str) -> Any:
    """Bucket ``backups`` with two .sql.gz under ``nightly/``, one elsewhere, one other suffix."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket="backups")
    client.put_object(Bucket="backups", Key="nightly/a.sql.gz", Body=gzip.compress(b"A" * 100))
    client.put_object(Bucket="backups", Key="nightly/b.sql.gz", Body=os.urandom(300_000))
    client.put_object(Bucket="backups", Key="nightly/readme.txt", Body=b"hello")
    client.put_object(Bucket="backups", Key="weekly/c.sql.gz", Body=b"c")
    return client


def _settings(endpoint: str, **overrides: Any) -> S3Settings:
    values: dict[str, Any] = {
        "bucket": "backups",
        "prefix": "nightly/",
        "suffix": ".sql.gz",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": "test",
        "secret_access_key": SECRET,
        "addressing_style": "path",
    }
    values.update(overrides)
    return S3Settings(**values)


async def test_if_keys_match_prefix_and_suffix_then_they_are_listed_with_etags(
    endpoint: str, bucket: Any
) -> None:
    """If keys lie in and out of the prefix and suffix, then only the matching ones are listed."""
    backups = await S3Source(_settings(endpoint)).list_backups()
    assert sorted((b.key, b.size) for b in backups) == [
        ("nightly/a.sql.gz", len(gzip.compress(b"A" * 100))),
        ("nightly/b.sql.gz", 300_000),
    ]
    head = bucket.head_object(Bucket="backups", Key="nightly/b.sql.gz")
    (b,) = [b for b in backups if b.key == "nightly/b.sql.gz"]
    assert b.etag == head["ETag"].strip('"')


async def test_if_an_object_is_opened_then_it_streams_in_chunks(endpoint: str, bucket: Any) -> None:
    """If a 300 kB object is read with 64 KiB chunks, then it arrives whole, chunk by chunk."""
    source = S3Source(_settings(endpoint, chunk_bytes=65536))
    (backup,) = [b for b in await source.list_backups() if b.key == "nightly/b.sql.gz"]
    chunks = [chunk async for chunk in source.open(backup)]
    expected = bucket.get_object(Bucket="backups", Key="nightly/b.sql.gz")["Body"].read()
    assert max(len(c) for c in chunks) == 65536
    assert len(chunks) == 5
    assert b"".join(chunks) == expected


async def test_if_credentials_come_from_the_environment_then_they_are_used(
    endpoint: str, bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If no keys are configured, then boto3's standard AWS_* environment variables are used."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    source = S3Source(_settings(endpoint, access_key_id=None, secret_access_key=None))
    assert len(await source.list_backups()) == 2


async def test_if_the_bucket_is_missing_then_the_error_names_it(endpoint: str, bucket: Any) -> None:
    """If the bucket does not exist, then listing fails naming the bucket and the endpoint."""
    source = S3Source(_settings(endpoint, bucket="no-such-bucket"))
    with pytest.raises(ProviderError) as caught:
        await source.list_backups()
    message = str(caught.value)
    assert message == (
        f"the S3 bucket 'no-such-bucket' does not exist at {endpoint}; create it or fix s3.bucket"
    )


async def test_if_an_object_changed_after_listing_then_opening_it_fails(
    endpoint: str, bucket: Any
) -> None:
    """If an object is overwritten between list and open, then open refuses it (temporarily)."""
    bucket.put_object(Bucket="backups", Key="nightly/moving.sql.gz", Body=b"v1")
    source = S3Source(_settings(endpoint))
    (backup,) = [b for b in await source.list_backups() if b.key == "nightly/moving.sql.gz"]
    bucket.put_object(Bucket="backups", Key="nightly/moving.sql.gz", Body=b"version 2")
    try:
        with pytest.raises(TemporaryProviderError, match="changed after it was listed"):
            async for _ in source.open(backup):
                pass
    finally:
        bucket.delete_object(Bucket="backups", Key="nightly/moving.sql.gz")


def test_if_a_source_is_shown_then_no_secret_appears(endpoint: str) -> None:
    """If settings and source are printed, then neither the secret key nor URL userinfo shows."""
    settings = _settings(endpoint.replace("http://", f"http://user:{SECRET}@"))
    source = S3Source(settings)
    for text in (repr(settings), repr(source), source.description):
        assert SECRET not in text
    assert source.description == f"s3://backups/nightly/*.sql.gz at {endpoint}"
