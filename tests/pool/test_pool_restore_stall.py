"""Restore progress while the backup stream stalls: the rate and ETA decay, status says
"stalled for N s", and logs, messages and the client count in the same unit (MiB).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import structlog
import trio
from pool_fakes import FakeSource, FakeWorld, running_pool, settings, wait_for
from trio.testing import MockClock

from aldaas.broker._broker import Broker
from aldaas.broker._settings import Settings
from aldaas.client._render import status_text
from aldaas.pool import Backup, NoSnapshotReadyError, WarmPoolSettings


class StallingSource(FakeSource):
    """A FakeSource whose stream stops after its first chunk until ``resume`` is set (a
    black-holed download before the read timeout fires)."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = trio.Event()

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        first = True
        async for chunk in super().open(backup):
            yield chunk
            if first:
                first = False
                await self.resume.wait()


async def test_if_the_stream_stalls_then_rate_and_eta_decay_and_status_says_stalled(
    autojump_clock: MockClock,
) -> None:
    """If no bytes arrive for 30 s, then the restore's rate falls, its ETA grows, status and
    the client show "stalled for 30s", and a refused acquire says so in MiB.
    """
    source = StallingSource()
    source.put("big.sql", b"-- x\n" * 2000, modified=1.0)  # 10 kB in 1,000-byte chunks
    world = FakeWorld()
    world.restore_seconds_per_chunk = 0.5
    async with running_pool(world, source, settings(pool=WarmPoolSettings(size=1))) as h:
        await wait_for(
            lambda: (r := h.pool.statistics().restore) is not None and r.progress.done_bytes > 0,
            what="the first chunk",
        )
        before = h.pool.statistics().restore
        assert before is not None
        assert before.stalled_seconds == 0.0
        await trio.sleep(30)
        during = h.pool.statistics().restore
        assert during is not None
        assert during.progress.done_bytes == before.progress.done_bytes
        assert during.stalled_seconds >= 30
        assert during.progress.rate_bytes_per_second < before.progress.rate_bytes_per_second
        assert (during.progress.eta_seconds or 0) > (before.progress.eta_seconds or 0)
        broker = Broker(Settings(), h.pool)
        text = status_text(broker.status(), server="s", now=0)
        assert (
            f"restoring big.sql: 1000 B of 9.8 KiB (10%), stalled for {round(during.stalled_seconds)}s"
            in text
        )
        with pytest.raises(NoSnapshotReadyError, match=r"\(0\.0 of 0\.0 MiB, stalled for 3\d s\)"):
            await h.pool.acquire(ttl=60.0)
        source.resume.set()
        with structlog.testing.capture_logs() as logs:
            await wait_for(lambda: h.pool.statistics().restore is None, what="the restore's end")
        restored = [e for e in logs if e["event"] == "snapshot.restored"]
        assert restored
        assert restored[0]["done_mib"] == round(10000 / 1024**2, 1)
        assert h.pool.statistics().restore is None
