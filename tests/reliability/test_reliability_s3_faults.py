"""S3 unavailable, answering 503, or breaking off mid-download, through a fault-injecting proxy.

moto's S3 server runs on loopback behind :class:`faultproxy.FaultProxy`; the
S3 source (real boto3, worker threads) talks to the proxy. Each fault must
come out as a :class:`pool.TemporaryProviderError` (so the pool retries)
whose message names the problem and never the secret key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import boto3
import pytest
import trio
from faultproxy import FaultProxy
from moto.server import ThreadedMotoServer

from pool import Backup, S3Settings, S3Source, TemporaryProviderError

pytestmark = pytest.mark.slow

SECRET = "s3-secret-never-shown"
BUCKET = "aldaas-reliability-faults"  # moto's state is per process: not the pool tests' bucket
BIG = os.urandom(3 * 1024 * 1024)


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="big.sql.gz", Body=BIG)
    try:
        yield port
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def proxied(moto_port: int) -> AsyncIterator[tuple[FaultProxy, S3Source]]:
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy("127.0.0.1", moto_port)
        await nursery.start(proxy.run)
        source = S3Source(
            S3Settings(
                bucket=BUCKET,
                suffix=".sql.gz",
                endpoint_url=f"http://127.0.0.1:{proxy.port}",
                region="us-east-1",
                access_key_id="test",
                secret_access_key=SECRET,
                addressing_style="path",
                chunk_bytes=256 * 1024,
            )
        )
        yield proxy, source
        nursery.cancel_scope.cancel()


async def download(source: S3Source, backup: Backup) -> bytes:
    chunks = []
    async with contextlib.aclosing(source.open(backup)) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return b"".join(chunks)


async def test_if_s3_breaks_off_mid_download_then_the_error_is_temporary_and_a_retry_works(
    moto_port: int,
) -> None:
    """If the link breaks after 512 KB of a 3 MB download, then a temporary error; then it works."""
    async with proxied(moto_port) as (proxy, source):
        (backup,) = await source.list_backups()
        proxy.cut_after = 512 * 1024
        proxy.cut_when = f"GET /{BUCKET}/big.sql.gz".encode()
        with pytest.raises(TemporaryProviderError) as caught:
            await download(source, backup)
        assert proxy.cuts == 1
        assert "big.sql.gz" in str(caught.value)
        assert SECRET not in str(caught.value)
        proxy.cut_after = None
        assert await download(source, backup) == BIG


async def test_if_s3_answers_503_then_the_error_is_temporary_and_names_it(moto_port: int) -> None:
    """If every request gets a 503, then listing and reading fail as temporary, naming the 503."""
    async with proxied(moto_port) as (proxy, source):
        (backup,) = await source.list_backups()
        proxy.mode = "reply_503"
        with pytest.raises(TemporaryProviderError) as listing:
            await source.list_backups()
        with pytest.raises(TemporaryProviderError) as reading:
            await download(source, backup)
        for caught in (listing, reading):
            assert "ServiceUnavailable" in str(caught.value) or "503" in str(caught.value)
            assert SECRET not in str(caught.value)
        assert proxy.cuts >= 2  # boto3's own retries went through the proxy too


async def test_if_s3_is_unreachable_then_the_error_is_temporary_and_says_so(
    moto_port: int,
) -> None:
    """If S3 refuses connections, then listing fails as temporary, saying it cannot reach S3."""
    async with proxied(moto_port) as (proxy, source):
        proxy.mode = "refuse"
        with pytest.raises(TemporaryProviderError) as caught:
            await source.list_backups()
        assert SECRET not in str(caught.value)
        assert proxy.connections >= 1
        proxy.mode = "pass"
        assert [b.key for b in await source.list_backups()] == ["big.sql.gz"]
