"""Every metric the Grafana dashboard queries is one the broker exports (agreed contract).

The contract is the list the broker's metrics module implements; it is copied
here as a literal so this test runs before the broker lands. The sibling test
in test_chart_dashboard_metrics.py asks broker._metrics itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The agreed metric names (base names: no _bucket/_sum/_count/_created).
EXPORTED_METRIC_NAMES = frozenset(
    {
        "aldaas_clones",
        "aldaas_handout_seconds",
        "aldaas_queue_length",
        "aldaas_queue_wait_seconds",
        "aldaas_provision_seconds",
        "aldaas_restore_seconds",
        "aldaas_restore_bytes_total",
        "aldaas_restore_done_bytes",
        "aldaas_restore_total_bytes",
        "aldaas_snapshots",
        "aldaas_snapshot_age_seconds",
        "aldaas_leases_active",
        "aldaas_lease_expirations_total",
        "aldaas_lease_resets_total",
        "aldaas_gateway_sessions",
        "aldaas_gateway_streams",
        "aldaas_gateway_bytes_total",
        "aldaas_gateway_auth_failures_total",
        "aldaas_task_restarts_total",
        "aldaas_errors_total",
    }
)


def test_if_the_dashboard_queries_metrics_then_each_is_in_the_contract(
    dashboard_metric_names: set[str],
) -> None:
    """If a dashboard query names a metric, then the broker's agreed list contains it."""
    used = dashboard_metric_names
    assert used - EXPORTED_METRIC_NAMES == set()
    # It shows nearly all of them; only the histogram counts are folded away.
    assert used == EXPORTED_METRIC_NAMES


def test_if_names_are_collected_then_histogram_series_fold_onto_their_family(
    metric_names: Callable[[list[str]], set[str]],
) -> None:
    """If a query reads _bucket/_count series, then the collected name is the family's."""
    queries = [
        "histogram_quantile(0.9, sum by (le) (rate(aldaas_handout_seconds_bucket[5m])))",
        "rate(aldaas_restore_seconds_count[5m]) + aldaas_unknown_thing",
    ]
    assert metric_names(queries) == {
        "aldaas_handout_seconds",
        "aldaas_restore_seconds",
        "aldaas_unknown_thing",
    }


def test_if_the_dashboard_is_read_then_it_has_the_promised_panels(
    dashboard: dict[str, Any],
) -> None:
    """If the dashboard loads, then pool, hand-out, queue, restore and tunnel panels are there."""
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    for title in (
        "Clones by state",
        "Hand-out latency",
        "Queue",
        "Restore progress",
        "Tunnel traffic",
    ):
        assert title in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
