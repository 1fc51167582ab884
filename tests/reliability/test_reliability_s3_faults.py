"""S3 unavailable, answering 503, silent, or breaking off mid-download, through a fault proxy.

moto's S3 server runs on loopback behind :class:`faultproxy.FaultProxy`; the
S3 source (real boto3, worker threads) talks to the proxy. Each fault must
come out as a :class:`pool.TemporaryProviderError` (so the pool retries)
whose message names the problem and never the secret key. A silent S3 (a
black hole: connections accepted, nothing answered) must end within the
``s3.read_timeout`` times ``s3.max_attempts`` the settings promise, not hang.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
import trio
from faultproxy import FaultProxy
from moto.server import ThreadedMotoServer
from pool_fakes import FakeWorld, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.pool import (
    Backup,
    S3Settings,
    S3Source,
    SnapshotFailed,
    SourceSettings,
    TemporaryProviderError,
    WarmPoolSettings,
)

pytestmark = pytest.mark.slow

SECRET = "s3-secret-never-shown"
BUCKET = "aldaas-reliability-faults"  # moto's state is per process: not the pool tests' bucket
BIG = os.urandom(3 * 1024 * 1024)
SILENT = 0.5
"""s3.read_timeout for the black-hole tests: short, so a silent S3 costs seconds, not minutes."""
LIMIT = 60.0
"""A bound so a hang fails the test instead of the CI job (never a timing assertion)."""


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
async def proxied(moto_port: int, **s3: Any) -> AsyncIterator[tuple[FaultProxy, S3Source]]:
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy("127.0.0.1", moto_port)
        await nursery.start(proxy.run)
        source = S3Source(s3_settings(proxy, **s3))
        yield proxy, source
        nursery.cancel_scope.cancel()


def s3_settings(proxy: FaultProxy, **overrides: Any) -> S3Settings:
    given: dict[str, Any] = {
        "bucket": BUCKET,
        "suffix": ".sql.gz",
        "endpoint_url": f"http://127.0.0.1:{proxy.port}",
        "region": "us-east-1",
        "access_key_id": "test",
        "secret_access_key": SECRET,
        "addressing_style": "path",
        "chunk_bytes": 256 * 1024,
    }
    return S3Settings(**(given | overrides))


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


async def test_if_s3_accepts_but_never_answers_then_the_read_times_out_as_a_temporary_error(
    moto_port: int,
) -> None:
    """If S3 takes the request and stays silent, then each attempt ends at s3.read_timeout."""
    async with proxied(moto_port, read_timeout=SILENT, max_attempts=2) as (proxy, source):
        (backup,) = await source.list_backups()
        proxy.stall_after = 0  # not even the headers come back
        proxy.cut_when = f"GET /{BUCKET}/big.sql.gz".encode()
        with trio.fail_after(LIMIT), pytest.raises(TemporaryProviderError) as caught:
            await download(source, backup)
        message = str(caught.value)
        assert "s3.read_timeout (0.5 s, 2 attempts)" in message
        assert "big.sql.gz" in message
        assert SECRET not in message
        assert proxy.stalls == 2  # botocore tried again on a new connection, which hung too
        proxy.stall_after = None
        assert await download(source, backup) == BIG


async def test_if_s3_goes_silent_mid_download_then_the_read_times_out_as_a_temporary_error(
    moto_port: int,
) -> None:
    """If S3 stops sending after 512 KB of 3 MB and holds the link, then a timeout error, not a hang."""
    async with proxied(moto_port, read_timeout=SILENT) as (proxy, source):
        (backup,) = await source.list_backups()
        proxy.stall_after = 512 * 1024
        proxy.cut_when = f"GET /{BUCKET}/big.sql.gz".encode()
        with trio.fail_after(LIMIT), pytest.raises(TemporaryProviderError) as caught:
            await download(source, backup)
        message = str(caught.value)
        assert "stalled" in message
        assert "s3.read_timeout (0.5 s)" in message
        assert SECRET not in message
        assert proxy.stalls == 1


async def test_if_s3_is_a_black_hole_then_listing_times_out_as_a_temporary_error(
    moto_port: int,
) -> None:
    """If every connection is accepted and never answered, then listing ends naming the timeout."""
    async with proxied(moto_port, read_timeout=SILENT, max_attempts=1) as (proxy, source):
        proxy.mode = "blackhole"
        with trio.fail_after(LIMIT), pytest.raises(TemporaryProviderError) as caught:
            await source.list_backups()
        assert "did not answer within s3.read_timeout (0.5 s, 1 attempt)" in str(caught.value)
        assert SECRET not in str(caught.value)
        assert proxy.stalls == 1


async def test_if_s3_never_takes_the_connection_then_the_connect_timeout_ends_it() -> None:
    """If the endpoint's accept queue is full (SYNs dropped), then connecting ends at s3.connect_timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # room for one pending connection, never accepted
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # takes that room
            source = S3Source(
                S3Settings(
                    bucket=BUCKET,
                    endpoint_url=f"http://127.0.0.1:{port}",
                    region="us-east-1",
                    access_key_id="test",
                    secret_access_key=SECRET,
                    addressing_style="path",
                    connect_timeout=SILENT,
                    max_attempts=1,
                )
            )
            with trio.fail_after(LIMIT), pytest.raises(TemporaryProviderError) as caught:
                await source.list_backups()
    message = str(caught.value)
    assert "cannot connect to S3 at http://127.0.0.1:" in message
    assert "within s3.connect_timeout (0.5 s, 1 attempt)" in message
    assert SECRET not in message


