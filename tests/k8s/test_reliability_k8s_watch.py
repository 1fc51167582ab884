"""Watches expire (410 Gone) under the pool, and a pool is cancelled while watches and calls block."""

from __future__ import annotations

import threading

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes, Fault, JobOutcome
from k8s_reliability import (
    NEW,
    OLD,
    Backups,
    api_client,
    assert_nothing_leaked,
    pool_settings,
    seed_ready_snapshot,
    until,
)
from structlog.testing import capture_logs

from aldaas.pool import Pool
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings


@pytest.mark.slow
async def test_if_watches_expire_mid_restore_then_the_pipeline_relists_and_finishes(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If the API ends every open watch with 410 Gone, twice, while a restore Job runs, then the
    pool re-lists, watches again, and the snapshot becomes ready with nothing left over."""
    hold = threading.Event()
    fake.job_rule = lambda job: JobOutcome(
        hold=hold if "restore" in job["metadata"]["name"] else None
    )
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=1), provider, Backups([OLD, NEW]))
    try:
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                await until(lambda: pool.statistics().restore is not None)
                for _ in range(2):
                    await until(lambda: fake.open_watches >= 1)
                    before = fake.watch_requests
                    fake.expire_watches()
                    await until(lambda: fake.watch_requests > before)  # noqa: B023
                hold.set()
                await until(lambda: pool.statistics().snapshots_by_status["ready"] == 2)
                await assert_nothing_leaked(fake, pool, provider, warm=1)
                nursery.cancel_scope.cancel()
    finally:
        hold.set()
        await provider.aclose()
        api.close()
    assert [e["event"] for e in logs].count("kubernetes.watch_expired") >= 2


async def test_if_the_pool_is_cancelled_while_a_watch_and_calls_block_then_it_ends_promptly(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If the pool is cancelled while its restore waits on a watch and health checks hang in
    the API (no answer for request_timeout_seconds), then it ends at once: no reader thread
    remains and the server sees the watch hang up."""
    settings = attrs.evolve(settings, request_timeout_seconds=600.0)
    hold, hang = threading.Event(), threading.Event()
    fake.job_rule = lambda job: JobOutcome(hold=hold)
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    await seed_ready_snapshot(provider, "snap-old", OLD)
    pool = Pool(pool_settings(size=1), provider, Backups([OLD, NEW]))
    stuck = Fault("GET", "/pods/aldaas-clone-", code=None, hold=hang, times=10**6)
    try:
        # The bound only turns a hang into a failure: a blocked call would hold the pool for
        # request_timeout_seconds (600 s) if cancellation waited for its thread.
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                await until(lambda: pool.statistics().clones["warm"] == 1)
                await until(lambda: pool.statistics().restore is not None)
                await until(lambda: fake.open_watches >= 1 and provider.watch_threads >= 1)
                fake.faults.append(stuck)
                await until(lambda: stuck.hits >= 1)
                nursery.cancel_scope.cancel()
            assert provider.watch_threads == 0
            await until(lambda: fake.open_watches == 0)
    finally:
        hang.set()
        hold.set()
        await provider.aclose()
        api.close()
