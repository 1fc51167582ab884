"""What "newest backup" means (s3.order), against moto's S3 server and the pool's provider fake:
an old dump re-uploaded or mirrored never rolls the pool back, whichever order is chosen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import trio
from moto.server import ThreadedMotoServer
from pool_fakes import FakeWorld, Harness, running_pool, settings, wait_for

from aldaas.pool import S3Settings, S3Source, SourceSettings, WarmPoolSettings
from aldaas.pool.sources._s3 import key_timestamp

pytestmark = pytest.mark.slow

OLD, NEW = "logical_backups/1717200000.sql", "logical_backups/1717286400.sql"


@pytest.fixture
def bucket() -> Iterator[tuple[str, Any]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket="order")
    try:
        yield endpoint, client
    finally:
        server.stop()


def _source(endpoint: str, order: str) -> S3Source:
    return S3Source(
        S3Settings(
            bucket="order",
            prefix="logical_backups/",
            suffix=".sql",
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="test",
            secret_access_key="test",
            addressing_style="path",
            order=order,  # type: ignore[arg-type]
        )
    )


def _pool_settings() -> Any:
    return settings(pool=WarmPoolSettings(size=1), source=SourceSettings(poll_interval=3600.0))


def _ready_keys(h: Harness) -> list[str]:
    return [s.backup_key for s in h.pool.statistics().snapshots if s.status == "ready"]


async def _settle(h: Harness) -> None:
    """Poll the source now, and wait until the pipeline is idle again."""
    before = h.pool.statistics().source.last_success_at
    h.pool.trigger_refresh()
    await wait_for(
        lambda: (
            h.pool.statistics().source.last_success_at != before
            and h.pool.statistics().restore is None
            and all(s.status in ("ready", "failed") for s in h.pool.statistics().snapshots)
        ),
        what="a poll and an idle pipeline",
        limit=60,
    )


def test_key_timestamps_are_epoch_seconds_or_iso_8601() -> None:
    """If a key is named by epoch seconds or an ISO 8601 time, then that is its time; else None."""
    assert key_timestamp("a/b/1717200000.sql.gz", ".sql.gz") == 1717200000.0
    assert key_timestamp("x/2024-06-01T00:00:00Z.dump", ".dump") == 1717200000.0
    assert key_timestamp("x/20240601T000000.dump", ".dump") == 1717200000.0
    assert key_timestamp("x/nightly.sql", ".sql") is None


async def test_if_an_old_epoch_named_dump_is_reuploaded_then_key_order_keeps_the_newer(
    bucket: tuple[str, Any],
) -> None:
    """If s3.order is key_timestamp and the older epoch-named dump is uploaded again (now the
    newest by LastModified), then the pool stays on the snapshot of the newer key.
    """
    endpoint, client = bucket
    client.put_object(Bucket="order", Key=NEW, Body=b"-- new\n")
    await trio.sleep(1.1)  # LastModified has one-second resolution
    client.put_object(Bucket="order", Key=OLD, Body=b"-- old\n")  # newest by LastModified
    client.put_object(Bucket="order", Key="logical_backups/latest.sql", Body=b"-- no time\n")
    async with running_pool(FakeWorld(), _source(endpoint, "key_timestamp"), _pool_settings()) as h:  # type: ignore[arg-type]
        await wait_for(lambda: _ready_keys(h) == [NEW], what="the newer key restored", limit=60)
        await trio.sleep(1.1)
        client.put_object(Bucket="order", Key=OLD, Body=b"-- old, mirrored again\n")
        await _settle(h)
        assert [(s.backup_key, s.status) for s in h.pool.statistics().snapshots] == [(NEW, "ready")]


async def test_if_a_restored_dump_is_reuploaded_then_last_modified_order_does_not_roll_back(
    bucket: tuple[str, Any],
) -> None:
    """If s3.order is last_modified and a dump the pool already restored is uploaded again with
    the same content after a newer one, then the pool stays on the newer snapshot.
    """
    endpoint, client = bucket
    client.put_object(Bucket="order", Key=OLD, Body=b"-- old\n")
    async with running_pool(FakeWorld(), _source(endpoint, "last_modified"), _pool_settings()) as h:  # type: ignore[arg-type]
        await wait_for(lambda: _ready_keys(h) == [OLD], what="the old dump restored", limit=60)
        await trio.sleep(1.1)
        client.put_object(Bucket="order", Key=NEW, Body=b"-- new\n")
        await _settle(h)
        await wait_for(lambda: _ready_keys(h) == [NEW], what="the old snapshot pruned", limit=60)
        await trio.sleep(1.1)
        client.put_object(Bucket="order", Key=OLD, Body=b"-- old\n")  # same content, same ETag
        await _settle(h)
        assert _ready_keys(h) == [NEW]
        assert [s.status for s in h.pool.statistics().snapshots] == ["ready"]