async def test_if_s3_stays_silent_on_every_download_then_the_pool_fails_the_snapshot(
    moto_port: int, mock_clock: MockClock
) -> None:
    """If each download of a new backup hangs, then the pool retries it and records the timeout."""
    # The pool's back-off (5 s, then 10 s) runs on a mock clock going 20x real time; the read
    # timeouts are real, in boto3's worker threads.
    mock_clock.rate = 20.0
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{moto_port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    )
    prefix = "pool-silent/"
    await trio.to_thread.run_sync(
        lambda: client.put_object(Bucket=BUCKET, Key=f"{prefix}a.sql.gz", Body=b"a")
    )
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy("127.0.0.1", moto_port)
        await nursery.start(proxy.run)
        source = S3Source(s3_settings(proxy, prefix=prefix, read_timeout=SILENT, max_attempts=1))
        pool_settings = settings(
            pool=WarmPoolSettings(size=1, max_provisioning=1),
            source=SourceSettings(poll_interval=3600.0),
        )
        async with running_pool(FakeWorld(), source, pool_settings) as h:
            await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="warm")
            good = h.pool.statistics().newest_ready_snapshot
            await trio.to_thread.run_sync(
                lambda: client.put_object(Bucket=BUCKET, Key=f"{prefix}b.sql.gz", Body=BIG)
            )
            proxy.stall_after = 0
            proxy.cut_when = f"GET /{BUCKET}/{prefix}b.sql.gz".encode()
            h.pool.trigger_refresh()
            with trio.fail_after(LIMIT * mock_clock.rate):
                await wait_for(
                    lambda: any(isinstance(e, SnapshotFailed) for e in h.events), what="given up"
                )
            assert proxy.stalls == 3  # the pool's 3 attempts, each hung until the read timeout
            (failed,) = [s for s in h.pool.statistics().snapshots if s.status == "failed"]
            assert failed.reason is not None
            assert failed.reason.startswith("gave up after 3 attempts: S3 at")
            assert "did not answer within s3.read_timeout (0.5 s, 1 attempt)" in failed.reason
            assert SECRET not in failed.reason
            assert h.pool.statistics().newest_ready_snapshot == good
            lease = await h.pool.acquire()
            assert lease.snapshot == good
        nursery.cancel_scope.cancel()
