"""The backup source's health where people look: /readyz's reason, /api/status, `aldaas status`,
the client's "no snapshot ready" message and a metric. A real S3 source against moto's S3
server, over the pool's in-memory provider fake.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from pool_fakes import FakeWorld, Harness, running_pool, settings, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_broker_hooks import FakeGateway

from aldaas import tunnel
from aldaas.broker._broker import Broker
from aldaas.broker._settings import Settings
from aldaas.client._render import status_text
from aldaas.pool import S3Settings, S3Source, SourceSettings, WarmPoolSettings

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-never-shown"
DUMP = b"CREATE TABLE t (i int);\n"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket="health")
    client.put_object(Bucket="health", Key="nightly/1717200000.sql", Body=DUMP)
    try:
        yield url
    finally:
        server.stop()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _s3(endpoint: str, **overrides: Any) -> S3Source:
    values: dict[str, Any] = {
        "bucket": "health",
        "prefix": "nightly/",
        "suffix": ".sql",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": "test",
        "secret_access_key": SECRET,
        "addressing_style": "path",
        "max_attempts": 1,
        "connect_timeout": 2.0,
    }
    values.update(overrides)
    return S3Source(S3Settings(**values))


@asynccontextmanager
async def _broker(source: S3Source) -> AsyncIterator[tuple[Harness, Broker]]:
    pool_settings = settings(
        pool=WarmPoolSettings(size=1), source=SourceSettings(poll_interval=3600.0)
    )
    async with running_pool(FakeWorld(clone_seconds=0.0), source, pool_settings) as h:  # type: ignore[arg-type]
        broker = Broker(Settings(), h.pool)
        broker.gateway = FakeGateway()  # type: ignore[assignment]
        yield h, broker


def _listed(h: Harness) -> bool:
    source = h.pool.statistics().source
    return source.last_success_at is not None or source.last_error is not None


def _metric(broker: Broker, name: str) -> float:
    for family in text_string_to_metric_families(broker.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no sample {name}")


async def test_if_the_endpoint_is_unreachable_then_readyz_status_and_client_say_so() -> None:
    """If S3 cannot be reached on a fresh install, then /readyz names the source failure (not
    "waiting for a backup"), /api/status carries it with no successful listing, and the client's
    refusal says the source fails.
    """
    port = _closed_port()
    async with _broker(_s3(f"http://127.0.0.1:{port}")) as (h, broker):
        await wait_for(lambda: _listed(h), what="a first listing", limit=30)
        ready, reason = broker.is_ready()
        assert not ready
        assert reason.startswith(
            f"No snapshot is ready yet; the backup source fails: cannot reach S3 at "
            f"http://127.0.0.1:{port} (path addressing of s3.endpoint_url "
        )
        source = broker.status()["source"]
        assert source["last_success_at"] is None
        assert source["last_error"].startswith("cannot reach S3 at")
        assert _metric(broker, "aldaas_source_last_success_timestamp_seconds") == 0.0
        with pytest.raises(tunnel.SessionRefused) as refused:
            await broker.open_session({}, lambda _: None)
        assert "the backup source fails (never listed): cannot reach S3" in str(refused.value)


async def test_if_the_prefix_holds_no_backup_then_readyz_says_there_is_none(
    endpoint: str,
) -> None:
    """If the listing works but finds nothing, then /readyz says no backup lies under the prefix."""
    async with _broker(_s3(endpoint, prefix="nothing-here/")) as (h, broker):
        await wait_for(lambda: _listed(h), what="a first listing", limit=30)
        assert broker.is_ready() == (
            False,
            "No snapshot is ready yet; there is no backup in s3://health/nothing-here/*.sql at "
            f"{endpoint}; put one there or fix the source's prefix and suffix.",
        )
        assert broker.status()["source"]["backups_found"] == 0


async def test_if_credentials_are_refused_while_a_snapshot_serves_then_status_shows_it(
    endpoint: str,
) -> None:
    """If S3 starts refusing the credentials while an older snapshot serves, then the broker
    stays ready but /api/status and `aldaas status` show the source's error and its last good
    listing, and the metric keeps the time of that listing.
    """
    async with _broker(_s3(endpoint)) as (h, broker):
        await wait_for(lambda: broker.is_ready()[0], what="a ready snapshot", limit=60)
        good = h.pool.statistics().source.last_success_at
        assert good is not None
        assert _metric(broker, "aldaas_source_last_success_timestamp_seconds") == good
        # moto checks signatures from now on; the source's key "test" is unknown to it.
        _moto_auth(endpoint, "0")
        try:
            h.pool.trigger_refresh()
            await wait_for(
                lambda: h.pool.statistics().source.last_error is not None,
                what="a refused listing",
                limit=30,
            )
        finally:
            _moto_auth(endpoint, "inf")
        status = broker.status()
        assert status["ready"] is True
        error = status["source"]["last_error"]
        assert error.startswith(f"S3 at {endpoint} refused listing bucket 'health' (")
        assert "check the credentials and the bucket policy" in error
        assert status["source"]["last_success_at"] == good
        assert _metric(broker, "aldaas_source_last_success_timestamp_seconds") == good
        text = status_text(status, server="b", now=good + 90)
        assert f"backup source failing (last good listing 1m30s ago): {error}" in text
        assert SECRET not in text


def _moto_auth(endpoint: str, count: str) -> None:
    """Turn moto's request authentication on ("0": from the next request) or off ("inf")."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


async def test_if_the_last_restore_failed_then_readyz_says_so(endpoint: str) -> None:
    """If the only backup fails to restore, then /readyz names that backup and the reason."""
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
    ).put_object(Bucket="health", Key="broken/1717200000.sql", Body=b"FAIL\n")  # fake: exits 1
    async with _broker(_s3(endpoint, prefix="broken/")) as (h, broker):
        await wait_for(
            lambda: h.pool.statistics().snapshots_by_status["failed"] == 1,
            what="a failed snapshot",
            limit=60,
        )
        ready, reason = broker.is_ready()
        assert not ready
        assert reason.startswith(
            "No snapshot is ready yet; the last restore of broken/1717200000.sql failed ("
        )
