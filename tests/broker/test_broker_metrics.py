"""The broker's Prometheus exposition: names, labels, levels read at scrape time."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from aldaas.broker._broker import trio_tasks
from aldaas.broker._metrics import Metrics, Readings, exported_metric_names


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_if_scraped_then_exactly_the_agreed_names_are_exported() -> None:
    """If the registry is scraped, then the families are exactly exported_metric_names()."""
    text = Metrics().exposition().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue  # the creation timestamps of counters and histograms, not metrics of their own
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    assert names == set(exported_metric_names())
    assert len(names) == 27


def test_if_levels_change_then_the_next_scrape_reads_them() -> None:
    """If the readings function returns new levels, then the next scrape shows them."""
    current = Readings()

    def readings() -> Readings:
        return current

    metrics = Metrics(readings)
    before = _samples(metrics)
    assert before[("aldaas_clones", (("state", "warm"),))] == 0
    assert before[("aldaas_snapshot_age_seconds", ())] == 0
    current = Readings(
        clones={"warm": 3, "leased": 1},
        snapshots={"ready": 1},
        snapshot_age_seconds=42.5,
        queue_length=2,
        leases_active=1,
        gateway_sessions=4,
        gateway_streams=7,
        gateway_bytes_up=100,
        gateway_bytes_down=2000,
        gateway_auth_failures=5,
        gateway_refused=6,
        gateway_handshakes=3,
        gateway_memory_held_bytes=1_310_720,
        restore_done_bytes=10,
        restore_total_bytes=30,
        trio_tasks=12,
    )
    after = _samples(metrics)
    assert after[("aldaas_clones", (("state", "warm"),))] == 3
    assert after[("aldaas_clones", (("state", "leased"),))] == 1
    assert after[("aldaas_clones", (("state", "broken"),))] == 0
    assert after[("aldaas_snapshots", (("status", "ready"),))] == 1
    assert after[("aldaas_snapshots", (("status", "failed"),))] == 0
    assert after[("aldaas_snapshot_age_seconds", ())] == 42.5
    assert after[("aldaas_queue_length", ())] == 2
    assert after[("aldaas_gateway_bytes_total", (("direction", "down"),))] == 2000
    assert after[("aldaas_gateway_bytes_total", (("direction", "up"),))] == 100
    assert after[("aldaas_gateway_auth_failures_total", ())] == 5
    assert after[("aldaas_gateway_refused_total", ())] == 6
    assert after[("aldaas_gateway_handshakes", ())] == 3
    assert after[("aldaas_gateway_memory_held_bytes", ())] == 1_310_720
    assert after[("aldaas_restore_total_bytes", ())] == 30
    assert after[("aldaas_trio_tasks", ())] == 12


def test_if_events_happen_then_counters_and_histograms_count_them() -> None:
    """If events are recorded, then counters add up and histograms land in the right bucket."""
    metrics = Metrics(tasks=["gateway"], components=["pool"])
    zero = _samples(metrics)
    assert zero[("aldaas_task_restarts_total", (("task", "gateway"),))] == 0
    assert zero[("aldaas_errors_total", (("component", "pool"),))] == 0
    metrics.observe_handout(0.004)
    metrics.observe_handout(0.2)
    metrics.add_restore_bytes(1000)
    metrics.add_restore_bytes(0)
    metrics.lease_expired()
    metrics.lease_reset()
    metrics.lease_reset()
    metrics.task_restarted("gateway")
    metrics.error("pool")
    s = _samples(metrics)
    assert s[("aldaas_handout_seconds_count", ())] == 2
    assert s[("aldaas_handout_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("aldaas_handout_seconds_bucket", (("le", "0.25"),))] == 2
    assert s[("aldaas_restore_bytes_total", ())] == 1000
    assert s[("aldaas_lease_expirations_total", ())] == 1
    assert s[("aldaas_lease_resets_total", ())] == 2
    assert s[("aldaas_task_restarts_total", (("task", "gateway"),))] == 1
    assert s[("aldaas_errors_total", (("component", "pool"),))] == 1


def test_if_two_brokers_share_a_process_then_their_numbers_stay_apart() -> None:
    """If two Metrics exist at once, then events in one never show in the other."""
    a, b = Metrics(), Metrics()
    a.lease_reset()
    assert _samples(a)[("aldaas_lease_resets_total", ())] == 1
    assert _samples(b)[("aldaas_lease_resets_total", ())] == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) absent")
def test_if_promtool_lints_the_exposition_then_it_finds_nothing() -> None:
    """If promtool checks the exposition, then it reports no problem."""
    metrics = Metrics(tasks=["gateway"], components=["pool"])
    metrics.observe_handout(0.01)
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_if_tasks_start_and_end_then_the_trio_task_reading_follows_them() -> None:
    """If three tasks start and then end, then trio_tasks() rises by three and comes back."""
    before = trio_tasks()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert trio_tasks() == before + 3
        nursery.cancel_scope.cancel()
    assert trio_tasks() == before
    assert before >= 1


def test_if_no_trio_run_is_active_then_the_trio_task_reading_is_zero() -> None:
    """If the readings are taken outside trio (a test, a thread), then trio_tasks() is 0."""
    assert trio_tasks() == 0
